"""Bad adapters, configs and names are refused with a message that says what is wrong, and
nothing is stored. Each case mutates a copy of a good PEFT adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from adapter_store import (
    BaseModelSpec,
    CapacityExceeded,
    FileEntry,
    Incompatible,
    InvalidAdapter,
    Limits,
    Registry,
    StoreError,
)
from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE, sha256_file
from adapter_store.validate import validate_adapter
from lora_gateway.devtools import ALL_MODULES as ALL
from lora_gateway.devtools import MLP_MODULES as MLP
from tests.conftest import AdapterFactory

LAYER0_Q = "base_model.model.model.layers.0.self_attn.q_proj"


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        for key, value in changes.items():
            if value is _DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / CONFIG_FILE).write_text(json.dumps(config))

    return mutate


_DELETE = object()


def raw_config(data: bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / CONFIG_FILE).write_bytes(data)

    return mutate


def edit_tensors(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        tensors = load_file(str(folder / WEIGHTS_FILE))
        change(tensors)
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})

    return mutate


def raw_weights(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        path = folder / WEIGHTS_FILE
        path.write_bytes(change(path.read_bytes()))

    return mutate


def add_file(name: str, data: bytes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).write_bytes(data)

    return mutate


def remove_file(name: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).unlink()

    return mutate


def both(*mutations: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        for mutation in mutations:
            mutation(folder)

    return mutate


def set_value(name: str, value: float) -> Callable[[dict[str, np.ndarray]], None]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = tensors[name].copy()
        tensors[name][0, 0] = value

    return change


def _replace(name: str, array: np.ndarray) -> Callable[[dict[str, np.ndarray]], None]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = array

    return change


def _rename(old: str, new: str) -> Callable[[dict[str, np.ndarray]], None]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors[new] = tensors.pop(old)

    return change


def _drop(name: str) -> Callable[[dict[str, np.ndarray]], None]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        del tensors[name]

    return change


def _header_of(data: bytes) -> dict[str, Any]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def _with_header(header: dict[str, Any]) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        (length,) = struct.unpack("<Q", data[:8])
        encoded = json.dumps(header).encode()
        return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]

    return change


def _edit_header(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        header = _header_of(data)
        change(header)
        return _with_header(header)(data)

    return mutate


def _first_tensor(header: dict[str, Any]) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def header_field(field: str, raw_json: str) -> Callable[[bytes], bytes]:
    """Set `field` of the first tensor's header entry (or `__metadata__` / the whole entry, for
    field "__metadata__" / "entry") to the JSON text `raw_json`, byte for byte (json.dumps
    cannot write a 5,000-digit integer)."""

    def change(data: bytes) -> bytes:
        (length,) = struct.unpack("<Q", data[:8])
        header = _header_of(data)
        marker = "__VALUE_MARKER__"
        first = _first_tensor(header)
        if field == "__metadata__":
            header["__metadata__"] = marker
        elif field == "entry":
            header[first] = marker
        else:
            header[first][field] = marker
        encoded = json.dumps(header).replace(f'"{marker}"', raw_json).encode()
        return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :]

    return change


def _full(
    name: str, shape: tuple[int, int], value: float
) -> Callable[[dict[str, np.ndarray]], None]:
    return _replace(name, np.full(shape, value, np.float32))


HUGE_INT = "1" + "0" * 5000

# (id, mutation of the adapter folder, expected error class, fragment of the message)
BAD_ADAPTERS: list[tuple[str, Callable[[Path], None], type[StoreError], str]] = [
    # files
    (
        "pickle-bin",
        add_file("adapter_model.bin", pickle.dumps({"x": 1})),
        InvalidAdapter,
        "unsupported file 'adapter_model.bin'",
    ),
    (
        "pickle-only",
        both(remove_file(WEIGHTS_FILE), add_file("adapter_model.bin", pickle.dumps(1))),
        InvalidAdapter,
        "unsupported file",
    ),
    ("pt-file", add_file("weights.pt", b"\x80\x04K\x01."), InvalidAdapter, "never loaded"),
    ("extra-file", add_file("notes.txt", b"hi"), InvalidAdapter, "unsupported file 'notes.txt'"),
    (
        "missing-config",
        remove_file(CONFIG_FILE),
        InvalidAdapter,
        "missing file adapter_config.json",
    ),
    (
        "missing-weights",
        remove_file(WEIGHTS_FILE),
        InvalidAdapter,
        "missing file adapter_model.safetensors",
    ),
    # config JSON
    ("bad-json", raw_config(b"{not json"), InvalidAdapter, "not valid JSON"),
    ("json-array", raw_config(b"[1, 2]"), InvalidAdapter, "must be a JSON object, got list"),
    ("not-utf8", raw_config(b'{"r": "\xff\xfe"}'), InvalidAdapter, "not UTF-8"),
    (
        "nan-constant",
        raw_config(b'{"peft_type": "LORA", "r": NaN}'),
        InvalidAdapter,
        "non-standard constant NaN",
    ),
    ("duplicate-key", raw_config(b'{"r": 8, "r": 4}'), InvalidAdapter, "duplicate JSON key 'r'"),
    (
        "config-too-big",
        raw_config(b'{"x": "' + b"a" * 70_000 + b'"}'),
        CapacityExceeded,
        "above the cap",
    ),
    # config fields
    (
        "peft-ia3",
        edit_config(peft_type="IA3"),
        InvalidAdapter,
        "peft_type str 'IA3' is not supported",
    ),
    ("r-zero", edit_config(r=0), InvalidAdapter, "r=0 is out of range"),
    ("r-too-large", edit_config(r=128), Incompatible, "exceeds this deployment's maximum rank 64"),
    ("r-string", edit_config(r="8"), InvalidAdapter, "r must be an integer, got str"),
    ("r-bool", edit_config(r=True), InvalidAdapter, "r must be an integer, got bool"),
    ("rank-mismatch", edit_config(r=4), InvalidAdapter, "rank mismatch: config says r=4"),
    ("alpha-string", edit_config(lora_alpha="16"), InvalidAdapter, "lora_alpha must be a number"),
    ("alpha-negative", edit_config(lora_alpha=-1), InvalidAdapter, "positive finite number"),
    ("targets-regex", edit_config(target_modules=".*proj"), InvalidAdapter, "regular expression"),
    ("targets-dict", edit_config(target_modules={"q_proj": 1}), InvalidAdapter, "non-empty list"),
    (
        "targets-unknown",
        edit_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "foo_proj"]),
        Incompatible,
        "'foo_proj' does not exist in the base model",
    ),
    (
        "targets-too-few",
        edit_config(target_modules=["q_proj"]),
        InvalidAdapter,
        "is not in target_modules",
    ),
    (
        "base-mismatch",
        edit_config(base_model_name_or_path="meta-llama/Llama-3-8B"),
        Incompatible,
        "trained for base model 'meta-llama/Llama-3-8B'",
    ),
    (
        "base-missing",
        edit_config(base_model_name_or_path=None),
        InvalidAdapter,
        "base_model_name_or_path must be a non-empty string",
    ),
    (
        "rslora-string",
        edit_config(use_rslora="yes"),
        InvalidAdapter,
        "use_rslora must be true or false",
    ),
    ("use-dora", edit_config(use_dora=True), InvalidAdapter, "unsupported adapter feature: DoRA"),
    ("bias-all", edit_config(bias="all"), InvalidAdapter, "trained biases"),
    (
        "modules-to-save",
        edit_config(modules_to_save=["lm_head"]),
        InvalidAdapter,
        "modules_to_save",
    ),
    (
        "layers-to-transform",
        edit_config(layers_to_transform=[0]),
        InvalidAdapter,
        "layers_to_transform",
    ),
    (
        "layer-replication",
        edit_config(layer_replication=[[0, 1]]),
        InvalidAdapter,
        "layer replication",
    ),
    ("lora-bias", edit_config(lora_bias=True), InvalidAdapter, "lora_bias"),
    ("fan-in-fan-out", edit_config(fan_in_fan_out=True), InvalidAdapter, "fan_in_fan_out"),
    ("rank-pattern", edit_config(rank_pattern={"q_proj": 4}), InvalidAdapter, "per-module ranks"),
    (
        "alpha-pattern",
        edit_config(alpha_pattern={"q_proj": 4}),
        InvalidAdapter,
        "per-module alphas",
    ),
    ("loftq", edit_config(loftq_config={"loftq_bits": 4}), InvalidAdapter, "LoftQ"),
    (
        "trainable-tokens",
        edit_config(trainable_token_indices=[1, 2]),
        InvalidAdapter,
        "trainable tokens",
    ),
    (
        "target-parameters",
        edit_config(target_parameters=["mlp.experts"]),
        InvalidAdapter,
        "target_parameters",
    ),
    # the allowlist: unknown keys by name, inits vLLM refuses at load, bounded numbers
    ("unknown-key", edit_config(foo=1), InvalidAdapter, "unknown adapter_config.json key(s) 'foo'"),
    (
        "unknown-key-typo",
        edit_config(use_doraa=True),
        InvalidAdapter,
        "unknown adapter_config.json key(s) 'use_doraa'",
    ),
    ("init-pissa", edit_config(init_lora_weights="pissa"), InvalidAdapter, "init_lora_weights"),
    (
        "init-pissa-niter",
        edit_config(init_lora_weights="pissa_niter_16"),
        InvalidAdapter,
        "PiSSA, OLoRA",
    ),
    ("init-olora", edit_config(init_lora_weights="olora"), InvalidAdapter, "init_lora_weights"),
    ("init-corda", edit_config(init_lora_weights="corda"), InvalidAdapter, "init_lora_weights"),
    ("init-loftq", edit_config(init_lora_weights="loftq"), InvalidAdapter, "init_lora_weights"),
    ("init-number", edit_config(init_lora_weights=1), InvalidAdapter, "init_lora_weights=int"),
    (
        "dropout-2",
        edit_config(lora_dropout=2.0),
        InvalidAdapter,
        "lora_dropout=2.0 is out of range",
    ),
    ("dropout-string", edit_config(lora_dropout="0.1"), InvalidAdapter, "lora_dropout must be"),
    ("task-type-list", edit_config(task_type=[]), InvalidAdapter, "task_type must be one of"),
    ("inference-mode-int", edit_config(inference_mode=1), InvalidAdapter, "inference_mode must"),
    ("dora-one", edit_config(use_dora=1), InvalidAdapter, "DoRA"),
    # effective weights: finite and bounded in the serving dtype
    (
        "alpha-1e300",
        edit_config(lora_alpha=1e300),
        InvalidAdapter,
        "lora_alpha=1e+300 is out of range",
    ),
    (
        "alpha-1e30",
        edit_config(lora_alpha=1e30),
        InvalidAdapter,
        "lora_alpha=1e+30 is out of range",
    ),
    ("alpha-1e6", edit_config(lora_alpha=1e6), InvalidAdapter, "lora_alpha=1e+06 is out of range"),
    (
        "scaled-b-too-large",
        edit_config(lora_alpha=60000),
        InvalidAdapter,
        "scaling·lora_B| reaches",
    ),
    (
        "a-too-large",
        edit_tensors(set_value(f"{LAYER0_Q}.lora_A.weight", 1e5)),
        InvalidAdapter,
        "|lora_A| reaches 1e+05",
    ),
    (
        "delta-too-large",
        both(
            edit_tensors(_full(f"{LAYER0_Q}.lora_A.weight", (8, 128), 5.0)),
            edit_tensors(_full(f"{LAYER0_Q}.lora_B.weight", (128, 8), 2.0)),
        ),
        InvalidAdapter,
        "effective weight delta |scaling·B·A| may reach 160",
    ),
    # safetensors header field types (values of the wrong JSON type raise no TypeError)
    ("header-dtype-list", raw_weights(header_field("dtype", "[]")), InvalidAdapter, "has dtype []"),
    ("header-dtype-object", raw_weights(header_field("dtype", "{}")), InvalidAdapter, "has dtype"),
    ("header-dtype-null", raw_weights(header_field("dtype", "null")), InvalidAdapter, "has dtype"),
    (
        "header-shape-huge-int",
        raw_weights(header_field("shape", f"[{HUGE_INT}, 128]")),
        InvalidAdapter,
        "header is not valid UTF-8 JSON",
    ),
    (
        "header-offsets-huge-int",
        raw_weights(header_field("data_offsets", f"[0, {HUGE_INT}]")),
        InvalidAdapter,
        "header is not valid UTF-8 JSON",
    ),
    (
        "header-shape-object",
        raw_weights(header_field("shape", '{"a": 1}')),
        InvalidAdapter,
        "malformed shape",
    ),
    (
        "header-metadata-list",
        raw_weights(header_field("__metadata__", "[1]")),
        InvalidAdapter,
        "__metadata__ must map strings to strings",
    ),
    # safetensors contents
    (
        "dtype-i64",
        edit_tensors(_replace(f"{LAYER0_Q}.lora_A.weight", np.zeros((8, 128), np.int64))),
        InvalidAdapter,
        "dtype I64; only F16, BF16 and F32",
    ),
    (
        "mixed-dtypes",
        edit_tensors(_replace(f"{LAYER0_Q}.lora_A.weight", np.zeros((8, 128), np.float16))),
        InvalidAdapter,
        "mix dtypes",
    ),
    (
        "nan",
        edit_tensors(set_value(f"{LAYER0_Q}.lora_A.weight", np.nan)),
        InvalidAdapter,
        "contains NaN or Inf",
    ),
    (
        "inf",
        edit_tensors(set_value(f"{LAYER0_Q}.lora_B.weight", np.inf)),
        InvalidAdapter,
        "contains NaN or Inf",
    ),
    (
        "shape-out",
        edit_tensors(_replace(f"{LAYER0_Q}.lora_B.weight", np.zeros((64, 8), np.float32))),
        Incompatible,
        "the base model needs [128, 8]",
    ),
    (
        "shape-in",
        edit_tensors(_replace(f"{LAYER0_Q}.lora_A.weight", np.zeros((8, 256), np.float32))),
        Incompatible,
        "the base model needs [8, 128]",
    ),
    (
        "shape-3d",
        edit_tensors(_replace(f"{LAYER0_Q}.lora_A.weight", np.zeros((8, 128, 1), np.float32))),
        InvalidAdapter,
        "must be 2-dimensional",
    ),
    (
        "tensor-lm-head",
        edit_tensors(_replace("base_model.model.lm_head.weight", np.zeros((4, 4), np.float32))),
        InvalidAdapter,
        "unexpected tensor 'base_model.model.lm_head.weight'",
    ),
    (
        "tensor-dora-magnitude",
        edit_tensors(_replace(f"{LAYER0_Q}.lora_magnitude_vector", np.ones((128,), np.float32))),
        InvalidAdapter,
        "unexpected tensor",
    ),
    (
        "layer-out-of-range",
        edit_tensors(
            _rename(
                f"{LAYER0_Q}.lora_A.weight",
                "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight",
            )
        ),
        Incompatible,
        "layer 5 does not exist",
    ),
    (
        "wrong-parent",
        edit_tensors(
            _rename(
                f"{LAYER0_Q}.lora_A.weight",
                "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            )
        ),
        InvalidAdapter,
        "q_proj is not under mlp",
    ),
    (
        "missing-lora-b",
        edit_tensors(_drop(f"{LAYER0_Q}.lora_B.weight")),
        InvalidAdapter,
        "missing lora_B",
    ),
    (
        "header-too-large",
        raw_weights(lambda d: struct.pack("<Q", 2 * 1024 * 1024) + d[8:]),
        InvalidAdapter,
        "exceeds the cap",
    ),
    (
        "header-past-eof",
        raw_weights(lambda d: struct.pack("<Q", len(d)) + d[8:]),
        InvalidAdapter,
        "truncated",
    ),
    ("truncated", raw_weights(lambda d: d[:-100]), InvalidAdapter, "truncated"),
    ("trailing-bytes", raw_weights(lambda d: d + b"\0" * 16), InvalidAdapter, "trailing bytes"),
    ("tiny-file", raw_weights(lambda d: d[:5]), InvalidAdapter, "no header"),
    (
        "header-not-json",
        raw_weights(lambda d: struct.pack("<Q", 4) + b"\xff\xfe{}"),
        InvalidAdapter,
        "header is not valid",
    ),
    (
        "no-tensors",
        raw_weights(lambda d: struct.pack("<Q", 2) + b"{}"),
        InvalidAdapter,
        "contains no tensors",
    ),
    (
        "overlapping-offsets",
        raw_weights(
            _edit_header(
                lambda h: h[sorted(k for k in h if k != "__metadata__")[1]].__setitem__(
                    "data_offsets", [0, 4096]
                )
            )
        ),
        InvalidAdapter,
        "data offsets",
    ),
]

BAD_NAMES = [
    "../x",
    "a/b",
    "",
    "x" * 65,
    ".hidden",
    "-dash",
    "a..b",
    "name\n",
    " lead",
    "\uff41dapter",  # fullwidth a: a confusable
    "\u0430dapter",  # Cyrillic a: a confusable
    "name\0",
    "a b",
    "%2e%2e",
]


def _upload(registry: Registry, folder: Path, tenant: str = "acme", name: str = "bot") -> None:
    registry.upload_dir(tenant, name, folder, created_by="test")


def _assert_nothing_stored(registry: Registry, tmp_path: Path) -> None:
    assert registry.backend.list("") == []
    spool = tmp_path / "spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def test_good_adapter_is_accepted(local_registry: Registry, good_adapter: Path) -> None:
    version = local_registry.upload_dir("acme", "bot", good_adapter, created_by="alice")
    assert (version.rank, version.alpha, version.dtype) == (8, 16.0, "F32")
    assert version.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert version.base_model == "lora-gateway/tiny-llama"


@pytest.mark.parametrize(
    ("mutation", "error", "fragment"),
    [pytest.param(m, e, f, id=i) for i, m, e, f in BAD_ADAPTERS],
)
def test_bad_adapter_is_refused(
    local_registry: Registry,
    adapter_copy: Path,
    tmp_path: Path,
    mutation: Callable[[Path], None],
    error: type[StoreError],
    fragment: str,
) -> None:
    mutation(adapter_copy)
    with pytest.raises(error) as caught:
        _upload(local_registry, adapter_copy)
    assert fragment in str(caught.value)
    _assert_nothing_stored(local_registry, tmp_path)


def test_bad_adapter_table_is_large_and_distinct() -> None:
    ids = [case[0] for case in BAD_ADAPTERS]
    assert len(set(ids)) == len(ids) >= 30


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("field", ["tenant", "name"])
def test_bad_names_are_refused(
    local_registry: Registry, good_adapter: Path, tmp_path: Path, field: str, bad: str
) -> None:
    names = {"tenant": "acme", "name": "bot", field: bad}
    with pytest.raises(
        InvalidAdapter, match=f"invalid {'tenant' if field == 'tenant' else 'adapter name'}"
    ):
        _upload(local_registry, good_adapter, names["tenant"], names["name"])
    _assert_nothing_stored(local_registry, tmp_path)


def test_declared_sha_mismatch(
    local_registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    declared = [
        FileEntry(CONFIG_FILE, (good_adapter / CONFIG_FILE).stat().st_size, "0" * 64),
        FileEntry(
            WEIGHTS_FILE,
            (good_adapter / WEIGHTS_FILE).stat().st_size,
            sha256_file(good_adapter / WEIGHTS_FILE),
        ),
    ]
    upload = local_registry.begin_upload("acme", "bot", declared, created_by="t")
    for entry in declared:
        upload.write(entry.filename, (good_adapter / entry.filename).read_bytes())
    with pytest.raises(InvalidAdapter, match=r"sha256 mismatch for adapter_config\.json"):
        upload.commit()
    _assert_nothing_stored(local_registry, tmp_path)


def _declared(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(name, (folder / name).stat().st_size, sha256_file(folder / name))
        for name in (CONFIG_FILE, WEIGHTS_FILE)
    ]


def test_more_bytes_than_declared(
    local_registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    upload = local_registry.begin_upload("acme", "bot", _declared(good_adapter), created_by="t")
    data = (good_adapter / CONFIG_FILE).read_bytes()
    with pytest.raises(InvalidAdapter, match="larger than its declared size"):
        upload.write(CONFIG_FILE, data + b" ")
    with pytest.raises(InvalidAdapter, match="already committed or aborted"):
        upload.write(CONFIG_FILE, b"")
    _assert_nothing_stored(local_registry, tmp_path)


def test_chunks_out_of_order(local_registry: Registry, good_adapter: Path, tmp_path: Path) -> None:
    upload = local_registry.begin_upload("acme", "bot", _declared(good_adapter), created_by="t")
    upload.write(CONFIG_FILE, b"{")
    with pytest.raises(InvalidAdapter, match="declared order"):
        upload.write(WEIGHTS_FILE, b"x")
    _assert_nothing_stored(local_registry, tmp_path)


def test_declared_size_over_cap(
    local_registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    declared = _declared(good_adapter)
    declared[1] = FileEntry(WEIGHTS_FILE, 10**12, declared[1].sha256)
    with pytest.raises(CapacityExceeded, match="above the cap"):
        local_registry.begin_upload("acme", "bot", declared, created_by="t")
    _assert_nothing_stored(local_registry, tmp_path)


def test_bf16_and_f16_adapters_are_accepted(local_registry: Registry, adapter_copy: Path) -> None:
    tensors = load_file(str(adapter_copy / WEIGHTS_FILE))
    save_file(
        {k: v.astype(np.float16) for k, v in tensors.items()}, str(adapter_copy / WEIGHTS_FILE)
    )
    assert local_registry.upload_dir("acme", "f16", adapter_copy, created_by="t").dtype == "F16"
    # BF16 (numpy has no bfloat16): write the header by hand, keeping the high halves.
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        bits = (tensors[name].view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(bits)],
        }
        chunks.append(bits)
        offset += len(bits)
    encoded = json.dumps(header).encode()
    (adapter_copy / WEIGHTS_FILE).write_bytes(
        struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
    )
    assert local_registry.upload_dir("acme", "bf16", adapter_copy, created_by="t").dtype == "BF16"


# --- effective weights in the serving dtype ----------------------------------------------------


def _validate(folder: Path, spec: BaseModelSpec, dtype: str) -> None:
    files = {CONFIG_FILE: folder / CONFIG_FILE, WEIGHTS_FILE: folder / WEIGHTS_FILE}
    validate_adapter(files, dataclasses.replace(spec, dtype=dtype), Limits())


def _uniform(folder: Path, a: float, b: float, **config: Any) -> None:
    """Every lora_A entry `a`, every lora_B entry `b` (rank 8), config fields changed."""

    def change(tensors: dict[str, np.ndarray]) -> None:
        for name in tensors:
            tensors[name] = np.full(tensors[name].shape, a if ".lora_A." in name else b, np.float32)

    edit_tensors(change)(folder)
    edit_config(**config)(folder)


# The bound on |ΔW| entries, s·max‖B_i,:‖·max‖A_:,j‖, is s·(b·√8)·(a·√8) = 8·s·a·b for these
# uniform rank-8 adapters; s = alpha/8 (alpha/√8 with rsLoRA).
DTYPE_CASES = [
    # (a, b, alpha, float16, bfloat16, float32): the fragment of the refusal, or None (accepted)
    (0.1, 0.1, 16, None, None, None),  # ordinary: bound 0.16
    (1.0, 1.0, 80, "above the weight magnitude limit 63.97 for float16", None, None),  # bound 80
    (0.01, 0.1, 16 * 1000, "above the weight magnitude limit 63.97", "limit 100", "limit 100"),
    (7e4, 1e-9, 8, "|lora_A| reaches 7e+04, which overflows float16", "limit 100", "limit 100"),
    (
        1e-3,
        3e38,
        16,
        "overflows float16",
        "which overflows bfloat16 (largest finite value 3.3895e+38)",
        "which overflows float32 (largest finite value 3.4028e+38)",
    ),
]


@pytest.mark.parametrize(("a", "b", "alpha", "f16", "bf16", "f32"), DTYPE_CASES)
def test_effective_weights_are_checked_in_the_serving_dtype(
    adapter_copy: Path,
    spec: BaseModelSpec,
    a: float,
    b: float,
    alpha: float,
    f16: str | None,
    bf16: str | None,
    f32: str | None,
) -> None:
    _uniform(adapter_copy, a, b, lora_alpha=alpha)
    for dtype, fragment in (("float16", f16), ("bfloat16", bf16), ("float32", f32)):
        if fragment is None:
            _validate(adapter_copy, spec, dtype)
        else:
            with pytest.raises(InvalidAdapter) as caught:
                _validate(adapter_copy, spec, dtype)
            assert fragment in str(caught.value), (dtype, str(caught.value))


def test_rslora_scaling_is_alpha_over_sqrt_r(adapter_copy: Path, spec: BaseModelSpec) -> None:
    # a = 0.1, b = 0.05, alpha 8000: plain s = 1000 → s·b = 50, bound 8·1000·0.005 = 40: fine;
    # rsLoRA s = 8000/√8 = 2828 → s·b = 141 > 100.
    _uniform(adapter_copy, 0.1, 0.05, lora_alpha=8000)
    _validate(adapter_copy, spec, "float32")
    edit_config(use_rslora=True)(adapter_copy)
    with pytest.raises(InvalidAdapter, match=r"scaling·lora_B\| reaches 141.*scaling 2.83e\+03"):
        _validate(adapter_copy, spec, "float32")


def test_adalora_effective_weights_include_e_and_alpha(
    make_test_adapter: AdapterFactory, spec: BaseModelSpec, tmp_path: Path
) -> None:
    folder = tmp_path / "ada"
    shutil.copytree(make_test_adapter(seed=3, adalora=True), folder)
    _validate(folder, spec, "float32")
    # E (the singular values) multiplies A: a large E is a large delta, though A and B are small.
    edit_tensors(
        lambda t: t.update(
            {k: np.full(v.shape, 1e4, np.float32) for k, v in t.items() if ".lora_E" in k}
        )
    )(folder)
    with pytest.raises(InvalidAdapter, match="above the weight magnitude limit"):
        _validate(folder, spec, "float32")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("target_r", 0, "target_r=0 is out of range"),
        ("target_r", "8", "target_r must be an integer"),
        ("beta1", 2.0, "beta1=2.0 is out of range"),
        ("beta2", -0.1, "beta2=-0.1 is out of range"),
        ("deltaT", 0, "deltaT=0 is out of range"),
        ("tinit", -1, "tinit=-1 is out of range"),
        ("tfinal", 10**12, "tfinal=1000000000000 is out of range"),
        ("total_step", 0, "total_step=0 is out of range"),
        ("orth_reg_weight", 1e300, "orth_reg_weight=1e+300 is out of range"),
        ("r", 10**9, "r=1000000000 is out of range"),
        ("lora_alpha", 1e300, "lora_alpha=1e+300 is out of range"),
        ("rank_pattern", {"q_proj": [True]}, "per-module ranks"),
        ("whatever", 1, "unknown adapter_config.json key(s) 'whatever'"),
    ],
)
def test_adalora_numeric_fields_are_bounded(
    make_test_adapter: AdapterFactory,
    local_registry: Registry,
    tmp_path: Path,
    key: str,
    value: object,
    fragment: str,
) -> None:
    folder = tmp_path / "ada"
    shutil.copytree(make_test_adapter(seed=3, adalora=True), folder)
    edit_config(**{key: value})(folder)
    with pytest.raises(InvalidAdapter) as caught:
        _upload(local_registry, folder)
    assert fragment in str(caught.value)
    _assert_nothing_stored(local_registry, tmp_path)


def test_peft_adapters_of_every_kind_are_accepted(
    make_test_adapter: AdapterFactory, local_registry: Registry
) -> None:
    """The allowlist keeps what PEFT writes: LoRA, rsLoRA, every module, AdaLoRA."""
    kinds: dict[str, dict[str, Any]] = {
        "lora": {"seed": 21},
        "rslora-all": {"seed": 22, "rank": 16, "use_rslora": True, "target_modules": ALL},
        "mlp-alpha-32": {"seed": 23, "rank": 4, "alpha": 32, "target_modules": MLP},
        "adalora": {"seed": 24, "adalora": True, "target_modules": ALL},
    }
    for name, fields in kinds.items():
        version = local_registry.upload_dir(
            "acme", name, make_test_adapter(**fields), created_by="t"
        )
        assert version.rank == fields.get("rank", 8)


INITS = [
    True,
    False,
    "gaussian",
    "Gaussian",
    "eva",
    "orthogonal",
    "mica",
    "lora_ga",
    "pissa",
    "PiSSA",
    "pissa_niter_4",
    "olora",
    "corda",
    "loftq",
    "true",
    "",
    "random",
]


@pytest.mark.parametrize("init", INITS)
def test_init_lora_weights_accepted_exactly_when_vllm_loads_it(
    local_registry: Registry, adapter_copy: Path, init: object
) -> None:
    """The oracle is vLLM's own check (vllm/lora/peft_helper.py), which refuses at load time."""
    from vllm.lora.peft_helper import PEFTHelper

    config = json.loads((adapter_copy / CONFIG_FILE).read_text())
    helper = PEFTHelper.from_dict({**config, "init_lora_weights": init})
    vllm_loads = not helper._validate_features()
    edit_config(init_lora_weights=init)(adapter_copy)
    if vllm_loads:
        _upload(local_registry, adapter_copy)
    else:
        with pytest.raises(InvalidAdapter, match="init_lora_weights"):
            _upload(local_registry, adapter_copy)


# --- the serving dtype reaches validation -----------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "config_dtype", "expected"),
    [
        ("float32", "float32", "float32"),
        ("float16", "float32", "float16"),
        ("half", "bfloat16", "float16"),
        ("bfloat16", "float32", "bfloat16"),
        ("float", "float16", "float32"),
        ("auto", "bfloat16", "bfloat16"),
        ("auto", "float16", "float16"),
        # vLLM's auto downcasts float32 to the platform's half type: the narrower one is assumed
        ("auto", "float32", "float16"),
        ("auto", None, "float16"),
    ],
)
def test_spec_dtype_from_settings_or_model_config(
    tiny_model: Path, tmp_path: Path, setting: str, config_dtype: str | None, expected: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if config_dtype is not None:
        config["torch_dtype"] = config_dtype
    (model / "config.json").write_text(json.dumps(config))
    assert BaseModelSpec.from_hf_config(model, max_rank=16, dtype=setting).dtype == expected


def test_spec_refuses_an_unknown_dtype(tiny_model: Path) -> None:
    with pytest.raises(InvalidAdapter, match="unknown serving dtype 'int8'"):
        BaseModelSpec.from_hf_config(tiny_model, max_rank=16, dtype="int8")


# --- JSON types in every field: a refusal is always a StoreError, never a crash ---------------

#: One value of every JSON type (and the edges the parser itself trips on).
JSON_VALUES = [
    "null",
    "true",
    "false",
    "0",
    "-1",
    "7",
    HUGE_INT,
    "-" + HUGE_INT,
    "1.5",
    "1e400",
    '""',
    '"F32"',
    '"x"',
    "[]",
    "[1, 2]",
    '["a"]',
    "[[1]]",
    "{}",
    '{"a": 1}',
    '{"dtype": "F32"}',
]
HEADER_FIELDS = ["dtype", "shape", "data_offsets", "entry", "__metadata__"]
#: The (field, value) pairs above that make a valid header: the good adapter is F32.
VALID_HEADER_VALUES = {
    ("dtype", '"F32"'),
    ("__metadata__", "{}"),
    ("__metadata__", '{"dtype": "F32"}'),
}


@pytest.mark.parametrize("raw", JSON_VALUES)
@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_header_field_of_any_json_type_is_refused_cleanly(
    adapter_copy: Path, spec: BaseModelSpec, field: str, raw: str
) -> None:
    raw_weights(header_field(field, raw))(adapter_copy)
    files = {CONFIG_FILE: adapter_copy / CONFIG_FILE, WEIGHTS_FILE: adapter_copy / WEIGHTS_FILE}
    if (field, raw) in VALID_HEADER_VALUES:
        validate_adapter(files, spec, Limits())
        return
    with pytest.raises(InvalidAdapter):
        validate_adapter(files, spec, Limits())


def _config_with(folder: Path, key: str, raw: str) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config[key] = "__VALUE_MARKER__"
    text = json.dumps(config).replace('"__VALUE_MARKER__"', raw)
    (folder / CONFIG_FILE).write_text(text)


CONFIG_KEYS = [
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "base_model_name_or_path",
    "use_rslora",
    "task_type",
    "inference_mode",
    "peft_version",
    "revision",
    "auto_mapping",
    "lora_dropout",
    "init_lora_weights",
    "bias",
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "eva_config",
    "exclude_modules",
    "qalora_group_size",
    "layers_pattern",
    "not_a_peft_key",
]


@pytest.mark.parametrize("raw", JSON_VALUES)
@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_config_field_of_any_json_type_is_refused_cleanly_or_accepted(
    adapter_copy: Path, spec: BaseModelSpec, key: str, raw: str
) -> None:
    _config_with(adapter_copy, key, raw)
    files = {CONFIG_FILE: adapter_copy / CONFIG_FILE, WEIGHTS_FILE: adapter_copy / WEIGHTS_FILE}
    with contextlib.suppress(InvalidAdapter, Incompatible):
        validate_adapter(files, spec, Limits())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from([*HEADER_FIELDS, *(f"config:{k}" for k in CONFIG_KEYS)]), value=JSON)
def test_fuzz_field_types(
    adapter_copy: Path, good_adapter: Path, spec: BaseModelSpec, where: str, value: object
) -> None:
    """Hypothesis: any JSON value in any header field or config key → accepted or a StoreError
    (never TypeError, ValueError, OverflowError...)."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(good_adapter / name, adapter_copy / name)
    raw = json.dumps(value)  # NaN/Infinity become the non-standard constants, also refused
    if where.startswith("config:"):
        _config_with(adapter_copy, where.removeprefix("config:"), raw)
    else:
        raw_weights(header_field(where, raw))(adapter_copy)
    files = {CONFIG_FILE: adapter_copy / CONFIG_FILE, WEIGHTS_FILE: adapter_copy / WEIGHTS_FILE}
    with contextlib.suppress(StoreError):
        validate_adapter(files, spec, Limits())
