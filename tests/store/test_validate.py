"""Bad adapters, configs and names are refused with a message that says what is wrong, and
nothing is stored. Each case mutates a copy of a good PEFT adapter."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapter_store import (
    CapacityExceeded,
    FileEntry,
    Incompatible,
    InvalidAdapter,
    Registry,
    StoreError,
)
from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE
from adapter_store.store import sha256_file

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
