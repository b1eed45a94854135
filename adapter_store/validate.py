"""Validation of a PEFT adapter's files against the deployment's base model.

Pure functions: they read the local files they are given and nothing else. Nothing is ever
unpickled; the safetensors header is parsed here (8-byte little-endian length, JSON header) so
that its size, offsets and dtypes are checked before any tensor data is touched.

An adapter is accepted when:

- it consists of `adapter_config.json` and `adapter_model.safetensors`, and optionally
  `chat_template.jinja` (`check_chat_template`: UTF-8 within `max_chat_template_bytes`; that it
  compiles and renders in the gateway's sandbox is checked by the gateway, which the store
  never imports: `Registry.publish`'s `check_template`);
- the config is a UTF-8 JSON object within the size cap whose every key is one the engine supports
  (an allowlist, `_CONFIG_KEYS`: an unknown key is refused by name) with a value of the right type
  and within bounds: `peft_type` is LORA or ADALORA, the rank is within 1..max_rank, `lora_alpha`
  within (0, MAX_LORA_ALPHA], `target_modules` is a list of modules the base model has,
  `base_model_name_or_path` names the deployment's base model, `init_lora_weights` is an init
  vLLM loads (not PiSSA, OLoRA, CorDA, LoftQ: those change the base weights), and every feature
  the engine does not implement (DoRA, biases, rank patterns, ...) is off;
- every tensor is a `lora_A` / `lora_B` (AdaLoRA: also `lora_E`) of a targeted module in a layer
  the model has, in F16, BF16 or F32, with shapes that match the rank and the base model's layer
  sizes, and no NaN or Inf;
- the effective weights are finite and of sane magnitude in the engine's dtype
  (`check_effective_weights`). vLLM folds the scaling s (alpha/r, alpha/sqrt(r) with rsLoRA)
  into lora_B in the serving dtype, so an alpha of 1e300 turns B into Inf and NaN, and NaN
  activations poison other requests (docs/reliability.md, "Hostile tenant: engine poisoning").
  Checked per module, in O(parameters), without forming B·A: max|A| and max|s·B| are finite in
  the dtype, and they and the Cauchy-Schwarz bound |ΔW_ij| = s·|B_i·A_j| <= s·max_i‖B_i,:‖·
  max_j‖A_:,j‖ stay at or below `magnitude_limit(dtype)`: 100, or 65504/1024 = 63.97 in
  float16. What that allows: a module's delta adds at most limit·‖x‖₁ to any entry of its output
  (|Σ_j ΔW_ij x_j| <= max|ΔW|·‖x‖₁), and its rank-r intermediate A·x is at most limit·‖x‖₁ per
  entry too.

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

from adapter_store.errors import Incompatible, InvalidAdapter
from adapter_store.model import (
    ADAPTER_FILES,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    DTYPE_MAX,
    MODULE_PARENTS,
    VERSION_FILES,
    WEIGHTS_FILE,
    BaseModelSpec,
    Limits,
)
from adapter_store.rewrite import (
    Array,
    ModuleKey,
    Tensors,
    group_modules,
    lora_scaling,
    normalise_adalora,
    parse_tensor_name,
    tensor_name,
)

__all__ = [
    "DTYPE_HEADROOM",
    "MAX_LORA_ALPHA",
    "MAX_WEIGHT_MAGNITUDE",
    "SUPPORTED_INITS",
    "TensorInfo",
    "ValidatedAdapter",
    "check_chat_template",
    "check_effective_weights",
    "load_tensors",
    "magnitude_limit",
    "parse_config",
    "read_safetensors_header",
    "serialise_tensors",
    "validate_adapter",
]

#: Largest `lora_alpha` accepted. PEFT's default is 8, published adapters use up to a few
#: thousand; beyond this it can only be a mistake or an attack.
MAX_LORA_ALPHA = 65536.0
#: Largest entry of A, s·B and (bounded) ΔW = s·B·A accepted. Trained adapters stay far below 1.
MAX_WEIGHT_MAGNITUDE = 100.0
#: Effective weights also stay this factor below the serving dtype's largest value, so that
#: the delta of one module stays finite for inputs with ‖x‖₁ up to this factor (float16: 63.97).
DTYPE_HEADROOM = 1024.0
#: `init_lora_weights` strings vLLM loads (vllm/lora/peft_helper.py `_init_is_supported`):
#: they only set the initial adapter weights. PiSSA, OLoRA, CorDA, LoftQ and the other inits
#: change the base weights when PEFT loads the adapter, and vLLM refuses them at load.
SUPPORTED_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
#: PEFT task types (peft.TaskType); any of them serves as a causal-LM adapter here.
_TASK_TYPES = frozenset(
    {
        "CAUSAL_LM",
        "SEQ_CLS",
        "SEQ_2_SEQ_LM",
        "TOKEN_CLS",
        "QUESTION_ANS",
        "FEATURE_EXTRACTION",
    }
)
_MAX_INT = 2**31 - 1

#: dtype -> (bytes per element, exponent mask, unsigned integer view) for the accepted dtypes.
_DTYPES: dict[str, tuple[int, int, str]] = {
    "F16": (2, 0x7C00, "<u2"),
    "BF16": (2, 0x7F80, "<u2"),
    "F32": (4, 0x7F800000, "<u4"),
}


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
    #: The text of its chat_template.jinja (None: it has none).
    chat_template: str | None = None


def validate_adapter(
    files: Mapping[str, Path], spec: BaseModelSpec, limits: Limits
) -> ValidatedAdapter:
    """Check an adapter's files; raise InvalidAdapter or Incompatible saying what is wrong."""
    _check_file_set(files.keys())
    template = None
    if CHAT_TEMPLATE_FILE in files:
        with files[CHAT_TEMPLATE_FILE].open("rb") as f:
            template = check_chat_template(f.read(limits.max_chat_template_bytes + 1), limits)
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
        with np.errstate(over="ignore"):  # an overflow to Inf is refused just below
            new_tensors, new_config = normalise_adalora(tensors, config)
        # The normalised A carries E and alpha/(r+eps); its scaling is 1.
        check_effective_weights(
            new_tensors, alpha=info.alpha, rank=info.rank, scaling=1.0, dtype=spec.dtype
        )
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
            chat_template=template,
        )
    check_effective_weights(
        tensors,
        alpha=info.alpha,
        rank=info.rank,
        scaling=lora_scaling(info.alpha, info.rank, info.use_rslora),
        dtype=spec.dtype,
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
        chat_template=template,
    )


def check_chat_template(data: bytes, limits: Limits) -> str:
    """The text of a chat_template.jinja: UTF-8 (strict), not empty, at most
    `limits.max_chat_template_bytes`; InvalidAdapter saying what is wrong otherwise. Whether it
    compiles and renders is the gateway's check (its sandbox)."""
    cap = limits.max_chat_template_bytes
    if len(data) > cap:
        raise InvalidAdapter(
            f"{CHAT_TEMPLATE_FILE} is larger than the cap of {cap} bytes (chat_template_max_bytes)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidAdapter(
            f"{CHAT_TEMPLATE_FILE} is not UTF-8 (byte {exc.start} cannot be decoded)"
        ) from None
    if not text.strip():
        raise InvalidAdapter(f"{CHAT_TEMPLATE_FILE} is empty")
    return text


def _module_of(name: str) -> str:
    parsed = parse_tensor_name(name)
    assert parsed is not None  # names were checked by _check_tensors
    return parsed[0].module


def _check_file_set(names: Iterable[str]) -> None:
    given = sorted(names)
    for name in given:
        if name not in VERSION_FILES:
            raise InvalidAdapter(
                f"unsupported file {name[:80]!r}: an adapter is {CONFIG_FILE} and "
                f"{WEIGHTS_FILE}, and optionally {CHAT_TEMPLATE_FILE} (.bin, .pt and other "
                "pickle formats are never loaded)"
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


def _show(value: object) -> str:
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not _is_int(value):
        raise InvalidAdapter(f"{key} must be an integer, got {_show(value)}")
    assert isinstance(value, int)
    return value


# --- the allowlist of adapter_config.json keys -----------------------------------------------
#
# Each key maps to a check of its value (raising InvalidAdapter that names the key). A key not
# listed is refused by name: the engine would ignore it, and an ignored setting can change what
# the adapter means (a new PEFT feature, a typo of a known one).

_Check = Callable[[str, object], None]


def _same(value: object, default: object) -> bool:
    """Equal and of the same JSON type (so that 0 is not taken for false)."""
    return type(value) is type(default) and value == default


def _off(feature: str, *defaults: object) -> _Check:
    """The feature must be off: the value is one of its harmless defaults."""
    allowed = defaults or (None, False)

    def check(key: str, value: object) -> None:
        if not any(_same(value, default) for default in allowed):
            raise InvalidAdapter(
                f"unsupported adapter feature: {feature} ({key}={_show(value)}); the engine "
                "does not implement it"
            )

    return check


def _checked_elsewhere(key: str, value: object) -> None:
    """Validated by `_check_config` (rank, alpha, targets, base model, rsLoRA)."""


def _boolean(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidAdapter(f"{key} must be true or false, got {_show(value)}")


def _short_text(limit: int, *, nullable: bool = True) -> _Check:
    def check(key: str, value: object) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, str) or len(value) > limit:
            raise InvalidAdapter(f"{key} must be a string of at most {limit} characters")

    return check


def _number_in(low: float, high: float, *, integer: bool = False, nullable: bool = False) -> _Check:
    """A JSON number (an integer when `integer`) within [low, high]."""

    def check(key: str, value: object) -> None:
        if value is None and nullable:
            return
        kind = "an integer" if integer else "a number"
        if not (_is_int(value) if integer else _is_number(value)):
            raise InvalidAdapter(f"{key} must be {kind}, got {_show(value)}")
        assert isinstance(value, int | float)
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidAdapter(f"{key}={str(value)[:40]} is out of range [{low:g}, {high:g}]")

    return check


def _task_type(key: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or value not in _TASK_TYPES):
        raise InvalidAdapter(
            f"{key} must be one of {', '.join(sorted(_TASK_TYPES))} or null, got {_show(value)}"
        )


def _init_lora_weights(key: str, value: object) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, str) and value.lower() in SUPPORTED_INITS:
        return
    raise InvalidAdapter(
        f"unsupported adapter feature: {key}={_show(value)}; inits such as PiSSA, OLoRA, CorDA "
        "and LoftQ change the base model's weights, which the engine serves unchanged (convert "
        "the adapter to a plain LoRA with PEFT's path_initial_model_for_weight_conversion). "
        f"Accepted: true, false, {', '.join(sorted(SUPPORTED_INITS))}"
    )


def _string_map(key: str, value: object) -> None:
    """Metadata such as auto_mapping: null or a small object of strings."""
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > 16:
        raise InvalidAdapter(f"{key} must be null or an object of strings, got {_show(value)}")
    for item in value.values():
        if item is not None and (not isinstance(item, str) or len(item) > 256):
            raise InvalidAdapter(f"{key} must be null or an object of strings")


def _init_settings(key: str, value: object) -> None:
    """eva_config, corda_config, lora_ga_config: settings of an init that already ran. They
    do not change the saved weights' meaning (the init itself is checked by
    init_lora_weights), so null or an object is accepted and ignored."""
    if value is not None and not isinstance(value, dict):
        raise InvalidAdapter(f"{key} must be null or an object, got {_show(value)}")


def _module_names(key: str, value: object) -> None:
    """exclude_modules: which modules training skipped; the tensors say what is adapted."""
    if value is None or (isinstance(value, str) and len(value) <= 256):
        return
    if (
        not isinstance(value, list)
        or len(value) > 256
        or not all(isinstance(v, str) and len(v) <= 256 for v in value)
    ):
        raise InvalidAdapter(f"{key} must be null, a string or a list of strings")


_NOTHING: tuple[object, ...] = (None, False, [], {}, "")
_LORA_KEYS: dict[str, _Check] = {
    # identity and the values the engine uses (checked by _check_config)
    "peft_type": _checked_elsewhere,
    "r": _checked_elsewhere,
    "lora_alpha": _checked_elsewhere,
    "target_modules": _checked_elsewhere,
    "base_model_name_or_path": _checked_elsewhere,
    "use_rslora": _checked_elsewhere,
    # metadata, ignored by the engine
    "task_type": _task_type,
    "inference_mode": _boolean,
    "peft_version": _short_text(64),
    "revision": _short_text(256),
    "auto_mapping": _string_map,
    "megatron_core": _short_text(256),
    "ensure_weight_tying": _boolean,  # only acts with modules_to_save / trainable tokens
    "exclude_modules": _module_names,
    # training-only settings, bounded
    "lora_dropout": _number_in(0.0, 1.0),
    "init_lora_weights": _init_lora_weights,
    "eva_config": _init_settings,
    "corda_config": _init_settings,
    "lora_ga_config": _init_settings,
    "qalora_group_size": _number_in(1, 65536, integer=True),
    # features the engine does not implement: must be off
    "bias": _off("trained biases (bias must be 'none')", "none", None),
    "use_dora": _off("DoRA (use_dora)"),
    "lora_bias": _off("LoRA bias terms (lora_bias)"),
    "fan_in_fan_out": _off("transposed weights (fan_in_fan_out)"),
    "modules_to_save": _off("extra trained modules (modules_to_save)", None, []),
    "layers_to_transform": _off("a subset of layers (layers_to_transform)", None, []),
    "layers_pattern": _off("a layer pattern (layers_pattern)", None, [], ""),
    "layer_replication": _off("layer replication (layer_replication)", None, []),
    "rank_pattern": _off("per-module ranks (rank_pattern)", None, {}),
    "alpha_pattern": _off("per-module alphas (alpha_pattern)", None, {}),
    "loftq_config": _off("LoftQ quantisation (loftq_config)", None, {}),
    "target_parameters": _off("parameter targeting (target_parameters)", None, []),
    "trainable_token_indices": _off("trainable tokens (trainable_token_indices)", None, [], {}),
    "alora_invocation_tokens": _off("activated LoRA (alora_invocation_tokens)", None, []),
    "use_qalora": _off("QALoRA (use_qalora)"),
    "use_bdlora": _off("BD-LoRA (use_bdlora)", *_NOTHING),
    "megatron_config": _off("Megatron layers (megatron_config)", None, {}),
    "arrow_config": _off("Arrow routing (arrow_config)", None, {}),
    "monteclora_config": _off("MonteCLoRA (monteclora_config)", None, {}),
    "velora_config": _off("VeLoRA (velora_config)", None, {}),
    "kasa_config": _off("KaSA (kasa_config)", None, {}),
}
#: AdaLoRA's own keys (its rank is init_r; its r is unused); the training schedule is bounded.
_ADALORA_KEYS: dict[str, _Check] = {
    **_LORA_KEYS,
    "init_r": _checked_elsewhere,
    "r": _number_in(1, 65536, integer=True),
    "target_r": _number_in(1, 65536, integer=True),
    "tinit": _number_in(0, _MAX_INT, integer=True),
    "tfinal": _number_in(0, _MAX_INT, integer=True),
    "deltaT": _number_in(1, _MAX_INT, integer=True),
    "beta1": _number_in(0.0, 1.0),
    "beta2": _number_in(0.0, 1.0),
    "orth_reg_weight": _number_in(0.0, 1e6),
    "total_step": _number_in(1, _MAX_INT, integer=True, nullable=True),
}
_CONFIG_KEYS = {"LORA": _LORA_KEYS, "ADALORA": _ADALORA_KEYS}


def _check_config(config: Mapping[str, Any], spec: BaseModelSpec) -> _ConfigInfo:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in _CONFIG_KEYS:
        raise InvalidAdapter(f"peft_type {_show(peft_type)} is not supported (LORA or ADALORA)")
    allowed = _CONFIG_KEYS[peft_type]
    unknown = sorted(key for key in config if key not in allowed)
    if unknown:
        raise InvalidAdapter(
            f"unknown {CONFIG_FILE} key(s) {', '.join(repr(k[:60]) for k in unknown[:5])}: "
            f"the engine supports only the known {peft_type} settings"
        )
    for key, value in config.items():
        allowed[key](key, value)

    rank_key = "init_r" if peft_type == "ADALORA" else "r"
    rank = _int(config, rank_key)
    if rank < 1:
        raise InvalidAdapter(f"{rank_key}={rank} is out of range: the rank must be at least 1")
    if rank > spec.max_rank:
        raise Incompatible(
            f"{rank_key}={rank} exceeds this deployment's maximum rank {spec.max_rank}"
        )

    alpha = config.get("lora_alpha")
    if not _is_number(alpha):
        raise InvalidAdapter(f"lora_alpha must be a number, got {_show(alpha)}")
    assert isinstance(alpha, int | float)
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


# --- effective weights ----------------------------------------------------------------------


def magnitude_limit(dtype: str) -> float:
    """The largest entry of A, s·B and the ΔW bound accepted for a serving dtype."""
    return min(MAX_WEIGHT_MAGNITUDE, DTYPE_MAX[dtype] / DTYPE_HEADROOM)


def check_effective_weights(
    tensors: Mapping[str, Array], *, alpha: float, rank: int, scaling: float, dtype: str
) -> None:
    """Refuse effective weights that are not finite, or too large, in the serving `dtype`.

    `tensors` are plain LoRA A/B pairs (float32); `scaling` is what vLLM folds into lora_B
    (alpha/r, alpha/sqrt(r) with rsLoRA; 1 for normalised AdaLoRA). See the module docstring.
    """
    if not alpha <= MAX_LORA_ALPHA:
        raise InvalidAdapter(
            f"lora_alpha={alpha:g} is out of range (0, {MAX_LORA_ALPHA:g}]: the scaling "
            f"alpha/r={alpha / rank:.3g} would make the effective weights too large"
        )
    largest, limit = DTYPE_MAX[dtype], magnitude_limit(dtype)
    what = f"(scaling {scaling:.3g} from lora_alpha={alpha:g}, r={rank}; serving dtype {dtype})"
    for key, parts in sorted(group_modules(tensors).items()):
        a = np.abs(parts["A"].astype(np.float64))
        b = np.abs(parts["B"].astype(np.float64)) * abs(scaling)
        module = tensor_name(key, "A")[: -len(".lora_A.weight")]
        for label, values in (("lora_A", a), ("scaling·lora_B", b)):
            peak = float(values.max(initial=0.0))
            if not peak <= largest:
                raise InvalidAdapter(
                    f"{module}: |{label}| reaches {peak:.3g}, which overflows {dtype} (largest "
                    f"finite value {largest:.5g}) {what}"
                )
            if peak > limit:
                raise InvalidAdapter(
                    f"{module}: |{label}| reaches {peak:.3g}, above the weight magnitude limit "
                    f"{limit:.4g} for {dtype} {what}"
                )
        # |ΔW_ij| = |Σ_k (sB)_ik A_kj| <= ‖(sB)_i,:‖₂ ‖A_:,j‖₂ (Cauchy-Schwarz), never forming B·A.
        bound = float(np.sqrt((b * b).sum(axis=1)).max(initial=0.0)) * float(
            np.sqrt((a * a).sum(axis=0)).max(initial=0.0)
        )
        if not bound <= limit:
            raise InvalidAdapter(
                f"{module}: the effective weight delta |scaling·B·A| may reach {bound:.3g}, "
                f"above the weight magnitude limit {limit:.4g} for {dtype} {what}"
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
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, and the interpreter's cap on integer digits (a
        # 5,000-digit number), which is no JSONDecodeError.
        raise InvalidAdapter(
            f"{WEIGHTS_FILE} header is not valid UTF-8 JSON: {str(exc)[:120]}"
        ) from None
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
    if not isinstance(dtype, str) or dtype not in _DTYPES:
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
