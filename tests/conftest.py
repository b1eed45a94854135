"""Session-wide fixtures: the tiny generated model and PEFT adapters (offline, deterministic)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lora_gateway import devtools
from lora_gateway.config import Settings
from tests.support import processes

# Every process this run starts inherits the mark (see tests/support/processes.py).
os.environ.setdefault(processes.SESSION_ENV, uuid.uuid4().hex)

if TYPE_CHECKING:
    from lora_gateway.engine.vllm_engine import VLLMEngine

AdapterFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with its tokenizer, generated once per session."""
    return devtools.make_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def quantized_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model quantized W8A8 (int8 weights and activations) with compressed-tensors."""
    out = tmp_path_factory.mktemp("model-w8a8") / "tiny-llama-w8a8"
    return devtools.make_quantized_model(out, "W8A8", source=tiny_model)


@pytest.fixture(scope="session")
def make_test_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    """Factory: make_test_adapter(seed=1, rank=8, ...) -> PEFT adapter folder (cached per spec)."""
    made: dict[devtools.AdapterSpec, Path] = {}
    root = tmp_path_factory.mktemp("adapters")

    def make(**fields: object) -> Path:
        if "target_modules" in fields:
            fields["target_modules"] = tuple(fields["target_modules"])  # type: ignore[arg-type]
        spec = devtools.AdapterSpec(**fields)  # type: ignore[arg-type]
        if spec not in made:
            made[spec] = devtools.make_adapter(tiny_model, root / f"adapter-{len(made)}", spec)
        return made[spec]

    return make


# --- the real engine, one per test session ---------------------------------------------------

ADAPTER_SPECS: dict[str, dict[str, object]] = {
    # rank 8 on attention only
    "attn-r8": {"seed": 11, "rank": 8},
    # rank 16 on every module, rsLoRA scaling
    "all-r16-rslora": {
        "seed": 12,
        "rank": 16,
        "target_modules": devtools.ALL_MODULES,
        "use_rslora": True,
    },
    # rank 4 on the MLP only, larger alpha
    "mlp-r4": {"seed": 13, "rank": 4, "alpha": 32, "target_modules": devtools.MLP_MODULES},
    # rank 8 on q and v
    "qv-r8": {"seed": 14, "rank": 8, "target_modules": ("q_proj", "v_proj")},
}


@pytest.fixture(scope="session")
def test_adapters(make_test_adapter: AdapterFactory) -> dict[str, Path]:
    return {name: make_test_adapter(**spec) for name, spec in ADAPTER_SPECS.items()}


@pytest.fixture(scope="session")
def reference(tiny_model: Path) -> devtools.ReferenceGenerator:
    return devtools.ReferenceGenerator(tiny_model)


def engine_settings(model: Path, **changes: object) -> Settings:
    """Small engine settings for this 2-core machine: 2 GPU slots, 3 loaded adapters."""
    values: dict[str, object] = {
        "model": str(model),
        "dtype": "float32",
        "max_loras": 2,
        "max_cpu_loras": 3,
        "max_lora_rank": 16,
        "max_model_len": 256,
        "max_num_seqs": 16,
        "enforce_eager": True,
        "kv_cache_space_gib": 1,
    }
    values.update(changes)
    return Settings.from_mapping(values)


@pytest.fixture(scope="session")
async def engine(tiny_model: Path) -> AsyncIterator[VLLMEngine]:
    from lora_gateway.engine.vllm_engine import VLLMEngine

    started = await VLLMEngine.start(engine_settings(tiny_model))
    yield started
    await started.shutdown()


# --- slow tests --------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with `make test-slow` (--run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --- nothing left behind -----------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process it started is still alive (an engine core, a worker, an S3
    server, a replica); then end them. Our own multiprocessing resource tracker is not a
    leftover: it ends with this process."""
    me = os.getpid()
    left = []
    for process in processes.leftovers(os.environ[processes.SESSION_ENV]):
        try:
            ours = process.ppid() == me and "resource_tracker" in " ".join(process.cmdline())
        except Exception:  # it ended meanwhile
            continue
        if not ours:
            left.append(process)
    if not left:
        return
    lines = []
    for process in left:
        try:
            lines.append(f"  pid {process.pid}: {' '.join(process.cmdline())[:200]}")
            process.kill()
        except Exception:
            continue
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("processes left behind by this run (now killed):", red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
