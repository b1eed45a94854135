"""Validation of a PEFT adapter's two files against the deployment's base model.

Pure functions: they read the local files they are given and nothing else. Nothing is ever
unpickled; the safetensors header is parsed here (8-byte little-endian length, JSON header) so
that its size, offsets and dtypes are checked before any tensor data is touched.

An adapter is accepted when:

- it consists of exactly `adapter_config.json` and `adapter_model.safetensors`;
- the config is a UTF-8 JSON object within the size cap, `peft_type` is LORA or ADALORA, the rank
  is within 1..max_rank, `target_modules` is a list of modules the base model has,
  `base_model_name_or_path` names the deployment's base model, and no unsupported feature is set;
- every tensor is a `lora_A` / `lora_B` (AdaLoRA: also `lora_E`) of a targeted module in a layer
  the model has, in F16, BF16 or F32, with shapes that match the rank and the base model's layer
  sizes, and no NaN or Inf.

AdaLoRA adapters come back normalised to plain LoRA (`ValidatedAdapter.rewritten`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors

from adapter_store.compose import (
    Array,
    ModuleKey,
    Tensors,
    normalise_adalora,
    parse_tensor_name,
    tensor_name,
)
from adapter_store.errors import Incompatible, InvalidAdapter
from adapter_store.model import (
    ADAPTER_FILES,
    CONFIG_FILE,
    MODULE_PARENTS,
    WEIGHTS_FILE,
    BaseModelSpec,
    Limits,
)

__all__ = [
    "TensorInfo",
    "ValidatedAdapter",
    "load_tensors",
    "parse_config",
    "read_safetensors_header",
    "serialise_tensors",
    "validate_adapter",
]

#: dtype -> (bytes per element, exponent mask, unsigned integer view) for the accepted dtypes.
_DTYPES: dict[str, tuple[int, int, str]] = {
    "F16": (2, 0x7C00, "<u2"),
    "BF16": (2, 0x7F80, "<u2"),
    "F32": (4, 0x7F800000, "<u4"),
}


def _is_set(value: object) -> bool:
    return value not in (None, False, "", [], {})


# config key -> (is it set to something other than its harmless default?, what the feature is)
_UNSUPPORTED: tuple[tuple[str, Callable[[object], bool], str], ...] = (
    ("use_dora", _is_set, "DoRA (use_dora)"),
    ("bias", lambda v: v not in (None, "none"), "trained biases (bias must be 'none')"),
    ("modules_to_save", _is_set, "extra trained modules (modules_to_save)"),
    ("layers_to_transform", _is_set, "a subset of layers (layers_to_transform)"),
    ("layers_pattern", _is_set, "a layer pattern (layers_pattern)"),
    ("layer_replication", _is_set, "layer replication (layer_replication)"),
    ("lora_bias", _is_set, "LoRA bias terms (lora_bias)"),
    ("fan_in_fan_out", _is_set, "transposed weights (fan_in_fan_out)"),
    ("loftq_config", _is_set, "LoftQ quantisation (loftq_config)"),
    ("target_parameters", _is_set, "parameter targeting (target_parameters)"),
    ("trainable_token_indices", _is_set, "trainable tokens (trainable_token_indices)"),
    ("alora_invocation_tokens", _is_set, "activated LoRA (alora_invocation_tokens)"),
    ("rank_pattern", _is_set, "per-module ranks (rank_pattern)"),
    ("alpha_pattern", _is_set, "per-module alphas (alpha_pattern)"),
    ("use_qalora", _is_set, "QALoRA (use_qalora)"),
    ("use_bdlora", _is_set, "BD-LoRA (use_bdlora)"),
    ("megatron_config", _is_set, "Megatron layers (megatron_config)"),
    ("arrow_config", _is_set, "Arrow routing (arrow_config)"),
    ("monteclora_config", _is_set, "MonteCLoRA (monteclora_config)"),
    ("velora_config", _is_set, "VeLoRA (velora_config)"),
    ("kasa_config", _is_set, "KaSA (kasa_config)"),
)


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ValidatedAdapter:
    """What validation found out about an adapter, as it will be stored."""

    #: The uploaded adapter's type ("LORA" or "ADALORA"); stored versions are always LORA.
    peft_type: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    dtype: str
    base_model: str
    #: The adapter_config.json as it will be stored.
    config: dict[str, Any]
    #: New contents of files that were rewritten (AdaLoRA normalised to LoRA); else empty.
    rewritten: dict[str, bytes] = field(default_factory=dict)


def validate_adapter(
    files: Mapping[str, Path], spec: BaseModelSpec, limits: Limits
) -> ValidatedAdapter:
    """Check an adapter's files; raise InvalidAdapter or Incompatible saying what is wrong."""
    _check_file_set(files.keys())
    with files[CONFIG_FILE].open("rb") as f:
        config = parse_config(f.read(limits.max_config_bytes + 1), limits)
    info = _check_config(config, spec)
    path = files[WEIGHTS_FILE]
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} is {size} bytes, above the cap of {limits.max_file_bytes}"
        )
    header, data_start = read_safetensors_header(path, limits)
    dtype = _check_tensors(header, info, spec)
    tensors = load_tensors(path, limits, header=(header, data_start))
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise InvalidAdapter(f"tensor {name!r} contains NaN or Inf values")

    if info.peft_type == "ADALORA":
        new_tensors, new_config = normalise_adalora(tensors, config)
        return ValidatedAdapter(
            peft_type="ADALORA",
            rank=info.rank,
            alpha=float(new_config["lora_alpha"]),
            target_modules=tuple(new_config["target_modules"]),
            use_rslora=False,
            dtype="F32",
            base_model=info.base_model,
            config=new_config,
            rewritten={
                CONFIG_FILE: json.dumps(new_config, indent=2, sort_keys=True).encode(),
                WEIGHTS_FILE: serialise_tensors(new_tensors),
            },
        )
    modules = sorted({_module_of(name) for name in header})
    return ValidatedAdapter(
        peft_type="LORA",
        rank=info.rank,
        alpha=info.alpha,
        target_modules=tuple(modules),
        use_rslora=info.use_rslora,
        dtype=dtype,
        base_model=info.base_model,
        config=config,
    )


def _module_of(name: str) -> str:
    parsed = parse_tensor_name(name)
    assert parsed is not None  # names were checked by _check_tensors
    return parsed[0].module


def _check_file_set(names: Iterable[str]) -> None:
    given = sorted(names)
    for name in given:
        if name not in ADAPTER_FILES:
            raise InvalidAdapter(
                f"unsupported file {name[:80]!r}: an adapter is exactly {CONFIG_FILE} and "
                f"{WEIGHTS_FILE} (.bin, .pt and other pickle formats are never loaded)"
            )
    for name in ADAPTER_FILES:
        if name not in given:
            raise InvalidAdapter(f"missing file {name}")


# --- adapter_config.json --------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidAdapter(f"duplicate JSON key {key[:80]!r}")
        result[key] = value
    return result


def _no_constants(token: str) -> Any:
    raise InvalidAdapter(f"JSON contains the non-standard constant {token}")


def parse_config(data: bytes, limits: Limits) -> dict[str, Any]:
    """Parse adapter_config.json bytes: UTF-8, size-capped, a JSON object."""
    if len(data) > limits.max_config_bytes:
        raise InvalidAdapter(
            f"{CONFIG_FILE} is larger than the cap of {limits.max_config_bytes} bytes"
        )
    try:
        text = data.decode("utf-8")
        config = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise InvalidAdapter(f"{CONFIG_FILE} is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, and also the interpreter's cap on integer digits
        # (a 5,000-digit number), which is no JSONDecodeError.
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object, got {type(config).__name__}")
    return config


@dataclass(frozen=True)
class _ConfigInfo:
    peft_type: str
    rank: int
    alpha: float
    target_modules: frozenset[str]
    use_rslora: bool
    base_model: str


def _int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidAdapter(f"{key} must be an integer, got {_show(value)}")
    return value


def _show(value: object) -> str:
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _check_config(config: Mapping[str, Any], spec: BaseModelSpec) -> _ConfigInfo:
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "ADALORA"):
        raise InvalidAdapter(f"peft_type {_show(peft_type)} is not supported (LORA or ADALORA)")
    for key, is_set, feature in _UNSUPPORTED:
        if key in config and is_set(config[key]):
            raise InvalidAdapter(f"unsupported adapter feature: {feature}")

    rank_key = "init_r" if peft_type == "ADALORA" else "r"
    rank = _int(config, rank_key)
    if rank < 1:
        raise InvalidAdapter(f"{rank_key}={rank} is out of range: the rank must be at least 1")
    if rank > spec.max_rank:
        raise Incompatible(
            f"{rank_key}={rank} exceeds this deployment's maximum rank {spec.max_rank}"
        )

    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidAdapter(f"lora_alpha must be a number, got {_show(alpha)}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapter(f"lora_alpha must be a positive finite number, got {alpha}")

    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise InvalidAdapter(f"use_rslora must be true or false, got {_show(use_rslora)}")
    if use_rslora and peft_type == "ADALORA":
        raise InvalidAdapter("use_rslora is not supported together with ADALORA")

    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise InvalidAdapter(
            "target_modules must be a list of module names; a regular expression or "
            f"'all-linear' string is not supported (got {targets[:60]!r})"
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter(
            f"target_modules must be a non-empty list of names, got {_show(targets)}"
        )
    for target in targets:
        if target not in spec.module_shapes:
            raise Incompatible(
                f"target module {target[:60]!r} does not exist in the base model "
                f"(it has {', '.join(sorted(spec.module_shapes))})"
            )

    base_model = config.get("base_model_name_or_path")
    if not isinstance(base_model, str) or not base_model:
        raise InvalidAdapter(
            f"base_model_name_or_path must be a non-empty string, got {_show(base_model)}"
        )
    if not spec.accepts(base_model):
        raise Incompatible(
            f"adapter was trained for base model {base_model[:120]!r}, but this deployment "
            f"serves {spec.name!r}"
        )
    return _ConfigInfo(
        peft_type=str(peft_type),
        rank=rank,
        alpha=float(alpha),
        target_modules=frozenset(targets),
        use_rslora=use_rslora,
        base_model=base_model,
    )


# --- adapter_model.safetensors ----------------------------------------------------------------


def read_safetensors_header(path: Path, limits: Limits) -> tuple[dict[str, TensorInfo], int]:
    """Parse and check a safetensors header; return the tensors and where their data starts."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is truncated: no header")
        length = int.from_bytes(prefix, "little")
        if length > limits.max_header_bytes:
            raise InvalidAdapter(
                f"{WEIGHTS_FILE} header of {length} bytes exceeds the cap of "
                f"{limits.max_header_bytes} bytes"
            )
        if 8 + length > size:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is truncated: header runs past the end of file")
        raw = f.read(length)
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidAdapter(f"{WEIGHTS_FILE} header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{WEIGHTS_FILE} header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidAdapter(f"{WEIGHTS_FILE} __metadata__ must map strings to strings")
    if not header:
        raise InvalidAdapter(f"{WEIGHTS_FILE} contains no tensors")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(name, entry)
    expected = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != expected:
            raise InvalidAdapter(
                f"{WEIGHTS_FILE} data offsets are not contiguous at {info.name[:120]!r}"
            )
        expected = info.end
    data_start = 8 + length
    if data_start + expected != size:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} is truncated or has trailing bytes: header describes "
            f"{data_start + expected} bytes, file has {size}"
        )
    return tensors, data_start


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidAdapter(f"malformed header entry for tensor {name[:120]!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise InvalidAdapter(
            f"tensor {name[:120]!r} has dtype {str(dtype)[:20]}; "
            "only F16, BF16 and F32 are accepted"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidAdapter(f"tensor {name[:120]!r} has a malformed shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise InvalidAdapter(f"tensor {name[:120]!r} has malformed data offsets")
    begin, end = offsets
    itemsize = _DTYPES[dtype][0]
    if end < begin or end - begin != math.prod(shape) * itemsize:
        raise InvalidAdapter(
            f"tensor {name[:120]!r}: data offsets do not match its shape and dtype"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensors(header: Mapping[str, TensorInfo], info: _ConfigInfo, spec: BaseModelSpec) -> str:
    """Check names, modules, layers and shapes; return the adapter's single dtype."""
    adalora = info.peft_type == "ADALORA"
    parts_needed = {"A", "B", "E"} if adalora else {"A", "B"}
    seen: dict[ModuleKey, set[str]] = {}
    dtypes = set()
    for name, tensor in header.items():
        parsed = parse_tensor_name(name)
        if parsed is None or parsed[2] == adalora or parsed[1] not in parts_needed:
            example = "lora_A" if adalora else "lora_A.weight"
            raise InvalidAdapter(
                f"unexpected tensor {name[:120]!r}: only {info.peft_type} weights named "
                f"base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.{example} are accepted"
            )
        key, part, _ = parsed
        if key.module not in spec.module_shapes or MODULE_PARENTS.get(key.module) is None:
            raise Incompatible(
                f"tensor {name[:120]!r}: the base model has no module {key.module!r}"
            )
        if MODULE_PARENTS[key.module] != key.parent:
            raise InvalidAdapter(f"tensor {name[:120]!r}: {key.module} is not under {key.parent}")
        if key.layer >= spec.num_layers:
            raise Incompatible(
                f"tensor {name[:120]!r}: layer {key.layer} does not exist (the base model has "
                f"{spec.num_layers} layers)"
            )
        if key.module not in info.target_modules:
            raise InvalidAdapter(
                f"tensor {name[:120]!r}: module {key.module} is not in target_modules"
            )
        in_features, out_features = spec.module_shapes[key.module]
        expected = {
            "A": (info.rank, in_features),
            "B": (out_features, info.rank),
            "E": (info.rank, 1),
        }
        want = expected[part]
        if len(tensor.shape) != 2:
            raise InvalidAdapter(
                f"tensor {name[:120]!r} must be 2-dimensional, has shape {list(tensor.shape)}"
            )
        rank_axis = 1 if part == "B" else 0
        if tensor.shape[rank_axis] != info.rank:
            raise InvalidAdapter(
                f"rank mismatch: config says r={info.rank} but tensor {name[:120]!r} has shape "
                f"{list(tensor.shape)}"
            )
        if tensor.shape != want:
            raise Incompatible(
                f"tensor {name[:120]!r} has shape {list(tensor.shape)}, "
                f"the base model needs {list(want)}"
            )
        seen.setdefault(key, set()).add(part)
        dtypes.add(tensor.dtype)
    for key, parts in sorted(seen.items()):
        missing = parts_needed - parts
        if missing:
            raise InvalidAdapter(f"missing lora_{min(missing)} for {tensor_name(key, 'A')[:-16]}")
    if len(dtypes) != 1:
        raise InvalidAdapter(f"tensors mix dtypes {sorted(dtypes)}; use a single dtype")
    return dtypes.pop()


def load_tensors(
    path: Path, limits: Limits, *, header: tuple[dict[str, TensorInfo], int] | None = None
) -> Tensors:
    """Read every tensor of a (header-checked) safetensors file as float32 numpy arrays."""
    tensors_info, data_start = header or read_safetensors_header(path, limits)
    out: Tensors = {}
    with path.open("rb") as f:
        for info in tensors_info.values():
            f.seek(data_start + info.begin)
            raw = f.read(info.end - info.begin)
            if len(raw) != info.end - info.begin:
                raise InvalidAdapter(f"{WEIGHTS_FILE} is truncated at tensor {info.name[:120]!r}")
            out[info.name] = _decode(raw, info)
    return out


def _decode(raw: bytes, info: TensorInfo) -> Array:
    _, exponent_mask, view = _DTYPES[info.dtype]
    bits = np.frombuffer(raw, dtype=view)
    if bool(((bits & exponent_mask) == exponent_mask).any()):
        raise InvalidAdapter(f"tensor {info.name[:120]!r} contains NaN or Inf values")
    if info.dtype == "F32":
        values = bits.view("<f4")
    elif info.dtype == "F16":
        values = bits.view("<f2").astype(np.float32)
    else:  # BF16: the high half of a float32
        values = (bits.astype(np.uint32) << 16).view("<f4")
    return values.astype(np.float32).reshape(info.shape)


def serialise_tensors(tensors: Mapping[str, Array]) -> bytes:
    """A safetensors file (F32) of `tensors`, in a stable order."""
    ordered = {
        name: np.ascontiguousarray(tensors[name], dtype=np.float32) for name in sorted(tensors)
    }
    return bytes(save_safetensors(ordered, metadata={"format": "pt"}))
