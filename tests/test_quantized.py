"""A quantized base on CPU: the tiny model in W8A8 (compressed-tensors) serving adapters.

One engine on the quantized model serves every test here (started once for the module). The
reference is the PEFT-merged model on the *dequantized* weights (`devtools.dequantize_model`,
written from the format with numpy, sharing no code with compressed-tensors or vLLM), greedy in
float32 by transformers: what the engine computes, except that the engine also rounds each
quantized layer's input activations to int8, per token, and multiplies in int8.

Why not token-for-token equality: int8 activations move every logit a little (measured here:
0.65 % relative error per GEMM from the rounding alone; 3-7 % on this AVX2 CPU, whose oneDNN int8
GEMM saturates 16-bit sums without VNNI), and greedy decoding turns any move at a near tie into a
different token, after which the continuation differs. So the check is teacher-forced: at every
position of the engine's own output, the reference's log-probability of the token the engine chose
must be within `TOLERANCE_NATS` of the reference's best there. A quantization-sized error passes
(near ties only); an adapter not applied, the wrong adapter, or wrongly read weights does not
(`test_the_tolerance_fails_a_wrong_output`). Token match rates and first divergences are printed
(`-s`), and bounded loosely. Isolation, the product's guarantee, stays exact: mixed batches equal
solo outputs token for token on the quantized base too.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from adapter_store import BaseModelSpec, Incompatible, Limits
from adapter_store.validate import validate_adapter
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine import quantization
from lora_gateway.engine.base import GenerateParams, LoadedAdapter, Prompt, next_lora_id
from lora_gateway.engine.selftest import collect
from lora_gateway.engine.vllm_engine import VLLMEngine
from tests.conftest import engine_settings
from tests.support import processes
from tests.support.gateway import gateway_settings, key_of, running_gateway, target, write_tenants

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 16
#: Largest accepted teacher-forced log-probability gap (nats) at any position. Measured on this
#: machine: at most 0.011 for the right reference; 0.2-0.3 against a wrong one.
TOLERANCE_NATS = 0.05
PROMPTS = (
    *devtools.SAMPLE_PROMPTS,
    "data code test build run",
    "legal finance billing search summary",
    "river mountain city ocean",
    "seven eight nine ten",
)
#: The adapters served (max_cpu_loras is 3): attention only, every module, MLP only.
ADAPTERS = ("attn-r8", "all-r16-rslora", "mlp-r4")
NAMES: tuple[str | None, ...] = (None, *ADAPTERS)
GREEDY = GenerateParams(max_tokens=MAX_TOKENS, temperature=0.0)

Outputs = dict[tuple[str | None, str], list[int]]


@pytest.fixture(scope="module")
def dequantized(quantized_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return devtools.dequantize_model(quantized_model, tmp_path_factory.mktemp("dequantized"))


@pytest.fixture(scope="module")
def qreference(dequantized: Path) -> devtools.ReferenceGenerator:
    return devtools.ReferenceGenerator(dequantized)


@pytest.fixture(scope="module")
async def qengine(quantized_model: Path) -> AsyncIterator[VLLMEngine]:
    """The quantized base's own engine (the session engine serves the float model)."""
    started = await VLLMEngine.start(engine_settings(quantized_model))
    yield started
    await started.shutdown()


@pytest.fixture(scope="module")
async def qloaded(
    qengine: VLLMEngine, test_adapters: dict[str, Path]
) -> AsyncIterator[dict[str, LoadedAdapter]]:
    adapters = {
        name: LoadedAdapter(next_lora_id(), f"{name}@sha256:quantized", test_adapters[name])
        for name in ADAPTERS
    }
    for adapter in adapters.values():
        await qengine.add_adapter(adapter)
    yield adapters
    for lora_int_id in await qengine.list_adapters():
        await qengine.remove_adapter(lora_int_id)


@pytest.fixture(scope="module")
async def solo(qengine: VLLMEngine, qloaded: dict[str, LoadedAdapter]) -> Outputs:
    """Every (adapter or base, prompt) alone on the quantized engine."""
    table: Outputs = {}
    for name in NAMES:
        for prompt in PROMPTS:
            adapter = qloaded[name] if name else None
            table[(name, prompt)] = await collect(qengine, Prompt(text=prompt), GREEDY, adapter)
    return table


def first_divergence(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(got))


# --- the checkpoint and what the gateway reads of it ------------------------------------------


def test_the_checkpoint_is_w8a8_compressed_tensors(
    quantized_model: Path, tiny_model: Path, dequantized: Path
) -> None:
    config = json.loads((quantized_model / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "int-quantized"
    assert config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == 8
    assert group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["num_bits"] == 8
    assert group["input_activations"]["dynamic"]
    q = quantization.describe(str(quantized_model), None)
    assert q is not None
    assert q.scheme == "W8A8"
    assert q.method == "compressed-tensors"

    packed = load_file(str(quantized_model / "model.safetensors"))
    floats = load_file(str(tiny_model / "model.safetensors"))
    restored = load_file(str(dequantized / "model.safetensors"))
    assert sorted(restored) == sorted(floats)
    key = "model.layers.0.mlp.down_proj"
    assert packed[f"{key}.weight"].dtype == np.int8
    assert packed[f"{key}.weight_scale"].shape == (devtools.TINY_HIDDEN, 1)
    assert packed["lm_head.weight"].dtype == np.float32  # ignored: stays float
    for name, weight in floats.items():
        if name.endswith("proj.weight"):
            scale = packed[name.removesuffix("weight") + "weight_scale"]
            # Round to nearest: every weight within half a step of its dequantized value.
            assert np.all(np.abs(restored[name] - weight) <= scale / 2 + 1e-7), name
            assert np.any(restored[name] != weight), name
        else:
            assert np.array_equal(restored[name], weight), name
    size = (quantized_model / "model.safetensors").stat().st_size
    assert size < 0.6 * (tiny_model / "model.safetensors").stat().st_size


def test_dev_make_model_quantize(tmp_path: Path) -> None:
    from lora_gateway import cli

    assert cli.main(["dev", "make-model", str(tmp_path / "w4a16"), "--quantize", "W4A16"]) == 0
    config = json.loads((tmp_path / "w4a16" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    (group,) = config["config_groups"].values()
    assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (4, 128)
    assert group["input_activations"] is None
    packed = load_file(str(tmp_path / "w4a16" / "model.safetensors"))
    assert packed["model.layers.0.self_attn.q_proj.weight_packed"].dtype == np.int32
    q = quantization.describe(str(tmp_path / "w4a16"), None)
    assert q is not None
    assert q.scheme == "W4A16"


def test_adapter_validation_reads_the_quantized_config(
    quantized_model: Path, tiny_model: Path, test_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Module shapes and the serving dtype come out as for the float model, so the same
    adapters are accepted and a wrong-shaped one is refused."""
    for dtype in ("auto", "float32", "bfloat16"):
        quant = BaseModelSpec.from_hf_config(quantized_model, max_rank=16, dtype=dtype)
        base = BaseModelSpec.from_hf_config(tiny_model, max_rank=16, dtype=dtype)
        assert quant.module_shapes == base.module_shapes
        assert (quant.num_layers, quant.dtype) == (base.num_layers, base.dtype)
    spec = BaseModelSpec.from_hf_config(
        quantized_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,), dtype="float32"
    )
    assert spec.module_shapes["k_proj"] == (devtools.TINY_HIDDEN, 64)
    for path in test_adapters.values():
        validate_adapter(adapter_files(path), spec, Limits())  # raises if refused
    wrong = wrong_shaped_adapter(quantized_model, tmp_path)
    with pytest.raises(Incompatible):
        validate_adapter(adapter_files(wrong), spec, Limits())


def adapter_files(folder: Path) -> dict[str, Path]:
    return {name: folder / name for name in ("adapter_config.json", "adapter_model.safetensors")}


def wrong_shaped_adapter(model: Path, tmp_path: Path) -> Path:
    """A q_proj adapter for a model twice as wide (valid on its own, wrong for this base)."""
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 2 * config["hidden_size"]
    (wide / "config.json").write_text(json.dumps(config))
    return devtools.write_random_lora(
        wide, tmp_path / "wrong", rank=8, seed=3, modules=("q_proj",), scale=0.1, lora_alpha=8
    )


# --- outputs against the reference -------------------------------------------------------------


def agreement(
    outputs: Outputs,
    reference: devtools.ReferenceGenerator,
    adapters: dict[str, Path],
    scored_by: dict[str | None, str | None] | None = None,
) -> dict[str | None, dict[str, Any]]:
    """Per name: teacher-forced gaps, token match rate and first divergences against the
    reference of `scored_by[name]` (default: the name itself)."""
    stats: dict[str | None, dict[str, Any]] = {}
    for name in NAMES:
        judge = name if scored_by is None else scored_by[name]
        path = adapters[judge] if judge else None
        gaps: list[float] = []
        matched = total = 0
        divergences = []
        for prompt in PROMPTS:
            got = outputs[(name, prompt)]
            gaps += reference.logprob_gaps(prompt, path, got)
            want = reference.generate(prompt, path, MAX_TOKENS)
            matched += sum(a == b for a, b in zip(got, want, strict=False))
            total += len(got)
            divergences.append(first_divergence(got, want))
        stats[name] = {
            "max_gap": max(gaps),
            "mean_gap": float(np.mean(gaps)),
            "match_rate": matched / total,
            "first_divergence": divergences,
        }
    return stats


def test_outputs_agree_with_the_dequantized_reference(
    solo: Outputs, qreference: devtools.ReferenceGenerator, test_adapters: dict[str, Path]
) -> None:
    stats = agreement(solo, qreference, test_adapters)
    print("\nquantized base (W8A8) vs PEFT on the dequantized weights, greedy float32:")
    for name, s in stats.items():
        print(
            f"  {name or 'base':15s} max gap {s['max_gap']:.4f} nats, mean {s['mean_gap']:.5f};"
            f" tokens equal {100 * s['match_rate']:.0f} %; first divergence per prompt"
            f" {s['first_divergence']} (of {MAX_TOKENS})"
        )
    for name, s in stats.items():
        assert s["max_gap"] <= TOLERANCE_NATS, (name, s)
        # Loose: most tokens agree, and on average the first divergence comes late.
        assert s["match_rate"] >= 0.4, (name, s)
        assert np.mean(s["first_divergence"]) >= 4, (name, s)


#: A wrong reference for each output: the every-module adapter's (the base model's for it).
WRONG_REFERENCE: dict[str | None, str | None] = {
    None: "all-r16-rslora",
    "attn-r8": "all-r16-rslora",
    "all-r16-rslora": None,
    "mlp-r4": "all-r16-rslora",
}


def test_the_tolerance_fails_a_wrong_output(
    solo: Outputs, qreference: devtools.ReferenceGenerator, test_adapters: dict[str, Path]
) -> None:
    """The check above can fail: outputs scored by the wrong reference (an adapter's output
    judged as the base model's, the base's as every-module adapter's) exceed the tolerance."""
    wrong = WRONG_REFERENCE
    stats = agreement(solo, qreference, test_adapters, scored_by=wrong)
    print("\nthe same outputs scored by a wrong reference:")
    for name, s in stats.items():
        print(
            f"  {name or 'base':15s} as {wrong[name] or 'base':15s} max gap {s['max_gap']:.3f}"
            f" nats, tokens equal {100 * s['match_rate']:.0f} %"
        )
    for name, s in stats.items():
        assert s["max_gap"] > 2 * TOLERANCE_NATS, (name, s)


# --- isolation --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
async def test_mixed_batches_equal_solo_outputs(
    qengine: VLLMEngine, qloaded: dict[str, LoadedAdapter], solo: Outputs, seed: int
) -> None:
    """Base and adapter requests batched together (more adapters than the 2 slots) give each
    request exactly its solo output on the quantized base too."""
    cases = [(name, prompt) for name in NAMES for prompt in PROMPTS[:6]]
    random.Random(seed).shuffle(cases)
    got = await asyncio.gather(
        *(collect(qengine, Prompt(text=p), GREEDY, qloaded[n] if n else None) for n, p in cases)
    )
    for (name, prompt), tokens in zip(cases, got, strict=True):
        assert tokens == solo[(name, prompt)], (seed, name, prompt)


# --- through the gateway ----------------------------------------------------------------------

KEY = key_of("acme", "admin")


async def test_gateway_serves_adapters_on_the_quantized_base(
    qengine: VLLMEngine,
    qloaded: dict[str, LoadedAdapter],
    quantized_model: Path,
    test_adapters: dict[str, Path],
    solo: Outputs,
    tmp_path: Path,
) -> None:
    """Start-up self-test (isolation on every slot) on the quantized base, uploads validated
    against its config, outputs equal to the engine's own."""
    for adapter in qloaded.values():  # the self-test needs the slots
        await qengine.remove_adapter(adapter.lora_int_id)
    settings = gateway_settings(
        quantized_model,
        tmp_path,
        tenants=write_tenants(tmp_path / "tenants.yaml", {"acme": {}}, keys=("admin",)),
        self_test=True,
    )
    async with (
        running_gateway(settings, qengine) as server,
        AsyncGatewayClient(target(server), KEY) as client,
    ):
        for name in ("all-r16-rslora", "mlp-r4"):
            await client.upload_adapter(name, test_adapters[name])
        with pytest.raises(errors.FailedPrecondition):
            await client.upload_adapter("wrong", wrong_shaped_adapter(quantized_model, tmp_path))
        cases = [(n, p) for n in ("all-r16-rslora", "mlp-r4", "") for p in PROMPTS[:3]]
        results = await asyncio.gather(
            *(client.generate(n, p, GenerateOptions(max_tokens=MAX_TOKENS)) for n, p in cases)
        )
        for (name, prompt), result in zip(cases, results, strict=True):
            assert result.token_ids == solo[(name or None, prompt)], (name, prompt)


# --- what cannot run is refused at start-up ---------------------------------------------------


def _vllm_op(name: str) -> Any:
    """An op of the vLLM CPU kernel library this machine loads (None if absent)."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    try:
        return getattr(torch.ops._C, name)
    except (AttributeError, RuntimeError):
        return None


async def test_fp8_is_refused_before_an_engine_starts(tiny_model: Path) -> None:
    stub = _vllm_op("static_scaled_fp8_quant")
    if stub is not None and stub.default._schema.arguments:
        pytest.skip("this CPU's vLLM library has real fp8 kernels: nothing to refuse")
    before = processes.engine_pids()
    with pytest.raises(errors.InvalidArgument) as refused:
        await VLLMEngine.start(engine_settings(tiny_model, quantization="fp8", dtype="bfloat16"))
    assert "fp8" in str(refused.value)
    assert "static_scaled_fp8_quant" in str(refused.value)
    assert processes.engine_pids() <= before


@pytest.mark.slow  # its own engine (or process): make test-slow
def test_serve_refuses_w4a16_at_start_and_exits_non_zero(tiny_model: Path, tmp_path: Path) -> None:
    """`lora-gateway serve` on a W4A16 base in float32: refused during start (never listening,
    never serving), exit status 1, the reason named. On AVX2 the library has no 4-bit kernel;
    on AVX-512 it has one for 16-bit activations only."""
    model = devtools.make_quantized_model(tmp_path / "w4a16", "W4A16", source=tiny_model)
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump({"tenants": {}}))
    command = [
        sys.executable, "-m", "lora_gateway.cli", "serve",
        "--model", str(model), "--dtype", "float32", "--max-loras", "2", "--max-cpu-loras", "3",
        "--max-lora-rank", "16", "--max-model-len", "256", "--enforce-eager",
        "--kv-cache-space-gib", "1", "--store", f"file://{tmp_path / 'store'}",
        "--tenants", str(tmp_path / "tenants.yaml"), "--listen", "127.0.0.1:0",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "listening" not in done.stdout
    assert "could not start" in done.stderr
    assert "compressed-tensors W4A16" in done.stderr
    assert "cpu_gemm_wna16" in done.stderr
    assert "Worker failed" not in done.stderr  # refused before any engine ran


@pytest.mark.slow
async def test_an_engine_that_dies_on_its_first_forward_fails_the_start(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe behind the kernel check: with the check out of the way, the W4A16 engine in
    float32 loads and dies on the probe inside `start` (AVX2: no `cpu_gemm_wna16`; AVX-512: no
    float32 kernel of it), which shuts it down and raises Unavailable. Should a CPU library ever
    serve it, the start must then succeed with the op present."""
    model = devtools.make_quantized_model(tmp_path / "w4a16", "W4A16", source=tiny_model)
    monkeypatch.setattr(quantization, "cpu_refusal", lambda *args: None)
    before = processes.engine_pids()
    refusal: errors.Unavailable | None = None
    try:
        started = await VLLMEngine.start(engine_settings(model))
    except errors.Unavailable as failed:
        refusal = failed
    if refusal is None:
        await started.shutdown()
        assert _vllm_op("cpu_gemm_wna16") is not None, "a W4A16 engine served without its kernel"
        return
    assert "first forward pass" in str(refusal)
    assert "W4A16" in str(refusal)
    # The dead engine's processes end within the shutdown's own bounds (more than 1 s under a
    # loaded test-slow run: one was still there after 1 s once).
    deadline = time.monotonic() + 30
    for _ in range(60):
        if processes.engine_pids() <= before or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert processes.engine_pids() <= before


@pytest.mark.slow
async def test_w4a8_serves_adapters_within_the_tolerance(
    tiny_model: Path, test_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """The other scheme that runs on this CPU: int4 weights (groups of 128), int8 activations.
    Same checks as W8A8 on its own engine: the tolerance, the wrong-reference contrast, and
    mixed batches equal to solo outputs."""
    model = devtools.make_quantized_model(tmp_path / "w4a8", "W4A8", source=tiny_model)
    reference = devtools.ReferenceGenerator(devtools.dequantize_model(model, tmp_path / "deq"))
    engine = await VLLMEngine.start(engine_settings(model))
    try:
        loaded = {
            name: LoadedAdapter(next_lora_id(), f"{name}@sha256:w4a8", test_adapters[name])
            for name in ADAPTERS
        }
        for adapter in loaded.values():
            await engine.add_adapter(adapter)
        outputs: Outputs = {}
        for name in NAMES:
            for prompt in PROMPTS:
                target = loaded[name] if name else None
                outputs[(name, prompt)] = await collect(engine, Prompt(text=prompt), GREEDY, target)
        cases = [(n, p) for n in NAMES for p in PROMPTS[:6]]
        mixed = await asyncio.gather(
            *(collect(engine, Prompt(text=p), GREEDY, loaded[n] if n else None) for n, p in cases)
        )
    finally:
        await engine.shutdown()
    for (name, prompt), tokens in zip(cases, mixed, strict=True):
        assert tokens == outputs[(name, prompt)], (name, prompt)
    stats = agreement(outputs, reference, test_adapters)
    print("\nW4A8 vs PEFT on the dequantized weights:")
    for name, s in stats.items():
        print(
            f"  {name or 'base':15s} max gap {s['max_gap']:.4f} nats; tokens equal"
            f" {100 * s['match_rate']:.0f} %; first divergence {s['first_divergence']}"
        )
        assert s["max_gap"] <= TOLERANCE_NATS, (name, s)
    wrong = agreement(outputs, reference, test_adapters, scored_by=WRONG_REFERENCE)
    for name, s in wrong.items():
        assert s["max_gap"] > 2 * TOLERANCE_NATS, (name, s)
