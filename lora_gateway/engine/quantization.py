"""Which quantized bases the engine can serve with adapters, decided before the engine starts.

`describe(model, setting)` reads what the base model is quantized with (the `quantization`
setting, else the `quantization_config` of its config.json). `cpu_refusal(q, kernels)` says why
vLLM's CPU build cannot run it, or None; `VLLMEngine.start` raises `InvalidArgument` with that
reason before it starts anything, so that a configuration that would kill the engine (at load, or
worse, at the first request) is refused at start-up with a clear message. `CpuKernels` is what
the vLLM kernel library loaded on this machine provides (`engine/vllm_engine.py` probes it; this
module does not import vLLM).

What vLLM 0.32's CPU build runs (read in `vllm/model_executor/kernels/linear/`, tried here):

- W8A8, int8 weights and activations (compressed-tensors int-quantized): oneDNN
  `onednn_scaled_mm` (AMX CPUs: sgl kernels), in every x86 library. With LoRA it needs
  `vllm_plugin.allow_lora_on_prepacked_int8` (vLLM drops the weight tensor LoRA asks about).
- W4A8, int4 weights and int8 activations (compressed-tensors int-quantized, 4 bits):
  `Dynamic4bitLinearKernel`, i.e. torch's `_dyn_quant_matmul_4bit`.
- W4A16, int4 weights only (compressed-tensors pack-quantized, GPTQ, AWQ): `CPUWNA16LinearKernel`
  calls `_C::cpu_gemm_wna16`, built into `vllm._C` and `vllm._C_AVX512` (AVX-512 CPUs) but not
  into `vllm._C_AVX2`.
- W8A16, int8 weights only: no CPU kernel at all (`CPUWNA16` takes 4-bit weights only).
- fp8 (`quantization=fp8`, fp8 checkpoints): `_C::static_scaled_fp8_quant` and
  `fp8_scaled_mm_cpu`, real only in `vllm._C` (AVX-512 BF16 / AMX); a zero-argument stub in the
  other two libraries.

Anything else (bitsandbytes, GGUF, torchao, MX/NV fp4, ...) has no verdict here: the engine's
start-up probe (one forward pass before `start` returns) catches what kills it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: vLLM methods whose checkpoints are 4-bit (or 8-bit) integer weights with 16-bit activations.
WEIGHT_ONLY_INT_METHODS = frozenset(
    {"awq", "auto_awq", "awq_marlin", "gptq", "auto_gptq", "gptq_marlin", "moe_wna16"}
)
#: vLLM methods (settings or checkpoints) with fp8 weights.
FP8_METHODS = frozenset(
    {"fp8", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "fbgemm_fp8", "ptpc_fp8"}
)
#: CPU feature flags (/proc/cpuinfo) with a non-saturating int8 dot product (VNNI or AMX).
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass(frozen=True)
class Quantization:
    """A base model's quantization, as far as choosing a CPU kernel needs it."""

    #: vLLM's method name ("compressed-tensors", "awq", "gptq", "fp8", ...).
    method: str
    #: "int" or "float" (fp8); None when unknown.
    weight_type: str | None = None
    weight_bits: int | None = None
    #: Bits of the quantized activations; None: activations are not quantized (16 / 32 bit).
    activation_bits: int | None = None
    group_size: int | None = None
    #: Where it came from: "config.json" (the checkpoint) or "setting" (online quantization).
    source: str = "config.json"

    @property
    def scheme(self) -> str:
        """W8A8, W4A16, FP8, ... (what llm-compressor would call it); "?" parts when unknown."""
        if self.weight_type == "float" and self.weight_bits == 8:
            return "FP8" if self.activation_bits else "FP8A16"
        weights = self.weight_bits if self.weight_bits is not None else "?"
        return f"W{weights}A{self.activation_bits or 16}"

    @property
    def label(self) -> str:
        scheme = self.scheme
        detail = self.method if scheme.lower() == self.method else f"{self.method} {scheme}"
        if self.group_size:
            detail += f", group size {self.group_size}"
        return detail


@dataclass(frozen=True)
class CpuKernels:
    """What the vLLM CPU kernel library loaded here provides (probed in vllm_engine.py)."""

    #: The library vLLM loads on this CPU (`vllm._C`, `vllm._C_AVX512` or `vllm._C_AVX2`).
    library: str
    #: `_C::cpu_gemm_wna16` is present (4-bit weights, 16-bit activations).
    wna16: bool
    #: `_C::static_scaled_fp8_quant` is implemented (not the zero-argument stub).
    fp8: bool
    #: torch's `_dyn_quant_matmul_4bit` (W4A8) exists.
    dyn_quant_4bit: bool
    #: The vLLM plugin that lets LoRA wrap prepacked int8 layers will load in the engine.
    int8_lora_fix: bool
    #: The CPU has a non-saturating int8 dot product (VNNI or AMX); None if unknown.
    int8_dot: bool | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _from_compressed_tensors(config: Mapping[str, Any]) -> Quantization:
    groups = config.get("config_groups")
    schemes: list[Quantization] = []
    for group in groups.values() if isinstance(groups, Mapping) else []:
        weights = group.get("weights") if isinstance(group, Mapping) else None
        inputs = group.get("input_activations") if isinstance(group, Mapping) else None
        if not isinstance(weights, Mapping):
            continue
        schemes.append(
            Quantization(
                method="compressed-tensors",
                weight_type=str(weights.get("type", "int")),
                weight_bits=_int(weights.get("num_bits")),
                activation_bits=_int(inputs.get("num_bits"))
                if isinstance(inputs, Mapping)
                else None,
                group_size=_int(weights.get("group_size")),
            )
        )
    if not schemes:
        return Quantization(method="compressed-tensors")
    # Several groups (mixed precision): the most demanding one decides, which is the first
    # whose weights are not int8-with-int8-activations (kernels are chosen per layer).
    return next((s for s in schemes if s.scheme != "W8A8"), schemes[0])


def describe(model: str, setting: str | None) -> Quantization | None:
    """The base model's quantization: its config.json's `quantization_config` (a quantized
    checkpoint), else the `quantization` setting (online quantization); None if neither."""
    config: Any = None
    path = Path(model) / "config.json"
    if model and path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            config = None  # vLLM reports an unreadable config.json itself, more precisely
    if isinstance(config, Mapping):
        method = str(config.get("quant_method", "") or setting or "").lower()
        if method == "compressed-tensors":
            return _from_compressed_tensors(config)
        if method in WEIGHT_ONLY_INT_METHODS:
            return Quantization(
                method=method,
                weight_type="int",
                weight_bits=_int(config.get("bits", config.get("w_bit"))),
                group_size=_int(config.get("group_size", config.get("q_group_size"))),
            )
        if method in FP8_METHODS:
            return Quantization(method=method, weight_type="float", weight_bits=8)
        return Quantization(method=method or "unknown")
    if setting:
        method = setting.lower()
        if method in FP8_METHODS:
            return Quantization(method, "float", 8, activation_bits=8, source="setting")
        return Quantization(method, source="setting")
    return None


def cpu_refusal(q: Quantization, kernels: CpuKernels, dtype: str = "auto") -> str | None:
    """Why vLLM's CPU build cannot serve adapters on this base in `dtype` (Settings.dtype), or
    None (no objection)."""
    if q.weight_type == "float" and q.weight_bits == 8:
        if kernels.fp8:
            return None
        return (
            f"vLLM's fp8 CPU kernels are not in {kernels.library}, the kernel library this CPU "
            "loads: there `_C::static_scaled_fp8_quant` is a stub taking no arguments, and the "
            "engine would die (with quantization=fp8, while loading the weights). fp8 on CPU "
            "needs AVX-512 BF16 or AMX (library vllm._C)"
        )
    if q.weight_type == "int" and q.activation_bits is None and q.weight_bits == 4:
        if kernels.wna16 and str(dtype).lower() in ("float32", "float"):
            # Seen on an AVX-512 BF16 machine: the worker died at the first forward pass with
            # NotImplementedError: "cpu_gemm_wna16" not implemented for 'Float'.
            return (
                "4-bit weight-only kernels (W4A16) take 16-bit activations: "
                "`_C::cpu_gemm_wna16` has no float32 kernel, and the engine would die at its "
                "first forward pass. Serve this base with dtype bfloat16 or float16, or use "
                "W8A8 or W4A8"
            )
        if kernels.wna16:
            return None
        return (
            f"4-bit weight-only kernels (W4A16: GPTQ, AWQ, compressed-tensors pack-quantized) "
            f"need `_C::cpu_gemm_wna16`, which {kernels.library}, the kernel library this CPU "
            "loads, does not have (only vllm._C and vllm._C_AVX512 do, on AVX-512 CPUs): the "
            "engine would load it and die at its first forward pass. On this CPU, use W8A8 or "
            "W4A8 (int8 activations)"
        )
    if q.weight_type == "int" and q.activation_bits is None and q.weight_bits == 8:
        return (
            "vLLM has no CPU kernel for 8-bit weight-only quantization (W8A16): its CPU "
            "mixed-precision kernel takes 4-bit weights only. Use W8A8 (int8 activations)"
        )
    if q.weight_type == "int" and q.activation_bits == 8 and q.weight_bits == 8:
        if kernels.int8_lora_fix:
            return None
        return (
            "vLLM's CPU int8 kernel drops the layers' weight tensors after packing them, and "
            "vLLM's LoRA layers then fail at start-up; the fix ships as the lora_gateway vLLM "
            "plugin (entry point vllm.general_plugins: lora_gateway_resolver), which is not "
            "installed or is excluded by VLLM_PLUGINS here"
        )
    if q.weight_type == "int" and q.activation_bits == 8 and q.weight_bits == 4:
        if kernels.dyn_quant_4bit:
            return None
        return "W4A8 on CPU needs torch's _dyn_quant_matmul_4bit (torch >= 2.6), absent here"
    return None


def cpu_warnings(q: Quantization, kernels: CpuKernels) -> list[str]:
    """What serves but less well than it should, on this CPU."""
    warnings = []
    if q.scheme == "W8A8" and kernels.int8_dot is False:
        warnings.append(
            "this CPU has no VNNI/AMX int8 dot product: vLLM's oneDNN int8 GEMM then adds "
            "u8 x s8 pairs in 16-bit registers, which saturate, so W8A8 outputs drift further "
            "from the float model than int8 rounding alone explains (measured: 3-7% relative "
            "error per GEMM instead of 0.7%; see README, Quantized base)"
        )
    return warnings


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags (Linux), or None when they cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None
