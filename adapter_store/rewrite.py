"""Exact rewrites of LoRA weights: AdaLoRA -> plain LoRA, and weighted composition.

A LoRA module adds `delta = scaling * B @ A` to a base weight, where scaling is alpha / r
(alpha / sqrt(r) with rsLoRA). Both rewrites below fold every scalar into A and emit a plain
LoRA adapter whose `lora_alpha == r` (so its scaling is 1) and `use_rslora` is false:

- AdaLoRA (PEFT `adalora/layer.py`): delta = B @ (A * E) * lora_alpha / (ranknum + 1e-5), with
  ranknum = r. Folding gives A' = (A * E) * lora_alpha / (r + 1e-5).
- Composition of parts i with weights w_i: stacking A' = [w_i * s_i * A_i] (rows) and placing
  B' = [B_i] side by side gives B' @ A' = sum_i w_i * s_i * B_i @ A_i, the weighted sum of the
  parts' deltas, at rank sum_i r_i. A module absent from a part contributes zero rows/columns.

Arithmetic is done in float64 and stored as float32.

`plan_composition` + `write_composition` compute a composition from the parts' files one module
at a time (for the store's ComposeAdapter, adapter_store.compose): the result's header and size
come from the parts' headers before any tensor is read, and memory holds one module of each part
at once. `compose` does the same on tensors already in memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from adapter_store.errors import InvalidAdapter

__all__ = [
    "CompositionPlan",
    "ModuleKey",
    "Tensors",
    "compose",
    "group_modules",
    "lora_scaling",
    "normalise_adalora",
    "parse_tensor_name",
    "plain_lora_config",
    "plan_composition",
    "tensor_name",
    "write_composition",
]

Array = npt.NDArray[Any]
Tensors = dict[str, Array]

_TENSOR_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(0|[1-9][0-9]{0,5})\.(self_attn|mlp)\."
    r"([a-z_]{1,32})\.lora_([ABE])(\.weight)?$"
)
#: PEFT AdaLoRA's constant in `scaling / (ranknum + 1e-5)`.
_ADALORA_EPS = 1e-5


@dataclass(frozen=True, order=True)
class ModuleKey:
    """One adapted linear layer: decoder layer index, submodule and module name."""

    layer: int
    parent: str
    module: str


def parse_tensor_name(name: str) -> tuple[ModuleKey, str, bool] | None:
    """(module, "A"|"B"|"E", has ".weight" suffix) for a PEFT LoRA tensor name, else None."""
    match = _TENSOR_RE.fullmatch(name)
    if match is None:
        return None
    layer, parent, module, part, weight = match.groups()
    return ModuleKey(int(layer), parent, module), part, weight is not None


def tensor_name(key: ModuleKey, part: str) -> str:
    """The PEFT LoRA tensor name of `part` ("A" or "B") of module `key`."""
    return f"base_model.model.model.layers.{key.layer}.{key.parent}.{key.module}.lora_{part}.weight"


def group_modules(tensors: Mapping[str, Array]) -> dict[ModuleKey, dict[str, Array]]:
    """Tensors grouped by module: {ModuleKey: {"A": ..., "B": ..., ["E": ...]}}."""
    grouped: dict[ModuleKey, dict[str, Array]] = {}
    for name, array in tensors.items():
        parsed = parse_tensor_name(name)
        if parsed is None:
            raise InvalidAdapter(f"unexpected tensor name {name[:120]!r}")
        key, part, _ = parsed
        grouped.setdefault(key, {})[part] = array
    return grouped


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def plain_lora_config(
    *, rank: int, target_modules: Sequence[str], base_model: str, task_type: object = "CAUSAL_LM"
) -> dict[str, Any]:
    """A minimal PEFT LoraConfig with scaling 1 (lora_alpha == r, no rsLoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type if isinstance(task_type, str) else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": sorted(set(target_modules)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "init_lora_weights": True,
    }


def normalise_adalora(
    tensors: Mapping[str, Array], config: Mapping[str, Any]
) -> tuple[Tensors, dict[str, Any]]:
    """Turn validated AdaLoRA weights into plain LoRA weights with the same delta, exactly.

    `config` is the AdaLoRA adapter_config (its `init_r` is the tensors' rank, `lora_alpha` the
    scaling numerator). Returns float32 tensors named like LoRA's and a plain LoRA config.
    """
    rank = int(config["init_r"])
    alpha = float(config["lora_alpha"])
    # PEFT keeps ranknum as a float32 parameter and adds 1e-5 in float32; do the same.
    denominator = float(np.float32(rank) + np.float32(_ADALORA_EPS))
    factor = (alpha if alpha > 0 else float(rank)) / denominator
    out: Tensors = {}
    for key, parts in sorted(group_modules(tensors).items()):
        a = parts["A"].astype(np.float64)
        e = parts["E"].astype(np.float64)
        out[tensor_name(key, "A")] = (a * e * factor).astype(np.float32)
        out[tensor_name(key, "B")] = parts["B"].astype(np.float32)
    new_config = plain_lora_config(
        rank=rank,
        target_modules=sorted({key.module for key in group_modules(out)}),
        base_model=str(config["base_model_name_or_path"]),
        task_type=config.get("task_type"),
    )
    return out, new_config


def compose(
    parts: Sequence[tuple[Mapping[str, Array], Mapping[str, Any], float]], *, max_rank: int
) -> tuple[Tensors, dict[str, Any]]:
    """The weighted sum of plain LoRA adapters as one adapter, by concatenating ranks.

    Each part is (tensors, adapter_config, weight). The result has rank sum(r_i), which must
    not exceed `max_rank`.
    """
    if not parts:
        raise InvalidAdapter("composition needs at least one part")
    grouped = [group_modules(tensors) for tensors, _, _ in parts]
    ranks = [int(config["r"]) for _, config, _ in parts]
    total = sum(ranks)
    if total > max_rank:
        raise InvalidAdapter(
            f"composed rank {total} (sum of the parts' ranks {ranks}) exceeds the maximum rank "
            f"{max_rank}"
        )
    factors = []
    for _, config, weight in parts:
        if not math.isfinite(weight):
            raise InvalidAdapter("composition weights must be finite numbers")
        scaling = lora_scaling(
            float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora"))
        )
        factors.append(weight * scaling)

    shapes: dict[ModuleKey, tuple[int, int]] = {}
    for modules in grouped:
        for key, arrays in modules.items():
            shape = (int(arrays["A"].shape[1]), int(arrays["B"].shape[0]))
            if shapes.setdefault(key, shape) != shape:
                raise InvalidAdapter(f"parts disagree on the shape of {tensor_name(key, 'A')}")

    out: Tensors = {}
    for key, (in_features, out_features) in sorted(shapes.items()):
        a_blocks: list[Array] = []
        b_blocks: list[Array] = []
        for modules, rank, factor in zip(grouped, ranks, factors, strict=True):
            found = modules.get(key)
            if found is None:
                a_blocks.append(np.zeros((rank, in_features)))
                b_blocks.append(np.zeros((out_features, rank)))
            else:
                a_blocks.append(found["A"].astype(np.float64) * factor)
                b_blocks.append(found["B"].astype(np.float64))
        out[tensor_name(key, "A")] = np.concatenate(a_blocks, axis=0).astype(np.float32)
        out[tensor_name(key, "B")] = np.concatenate(b_blocks, axis=1).astype(np.float32)

    first_config = parts[0][1]
    config = plain_lora_config(
        rank=total,
        target_modules=sorted({key.module for key in shapes}),
        base_model=str(first_config["base_model_name_or_path"]),
        task_type=first_config.get("task_type"),
    )
    return out, config


# --- streamed composition: one module at a time --------------------------------------------

#: Loads the "A" and "B" tensors (float32) of one module of one part, or None when the part
#: does not adapt that module.
ModuleLoader = Callable[[int, ModuleKey], Mapping[str, Array] | None]


@dataclass(frozen=True)
class CompositionPlan:
    """What a composition will write, computed from the parts' headers and configs only."""

    #: Every module of any part, in file order, with (in_features, out_features).
    modules: tuple[tuple[ModuleKey, int, int], ...]
    ranks: tuple[int, ...]
    factors: tuple[float, ...]
    config: dict[str, Any]
    #: The safetensors header (length prefix included) of the composed weights file.
    header: bytes
    #: Size of the composed weights file in bytes.
    size: int
    #: Bytes of the largest composed module (A and B, float32): the working set is a few times it.
    largest_module_bytes: int

    @property
    def rank(self) -> int:
        return sum(self.ranks)


def plan_composition(
    shapes: Sequence[Mapping[str, Sequence[int]]],
    configs: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    *,
    max_rank: int,
) -> CompositionPlan:
    """Plan the weighted sum of plain LoRA adapters (see `compose`) from each part's tensor
    shapes (name -> shape, as in a safetensors header) and adapter_config, without loading any
    tensor: the composed rank, the output header and size are known before anything is
    written."""
    if not configs:
        raise InvalidAdapter("composition needs at least one part")
    ranks = tuple(int(config["r"]) for config in configs)
    total = sum(ranks)
    if total > max_rank:
        raise InvalidAdapter(
            f"composed rank {total} (sum of the parts' ranks {list(ranks)}) exceeds the maximum "
            f"rank {max_rank}"
        )
    factors = []
    for config, weight in zip(configs, weights, strict=True):
        if not math.isfinite(weight):
            raise InvalidAdapter("composition weights must be finite numbers")
        scaling = lora_scaling(
            float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora"))
        )
        factors.append(weight * scaling)
    features: dict[ModuleKey, tuple[int, int]] = {}
    for part in shapes:
        grouped: dict[ModuleKey, dict[str, Sequence[int]]] = {}
        for name, shape in part.items():
            parsed = parse_tensor_name(name)
            if parsed is None:
                raise InvalidAdapter(f"unexpected tensor name {name[:120]!r}")
            grouped.setdefault(parsed[0], {})[parsed[1]] = shape
        for key, found in grouped.items():
            feature = (int(found["A"][1]), int(found["B"][0]))
            if features.setdefault(key, feature) != feature:
                raise InvalidAdapter(f"parts disagree on the shape of {tensor_name(key, 'A')}")
    # File order: tensor names sorted (a module's A and B are neighbours).
    ordered = sorted(features.items(), key=lambda item: tensor_name(item[0], "A"))
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    largest = 0
    for key, (in_features, out_features) in ordered:
        module_bytes = 0
        for letter, shape in (("A", [total, in_features]), ("B", [out_features, total])):
            nbytes = shape[0] * shape[1] * 4
            entries[tensor_name(key, letter)] = {
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            module_bytes += nbytes
        largest = max(largest, module_bytes)
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    header = len(text).to_bytes(8, "little") + text
    first = configs[0]
    config = plain_lora_config(
        rank=total,
        target_modules=sorted({key.module for key in features}),
        base_model=str(first["base_model_name_or_path"]),
        task_type=first.get("task_type"),
    )
    return CompositionPlan(
        modules=tuple((key, i, o) for key, (i, o) in ordered),
        ranks=ranks,
        factors=tuple(factors),
        config=config,
        header=header,
        size=len(header) + offset,
        largest_module_bytes=largest,
    )


def write_composition(plan: CompositionPlan, load: ModuleLoader, out: BinaryIO) -> None:
    """Write the composed weights file of `plan`, loading one module of each part at a time:
    at most one module's tensors of every part, and that module's result, are in memory."""
    out.write(plan.header)
    for key, in_features, out_features in plan.modules:
        a_out = np.zeros((plan.rank, in_features), np.float64)
        b_out = np.zeros((out_features, plan.rank), np.float64)
        row = 0
        for index, (rank, factor) in enumerate(zip(plan.ranks, plan.factors, strict=True)):
            found = load(index, key)
            if found is not None:
                a_out[row : row + rank] = found["A"].astype(np.float64) * factor
                b_out[:, row : row + rank] = found["B"]
            row += rank
            del found
        for array in (a_out, b_out):
            out.write(np.ascontiguousarray(array, "<f4").data)
        del a_out, b_out
