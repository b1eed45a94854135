"""The hostile corpus: bad adapters, names, configs and headers, each as a mutation of a copy
of a good PEFT adapter (rank 8, attention modules, F32: `make_test_adapter(seed=1)`).

Used by the store's validation tests (tests/store/test_validate.py: each case refused with its
message, nothing stored) and by the hostile-input tests through the real gRPC server
(tests/faults/test_hostile.py: each case refused with its documented status code).

- `BAD_ADAPTERS`: (id, mutation, expected error class, fragment of the message).
- `BAD_NAMES`: tenant, adapter and alias names that must be refused.
- `JSON_VALUES` x `HEADER_FIELDS` / `CONFIG_KEYS`: every JSON type in every safetensors header
  field and config key; `VALID_HEADER_VALUES` are the pairs that make a valid header.
- `typed_cases()` / `crafted_cases()`: the corpus the gRPC tests upload (the above, wrong types
  in the main config keys, names, aliases, disguised pickles, hostile headers).
- Mutation builders (`edit_config`, `raw_config`, `edit_tensors`, `raw_weights`,
  `header_field`, ...) for cases of a test's own.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from adapter_store import CapacityExceeded, Incompatible, InvalidAdapter, StoreError
from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE

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


# --- JSON types in every field ---------------------------------------------------------------

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


# --- the crafted corpus of the gRPC tests ------------------------------------------------------


def _disguised_zip() -> bytes:
    """A torch.save-style zip holding a pickle, named adapter_model.safetensors."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weights": [1, 2, 3]}))
    return buffer.getvalue()


def _set_weights(data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / WEIGHTS_FILE).write_bytes(data)


#: (id, mutation of a good adapter folder, fields of the header to override)
Case = tuple[str, Callable[[Path], None], dict[str, object]]


def _nothing(folder: Path) -> None:
    pass


#: Values of a wrong JSON type for the main adapter_config.json keys: INVALID_ARGUMENT each.
WRONG_CONFIG_TYPES: dict[str, tuple[object, ...]] = {
    "peft_type": (None, 0, True, [], {}),
    "r": (None, True, "8", 8.0, [], {}),
    "lora_alpha": (None, True, "16", [], {}),
    "target_modules": (None, 0, "q_proj", {}, [1]),
    "base_model_name_or_path": (None, 0, [], {}),
    "use_rslora": (None, 0, "true", []),
    "lora_dropout": (None, True, "0", []),
    "init_lora_weights": (None, 0, [], {}, "pissa"),
    "bias": (0, [], True),
}


def typed_cases() -> Iterator[tuple[str, Callable[[Path], None]]]:
    """Every JSON type in every safetensors header field, and wrong types in config keys."""
    for field in HEADER_FIELDS:
        for index, raw in enumerate(JSON_VALUES):
            if (field, raw) not in VALID_HEADER_VALUES:
                yield f"header-type:{field}:{index}", raw_weights(header_field(field, raw))
    for key, values in WRONG_CONFIG_TYPES.items():
        for index, value in enumerate(values):
            yield f"config-type:{key}:{index}", edit_config(**{key: value})
    yield (
        "config-type:r:huge-int",
        raw_config(b'{"peft_type": "LORA", "r": ' + HUGE_INT.encode() + b"}"),
    )


def crafted_cases() -> Iterator[Case]:
    for case_id, mutation, _, _ in BAD_ADAPTERS:
        yield f"adapter:{case_id}", mutation, {}
    for case_id, mutation in typed_cases():
        yield case_id, mutation, {}
    for i, bad in enumerate(BAD_NAMES):
        yield f"name:{i}", _nothing, {"name": bad}
        yield f"alias:{i}", _nothing, {"aliases": [bad]}
        if bad:  # "" means the caller's own tenant
            yield f"tenant:{i}", _nothing, {"tenant": bad}
    yield "alias:latest-twice", _nothing, {"aliases": ["ok", "ok", "x" * 65]}
    yield "description:huge", _nothing, {"description": "d" * 5000}
    yield "weights:pickle", _set_weights(pickle.dumps({"w": list(range(100))})), {}
    yield "weights:zip-pickle", _set_weights(_disguised_zip()), {}
    yield "weights:empty", _set_weights(b""), {}
    yield "weights:header-length-2^63", raw_weights(lambda d: (2**63).to_bytes(8, "little")), {}
    yield (
        "weights:header-not-json",
        raw_weights(lambda d: (8).to_bytes(8, "little") + b"\xff" * 8),
        {},
    )
    yield "config:deep-nesting", raw_config(b"[" * 30_000 + b"]" * 30_000), {}
    yield "config:huge-int", raw_config(b'{"r": 1' + b"0" * 5000 + b"}"), {}
    yield "config:float-overflow", raw_config(b'{"r": 8, "lora_alpha": 1e400}'), {}
    yield "config:nan", raw_config(b'{"r": 8, "lora_alpha": NaN}'), {}
    yield "config:null", raw_config(b"null"), {}
    yield (
        "config:zero-width-target",
        raw_config(
            json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q\u200bproj"]}).encode()
        ),
        {},
    )
    yield "config:too-big", raw_config(b" " * (70 * 1024) + b"{}"), {}
    yield "header:declared-too-big", _nothing, {"size": 2**40}
    yield "header:wrong-sha", _nothing, {"sha256": "0" * 64}
    yield "header:traversal-filename", _nothing, {"filename": "../" + CONFIG_FILE}
    yield "header:no-files", _nothing, {"files": []}
