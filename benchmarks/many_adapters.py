"""Many adapters: 1,000 in the store, Zipf-distributed requests, 16 loaded and 4 in a batch.

One real adapter is written, then uploaded through `Registry` under `adapters` names, each copy
perturbed in one lora_B element so that every name has its own bytes and sha256 (the disk cache
is keyed by sha256 alone: identical bytes would make every disk lookup after the first a hit).

Each scenario runs on a fresh gateway (empty residency, empty disk cache) on the shared engine
(`max_cpu_loras` 16, `max_loras` 4): `requests` streaming requests at concurrency C, adapters
drawn from a Zipf law of exponent alpha over the names (rank 1 most popular), for each alpha,
and the baseline, the same workload on one adapter (loaded by one warm-up request), run before,
between and after them (the baseline is the median of those runs). Reported per
scenario: throughput and p99 time to first token against the baseline, hit ratio per tier
(engine: requests that did not have to start a load; disk: loads that found the files in the
disk cache), fetches (store downloads) and evictions per 1,000 requests.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks._support import (
    TENANT,
    Bench,
    closed_loop,
    prompts,
    stream_request,
    summarize,
)
from lora_gateway import devtools
from lora_gateway.client import GenerateOptions
from tests.support.metrics import residency_counts

NAME = "many_adapters"
COUNTERS = (
    "engine_hits",
    "engine_misses",
    "disk_hits",
    "disk_misses",
    "engine_loads",
    "evictions",
    "manifest_fetches",
)
PREFIX = "many"


@dataclass(frozen=True)
class Params:
    adapters: int = 1000
    requests: int = 400
    """Requests per scenario."""
    concurrency: int = 8
    alphas: tuple[float, ...] = (1.0, 0.5)
    prompt_tokens: int = 16
    max_tokens: int = 8
    rank: int = 8
    upload_threads: int = 4


DEFAULT = Params()
SMOKE = Params(adapters=20, requests=30, concurrency=4, max_tokens=4)


def phases(params: Params) -> int:
    return 2 + 2 * len(params.alphas)


def adapter_name(index: int) -> str:
    return f"a{index:04d}"


def zipf_choices(count: int, alpha: float, size: int, seed: int) -> list[int]:
    """`size` draws from {0..count-1}, P(k) ∝ (k+1)^-alpha."""
    weights = 1.0 / np.arange(1, count + 1, dtype=float) ** alpha
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(count, size=size, p=weights / weights.sum())]


def upload_all(bench: Bench, params: Params) -> None:
    """Write and upload `params.adapters` perturbed copies of one adapter (threads)."""
    modules = devtools.ATTENTION_MODULES
    base = devtools.random_lora_tensors(bench.model, rank=params.rank, seed=7, modules=modules)
    config = devtools.lora_config(params.rank, modules)
    first_b = next(name for name in sorted(base) if name.endswith("lora_B.weight"))
    root = bench.work / "many"
    registry = bench.registry(PREFIX)

    def one(index: int) -> None:
        tensors = dict(base)
        tensors[first_b] = base[first_b].copy()
        tensors[first_b][0, 0] += np.float32(1e-4 * (index + 1))
        folder = devtools.save_lora(root / adapter_name(index), tensors, config)
        registry.upload_dir(TENANT, adapter_name(index), folder, created_by="benchmarks")
        shutil.rmtree(folder)
        finished = next(done)
        if finished % 25 == 0:
            bench.progress.note(f"uploaded {finished}/{params.adapters}")

    done = itertools.count(1)
    with ThreadPoolExecutor(params.upload_threads) as pool:
        list(pool.map(one, range(params.adapters)))


async def scenario(bench: Bench, params: Params, label: str, choices: list[int]) -> dict[str, Any]:
    work = prompts(len(choices), params.prompt_tokens, seed=3)
    async with bench.gateway(PREFIX) as gw:
        metrics = gw.server.gateway.residency.metrics
        if label == "single":
            await gw.user.generate(adapter_name(0), "warm up", GenerateOptions(max_tokens=1))
        base = asdict(residency_counts(metrics))
        names = [adapter_name(choice) for choice in choices]
        jobs = [
            (lambda a=name, i=ids: stream_request(gw.user, a, i, params.max_tokens))
            for name, ids in zip(names, work, strict=True)
        ]
        results, wall = await closed_loop(jobs, params.concurrency, bench.progress, label)
        after = asdict(residency_counts(metrics))
    delta = {k: int(after[k] - base[k]) for k in COUNTERS}
    n = len(results)
    disk_lookups = delta["disk_hits"] + delta["disk_misses"]
    ttfts = sorted(t for r in results if r.ok and (t := r.ttft) is not None)
    return {
        "scenario": label,
        "distinct_adapters": len(set(choices)),
        **summarize(results, wall),
        **delta,
        # A request that starts a load is an engine miss (one that joins a load already under
        # way waits for it but is not counted): hits = requests that started no load.
        "engine_hit_ratio": 1.0 - delta["engine_misses"] / n if n else float("nan"),
        "disk_hit_ratio": delta["disk_hits"] / disk_lookups if disk_lookups else float("nan"),
        "fetches_per_1k": 1000 * delta["disk_misses"] / n,
        "engine_loads_per_1k": 1000 * delta["engine_loads"] / n,
        "evictions_per_1k": 1000 * delta["evictions"] / n,
        "ttft_s": ttfts,
    }


async def run(bench: Bench, params: Params) -> dict[str, Any]:
    progress = bench.progress
    with progress.phase(f"many_adapters: upload {params.adapters}"):
        await asyncio.to_thread(upload_all, bench, params)
    scenarios: dict[str, dict[str, Any]] = {}
    singles: list[dict[str, Any]] = []

    async def single(index: int) -> None:
        with progress.phase(f"many_adapters: one adapter ({index + 1})"):
            singles.append(await scenario(bench, params, "single", [0] * params.requests))

    # The one-adapter baseline runs before, between and after the Zipf scenarios; the baseline
    # is the median of those runs, so that a burst of outside load on one run does not skew it.
    await single(0)
    for index, alpha in enumerate(params.alphas):
        label = f"zipf_{alpha:g}"
        with progress.phase(f"many_adapters: Zipf alpha={alpha:g}"):
            choices = zipf_choices(params.adapters, alpha, params.requests, seed=10 + index)
            scenarios[label] = await scenario(bench, params, label, choices)
        await single(index + 1)
    base_rps = float(np.median([r["throughput_rps"] for r in singles]))
    base_p99 = float(np.median([r["ttft_p99_s"] for r in singles]))
    middle = sorted(singles, key=lambda r: r["throughput_rps"])[len(singles) // 2]
    scenarios = {"single": middle, **scenarios}
    for result in scenarios.values():
        result["throughput_vs_single"] = result["throughput_rps"] / base_rps
        result["ttft_p99_vs_single"] = result["ttft_p99_s"] / base_p99
    headline: dict[str, float] = {}
    for label, result in scenarios.items():
        if label == "single":
            continue
        headline[f"{label}_throughput_vs_single"] = result["throughput_vs_single"]
        headline[f"{label}_ttft_p99_vs_single"] = result["ttft_p99_vs_single"]
        headline[f"{label}_engine_hit_ratio"] = result["engine_hit_ratio"]
        headline[f"{label}_disk_hit_ratio"] = result["disk_hit_ratio"]
        headline[f"{label}_fetches_per_1k"] = result["fetches_per_1k"]
        headline[f"{label}_evictions_per_1k"] = result["evictions_per_1k"]
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "engine": {
            "max_loras": bench.engine.max_loras,
            "max_cpu_loras": bench.engine.max_cpu_loras,
        },
        "scenarios": scenarios,
        "single_runs": [{k: v for k, v in r.items() if k != "ttft_s"} for r in singles],
        "single_baseline": {"throughput_rps": base_rps, "ttft_p99_s": base_p99},
        "headline": headline,
    }
