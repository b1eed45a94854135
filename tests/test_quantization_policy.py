"""engine/quantization.py: what a base's config.json says, and what the CPU build refuses.

Pure functions on hand-written configs (the shapes vLLM, llm-compressor, AutoGPTQ and AutoAWQ
write); the real engine's side of it is tests/test_quantized.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_gateway.engine.quantization import CpuKernels, Quantization, cpu_refusal, describe

AVX2 = CpuKernels(
    library="vllm._C_AVX2",
    wna16=False,
    fp8=False,
    dyn_quant_4bit=True,
    int8_lora_fix=True,
    int8_dot=False,
)
AMX = CpuKernels(
    library="vllm._C", wna16=True, fp8=True, dyn_quant_4bit=True, int8_lora_fix=True, int8_dot=True
)


def model(tmp_path: Path, quantization_config: dict[str, Any] | None) -> str:
    config: dict[str, Any] = {"hidden_size": 128, "num_attention_heads": 2}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def compressed(weights: dict[str, Any], inputs: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs}
        },
    }


INT8 = {"num_bits": 8, "type": "int", "strategy": "channel", "group_size": None}
INT4_G128 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}
FP8 = {"num_bits": 8, "type": "float", "strategy": "channel"}
DYNAMIC_INT8 = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
DYNAMIC_FP8 = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}

CASES: list[tuple[str, dict[str, Any] | None, str | None, str, bool, bool]] = [
    # name, quantization_config, setting, scheme, refused on AVX2, refused on AMX
    ("W8A8", compressed(INT8, DYNAMIC_INT8), None, "W8A8", False, False),
    ("W4A8", compressed(INT4_G128, DYNAMIC_INT8), None, "W4A8", False, False),
    ("W4A16", compressed(INT4_G128, None), None, "W4A16", True, False),
    ("W8A16", compressed(INT8, None), None, "W8A16", True, True),
    ("FP8_DYNAMIC", compressed(FP8, DYNAMIC_FP8), None, "FP8", True, False),
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128}, None, "W4A16", True, False),
    ("awq", {"quant_method": "awq", "w_bit": 4, "q_group_size": 128}, None, "W4A16", True, False),
    ("online fp8", None, "fp8", "FP8", True, False),
]


@pytest.mark.parametrize(
    ("name", "config", "setting", "scheme", "refused_avx2", "refused_amx"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_describe_and_refuse(
    tmp_path: Path,
    name: str,
    config: dict[str, Any] | None,
    setting: str | None,
    scheme: str,
    refused_avx2: bool,
    refused_amx: bool,
) -> None:
    q = describe(model(tmp_path, config), setting)
    assert q is not None
    assert q.scheme == scheme
    assert (cpu_refusal(q, AVX2) is not None) == refused_avx2
    assert (cpu_refusal(q, AMX) is not None) == refused_amx


def test_refusals_name_the_missing_op_and_the_library(tmp_path: Path) -> None:
    w4a16 = describe(model(tmp_path, compressed(INT4_G128, None)), None)
    assert w4a16 is not None
    text = cpu_refusal(w4a16, AVX2)
    assert text is not None
    assert "cpu_gemm_wna16" in text
    assert "vllm._C_AVX2" in text
    assert "W8A8 or W4A8" in text
    fp8 = cpu_refusal(Quantization("fp8", "float", 8, 8, source="setting"), AVX2)
    assert fp8 is not None
    assert "static_scaled_fp8_quant" in fp8
    assert w4a16.label == "compressed-tensors W4A16, group size 128"
    assert Quantization("fp8", "float", 8, 8).label == "fp8"


def test_w4a16_in_float32_is_refused_where_the_kernel_exists(tmp_path: Path) -> None:
    """`_C::cpu_gemm_wna16` takes 16-bit activations: on a CPU whose library has it (AVX-512),
    a W4A16 base served in float32 killed the worker at the first forward pass ('not
    implemented for Float'), so it is refused at start; in bfloat16 it is not."""
    w4a16 = describe(model(tmp_path, compressed(INT4_G128, None)), None)
    assert w4a16 is not None
    text = cpu_refusal(w4a16, AMX, "float32")
    assert text is not None
    assert "float32" in text
    assert "bfloat16" in text
    assert cpu_refusal(w4a16, AMX, "bfloat16") is None
    assert cpu_refusal(w4a16, AMX) is None  # "auto": the start-up probe decides


def test_w8a8_needs_the_plugin_fix(tmp_path: Path) -> None:
    q = describe(model(tmp_path, compressed(INT8, DYNAMIC_INT8)), None)
    assert q is not None
    without = CpuKernels("vllm._C_AVX2", False, False, True, int8_lora_fix=False)
    text = cpu_refusal(q, without)
    assert text is not None
    assert "plugin" in text


def test_a_float_model_or_an_unknown_method_is_not_refused(tmp_path: Path) -> None:
    assert describe(model(tmp_path, None), None) is None
    unknown = describe(model(tmp_path, {"quant_method": "gguf"}), None)
    assert unknown is not None
    assert cpu_refusal(unknown, AVX2) is None  # no verdict: the start-up probe decides
    assert describe("org/some-hub-model", None) is None
    hub = describe("org/some-hub-model", "fp8")
    assert hub is not None
    assert hub.source == "setting"
