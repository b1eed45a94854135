"""Quantized base against float32: resident memory and throughput, with and without adapters.

Systems: the float32 model and the same model quantized by `devtools.make_quantized_model`
(compressed-tensors W8A8 and W4A8: the schemes vLLM's CPU build runs here; W4A16 and fp8 are
refused at start on this CPU, see README "Quantized base"). Each system runs on its own engine,
started with the run's engine settings and only the model swapped, one system at a time: in each
pass every system in turn (the order alternates between passes) starts its engine, loads
`adapters` LoRA adapters (rank `rank`, attention modules), warms up, runs `rounds` rounds of each
workload and shuts its engine down. The two workloads alternate within a pass:

- `base`: every request on the base model;
- `adapters`: requests round robin over the adapters (all resident: no load, no eviction).

Throughput is that of a closed loop (`requests` requests, concurrency C, `prompt_tokens` →
`max_tokens` tokens, greedy, EOS ignored) through `Engine.generate`: the engine layer, since the
gateway's own cost is the `overhead` benchmark's subject. Memory is the RSS (and USS) of the
engine's processes, vLLM's EngineCore and Worker, after start and after the workload. At this
model size the runtime and the KV cache (`kv_cache_space_gib`) are most of it; the weights are
what differs, and their file sizes are reported beside it.

Reported per system and workload: the median over every round with its min and max; and per
quantized scheme the ratio to float32, computed pass by pass (each quantized pass against the
float32 pass beside it), as a median and a range. The full size uses a "small" model (hidden
1024, 4 layers, intermediate 2816: 45 M parameters, 180 MB in float32) so that the weights are a
visible part of memory and of the step time. At smoke size the model is the tiny one and the
float32 system is the run's shared engine (one engine start fewer; its memory then includes the
earlier benchmarks' history): check that it runs, do not read the figures.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks._support import (
    ENGINE_SETTINGS,
    Bench,
    closed_loop,
    engine_request,
    prompts,
    summarize,
)
from lora_gateway import devtools
from lora_gateway.engine.base import Engine, LoadedAdapter, next_lora_id
from tests.support.gateway import engine_settings
from tests.support.processes import engine_pids

NAME = "quantized"
FLOAT = "float32"
MODES = ("base", "adapters")
#: Model sizes (`devtools.make_model` arguments).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {"hidden": 1024, "layers": 4, "intermediate": 2816, "heads": 16, "kv_heads": 4},
}


@dataclass(frozen=True)
class Params:
    model: str = "small"
    """A key of SIZES."""
    schemes: tuple[str, ...] = ("W8A8", "W4A8")
    passes: int = 3
    """Engine starts per system; systems alternate within each pass."""
    rounds: int = 3
    """Rounds of each workload per pass."""
    requests: int = 48
    concurrency: int = 8
    prompt_tokens: int = 32
    max_tokens: int = 16
    adapters: int = 3
    rank: int = 16


DEFAULT = Params()
SMOKE = Params(
    model="tiny",
    schemes=("W8A8",),
    passes=1,
    rounds=1,
    requests=8,
    concurrency=4,
    prompt_tokens=8,
    max_tokens=4,
    adapters=2,
    rank=8,
)


def phases(params: Params) -> int:
    return 1 + params.passes * (1 + len(params.schemes))


def memory(pids: set[int]) -> dict[str, int]:
    rss = uss = count = 0
    for pid in pids:
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss, uss, count = rss + info.rss, uss + info.uss, count + 1
    return {"rss_bytes": rss, "uss_bytes": uss, "processes": count}


def make_models(bench: Bench, params: Params) -> dict[str, Path]:
    root = bench.work / NAME
    if params.model == "tiny":
        source = bench.model  # the shared engine's model
    else:
        source = devtools.make_model(root / f"{params.model}-float32", **SIZES[params.model])
    models = {FLOAT: source}
    for scheme in params.schemes:
        models[scheme] = devtools.make_quantized_model(
            root / f"{params.model}-{scheme}", scheme, source=source
        )
    return models


def spread(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": float(np.median(finite)), "min": min(finite), "max": max(finite)}


async def run(bench: Bench, params: Params) -> dict[str, Any]:
    from lora_gateway.engine.vllm_engine import VLLMEngine

    progress = bench.progress
    shared_pids = engine_pids()
    with progress.phase("quantized: models and adapters"):
        models = await asyncio.to_thread(make_models, bench, params)
        adapter_dirs = [
            await asyncio.to_thread(
                devtools.write_random_lora,
                models[FLOAT],
                bench.work / NAME / f"adapter-{index}",
                rank=params.rank,
                seed=300 + index,
            )
            for index in range(params.adapters)
        ]
    systems = [FLOAT, *params.schemes]
    work = prompts(params.requests, params.prompt_tokens, seed=7)
    warm = prompts(2 * (params.adapters + 1), params.prompt_tokens, seed=8)
    reuse_shared = params.model == "tiny"
    data: dict[str, dict[str, Any]] = {
        s: {
            "model": str(models[s]),
            "weights_bytes": (models[s] / "model.safetensors").stat().st_size,
            "start_s": [],
            "memory_after_start": [],
            "memory_after_work": [],
            "rounds": {mode: [] for mode in MODES},
            "pass_medians": {mode: [] for mode in MODES},
        }
        for s in systems
    }
    errors = 0

    async def workload(engine: Engine, mode: str, loaded: list[LoadedAdapter]) -> dict[str, Any]:
        nonlocal errors

        def job(index: int) -> Any:
            adapter = None if mode == "base" else loaded[index % len(loaded)]
            return lambda: engine_request(engine, adapter, work[index], params.max_tokens)

        results, wall = await closed_loop(
            [job(i) for i in range(params.requests)], params.concurrency, progress, mode
        )
        errors += sum(not r.ok for r in results)
        return summarize(results, wall)

    async def one(system: str, pass_index: int) -> None:
        record = data[system]
        owned = not (reuse_shared and system == FLOAT)
        if owned:
            before = engine_pids()
            began = time.perf_counter()
            settings = engine_settings(models[system], **ENGINE_SETTINGS)
            engine: Engine = await VLLMEngine.start(settings)
            record["start_s"].append(time.perf_counter() - began)
            pids = engine_pids() - before
        else:
            engine, pids = bench.engine, shared_pids
        loaded = [
            LoadedAdapter(next_lora_id(), f"{NAME}-{index}@sha256:bench", path)
            for index, path in enumerate(adapter_dirs)
        ]
        try:
            for adapter in loaded:
                await engine.add_adapter(adapter)
            record["memory_after_start"].append(memory(pids))
            targets: list[LoadedAdapter | None] = [None, *loaded]
            for index, token_ids in enumerate(warm):  # the base and every adapter, twice
                target = targets[index % len(targets)]
                await engine_request(engine, target, token_ids, params.max_tokens)
            rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for round_index in range(params.rounds):
                order = MODES if (round_index + pass_index) % 2 == 0 else MODES[::-1]
                for mode in order:
                    summary = await workload(engine, mode, loaded)
                    summary["pass"] = pass_index
                    rounds[mode].append(summary)
            for mode in MODES:
                record["rounds"][mode] += rounds[mode]
                record["pass_medians"][mode].append(
                    float(np.median([r["throughput_rps"] for r in rounds[mode]]))
                )
            record["memory_after_work"].append(memory(pids))
        finally:
            for adapter in loaded:
                await engine.remove_adapter(adapter.lora_int_id)
            if owned:
                await engine.shutdown()

    for pass_index in range(params.passes):
        order = systems if pass_index % 2 == 0 else systems[::-1]
        for system in order:
            with progress.phase(f"quantized: pass {pass_index + 1}, {system}"):
                await one(system, pass_index)

    results: dict[str, Any] = {}
    for system, record in data.items():
        results[system] = {
            **{k: v for k, v in record.items() if k != "pass_medians"},
            "throughput_rps": {
                mode: spread([r["throughput_rps"] for r in record["rounds"][mode]])
                for mode in MODES
            },
            "tokens_per_s": {
                mode: spread([r["tokens_per_s"] for r in record["rounds"][mode]]) for mode in MODES
            },
            "rss_after_work_bytes": spread([m["rss_bytes"] for m in record["memory_after_work"]]),
            "uss_after_work_bytes": spread([m["uss_bytes"] for m in record["memory_after_work"]]),
        }
    comparison: dict[str, Any] = {}
    base = data[FLOAT]
    for scheme in params.schemes:
        record = data[scheme]
        comparison[scheme] = {
            "throughput_ratio": {
                mode: spread(
                    [
                        q / f
                        for q, f in zip(
                            record["pass_medians"][mode], base["pass_medians"][mode], strict=True
                        )
                        if f > 0
                    ]
                )
                for mode in MODES
            },
            "rss_ratio": spread(
                [
                    q["rss_bytes"] / f["rss_bytes"]
                    for q, f in zip(
                        record["memory_after_work"], base["memory_after_work"], strict=True
                    )
                    if f["rss_bytes"] > 0
                ]
            ),
            "rss_saved_bytes": spread(
                [
                    float(f["rss_bytes"] - q["rss_bytes"])
                    for q, f in zip(
                        record["memory_after_work"], base["memory_after_work"], strict=True
                    )
                ]
            ),
            "weights_ratio": record["weights_bytes"] / base["weights_bytes"],
        }
    headline = {
        scheme: {
            "throughput_ratio_base": c["throughput_ratio"]["base"]["median"],
            "throughput_ratio_adapters": c["throughput_ratio"]["adapters"]["median"],
            "rss_ratio": c["rss_ratio"]["median"],
            "weights_ratio": c["weights_ratio"],
        }
        for scheme, c in comparison.items()
    }
    problems = [f"{errors} request(s) failed"] if errors else []
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "headline": headline,
        "systems": results,
        "comparison": comparison,
        "float_engine_shared": reuse_shared,
        "problems": problems,
    }
