"""Many adapters: 1,000, then 10,000 in the store, Zipf-distributed requests, 16 loaded and 4
in a batch.

One real adapter is written, then uploaded through the Admin API (UploadAdapter, the SDK,
`upload_concurrency` at once) under `adapters` names, then up to `large` names; each copy is
perturbed in one lora_B element so that every name has its own bytes and sha256 (the disk cache
is keyed by sha256 alone: identical bytes would make every disk lookup after the first a hit).
After each upload stage: the upload rate, a full paginated ListAdapters (pages of 1,000), and
the resident memory of this process (the gateway; the engine runs in its own processes) with
that many manifests known.

Each scenario runs on a fresh gateway (empty residency, empty disk cache) on the shared engine
(`max_cpu_loras` 16, `max_loras` 4): `requests` streaming requests at concurrency C, adapters
drawn from a Zipf law of exponent alpha over the names (rank 1 most popular), twice: the cold
pass (everything starts in the store) and the steady pass (the same law, other draws, after the
cold one). The baseline is the same workload on one adapter (loaded by one warm-up request),
run before, between and after them (its median). Reported per pass: throughput and p99 time to
first token against the baseline, hit ratio per tier (engine: requests that did not have to
start a load; disk: loads that found the files in the disk cache), fetches (store downloads)
and evictions per 1,000 requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped]

from adapter_store.keys import index_ready_key
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
from lora_gateway.engine.base import Engine
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.metrics import LoadPhase
from tests.support.metrics import load_seconds, residency_counts

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
    large: int = 10_000
    """The second stage: uploaded up to this many, Zipf alpha=1 only (0 or <= adapters: none)."""
    requests: int = 400
    """Requests per scenario."""
    concurrency: int = 8
    alphas: tuple[float, ...] = (1.0, 0.5)
    prompt_tokens: int = 16
    max_tokens: int = 8
    rank: int = 8
    upload_concurrency: int = 4
    host_budget_bytes: int = 2 << 30
    """The `_host` scenarios (0: none): alpha=1 again at each size, on an engine whose host tier
    is this many bytes with `max_cpu_loras` derived from it (Settings.host_lora_budget_bytes):
    every adapter of the run fits in host memory, as in S-LoRA."""


DEFAULT = Params()
SMOKE = Params(
    adapters=20, large=40, requests=30, concurrency=4, max_tokens=4, host_budget_bytes=16 << 20
)


def _cache_size(params: Params) -> int:
    """Manifests each gateway caches: every adapter of the run (the default, 1,024, is for
    deployments of up to about that many)."""
    return max(params.adapters, params.large) + 1024


def _large(params: Params) -> bool:
    return params.large > params.adapters


def phases(params: Params) -> int:
    host = (4 + 2 * int(_large(params))) if params.host_budget_bytes else 0
    return 2 + 2 * len(params.alphas) + (3 if _large(params) else 0) + host


def adapter_name(index: int) -> str:
    return f"a{index:05d}"


def zipf_choices(count: int, alpha: float, size: int, seed: int) -> list[int]:
    """`size` draws from {0..count-1}, P(k) ∝ (k+1)^-alpha."""
    weights = 1.0 / np.arange(1, count + 1, dtype=float) ** alpha
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(count, size=size, p=weights / weights.sum())]


#: Full listings per stage and way (from the listing index, from the manifests), alternating.
LISTINGS = 3


async def _list_both_ways(gw: Any, times: int) -> dict[str, Any]:
    """A full paginated ListAdapters (pages of 1,000, which the server lowers to 200) `times`
    over, from the listing index and then from the manifests (its `ready` marker taken away for
    that pass and put back after: the listing a store without the index gets)."""
    backend = gw.server.gateway.store.backend
    ready = index_ready_key(TENANT)
    seconds: dict[str, list[float]] = {"index_s": [], "manifests_s": []}
    counts = set()
    for _ in range(times):
        for way in ("index_s", "manifests_s"):
            if way == "manifests_s":
                await asyncio.to_thread(backend.delete, ready)
            try:
                began = time.perf_counter()
                counts.add(len([a.name async for a in gw.admin.iter_adapters(page_size=1000)]))
                seconds[way].append(time.perf_counter() - began)
            finally:
                await asyncio.to_thread(backend.put, ready, b"")
    if len(counts) != 1:
        raise AssertionError(f"the two ways listed different counts: {sorted(counts)}")
    return {**seconds, "listed": counts.pop()}


async def upload_range(bench: Bench, params: Params, start: int, stop: int) -> dict[str, Any]:
    """Upload adapters `start`..`stop - 1` through the Admin API (`upload_concurrency` at once),
    then list every adapter (pages of 1,000); the rate, the listing and this process's memory."""
    modules = devtools.ATTENTION_MODULES
    base = devtools.random_lora_tensors(bench.model, rank=params.rank, seed=7, modules=modules)
    config = devtools.lora_config(params.rank, modules)
    first_b = next(name for name in sorted(base) if name.endswith("lora_B.weight"))
    root = bench.work / "many"
    done = 0

    def write(index: int) -> Any:
        tensors = dict(base)
        tensors[first_b] = base[first_b].copy()
        tensors[first_b][0, 0] += np.float32(1e-4 * (index + 1))
        return devtools.save_lora(root / adapter_name(index), tensors, config)

    async with bench.gateway(PREFIX, manifest_cache_size=_cache_size(params)) as gw:
        gate = asyncio.Semaphore(params.upload_concurrency)

        async def one(index: int) -> None:
            nonlocal done
            async with gate:
                folder = await asyncio.to_thread(write, index)
                await gw.admin.upload_adapter(adapter_name(index), folder)
                await asyncio.to_thread(shutil.rmtree, folder)
            done += 1
            if done % 100 == 0:
                bench.progress.note(f"uploaded {start + done}/{stop}")

        began = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(start, stop)))
        upload_s = time.perf_counter() - began
        listing = await _list_both_ways(gw, LISTINGS)
        listed = listing["listed"]
        # Every manifest known to the gateway (read into its manifest cache), as on a replica
        # that has served each adapter once.
        residency = gw.server.gateway.residency
        reads = asyncio.Semaphore(16)

        async def read(index: int) -> None:
            async with reads:
                await residency.manifest(TENANT, adapter_name(index))

        await asyncio.gather(*(read(index) for index in range(stop)))
        known = residency.cached_manifests()
    rss = psutil.Process().memory_info().rss
    return {
        "uploaded": stop - start,
        "upload_s": upload_s,
        "uploads_per_s": (stop - start) / upload_s,
        "stored": stop,
        "listed": listed,
        "list_all_s": statistics.median(listing["index_s"]),
        "list_all_index_s": listing["index_s"],
        "list_all_manifests_s": listing["manifests_s"],
        "manifests_known": known,
        "gateway_rss_mib": rss / 2**20,
    }


async def scenario(
    bench: Bench,
    params: Params,
    label: str,
    passes: list[list[int]],
    engine: Engine | None = None,
    preload: int = 0,
    **changes: Any,
) -> list[dict[str, Any]]:
    """`passes` one after another on one fresh gateway (on `engine`, with `changes` to its
    settings): one result each. With `preload`, adapters 0..preload-1 are each asked for one
    token first (at `concurrency`, unmeasured by the passes): every adapter in host memory
    before the first pass, as S-LoRA's setup has them; the first result is then that warm-up's
    (`preload_s`, loads)."""
    out = []
    cache_size = _cache_size(params)
    async with bench.gateway(PREFIX, engine, manifest_cache_size=cache_size, **changes) as gw:
        metrics = gw.server.gateway.residency.metrics
        if label == "single":
            await gw.user.generate(adapter_name(0), "warm up", GenerateOptions(max_tokens=1))
        if preload:
            ids = prompts(1, params.prompt_tokens, seed=2)[0]
            before = asdict(residency_counts(metrics))
            warm = [
                (lambda a=name: stream_request(gw.user, a, ids, 1))
                for name in map(adapter_name, range(preload))
            ]
            results, wall = await closed_loop(warm, params.concurrency, bench.progress, label)
            after = asdict(residency_counts(metrics))
            failed = sum(not r.ok for r in results)
            out.append(
                {
                    "preload_s": wall,
                    "preloaded": preload,
                    "failed": failed,
                    **{k: int(after[k] - before[k]) for k in COUNTERS},
                }
            )
        for number, choices in enumerate(passes):
            work = prompts(len(choices), params.prompt_tokens, seed=3 + number)
            base = asdict(residency_counts(metrics))
            phases_before = {phase: load_seconds(metrics, phase) for phase in LOAD_PHASES}
            names = [adapter_name(choice) for choice in choices]
            jobs = [
                (lambda a=name, i=ids: stream_request(gw.user, a, i, params.max_tokens))
                for name, ids in zip(names, work, strict=True)
            ]
            results, wall = await closed_loop(jobs, params.concurrency, bench.progress, label)
            after = asdict(residency_counts(metrics))
            phases = {
                phase: _phase(phases_before[phase], load_seconds(metrics, phase))
                for phase in LOAD_PHASES
            }
            out.append({**_result(label, choices, results, wall, base, after), "load": phases})
    return out


#: The phases of a cold load (Metrics.LoadPhase); `evict` only in loads that made room.
LOAD_PHASES: tuple[LoadPhase, ...] = ("fetch", "validate", "evict", "engine_add")


def _phase(before: tuple[int, float], after: tuple[int, float]) -> dict[str, float]:
    """How many loads of a pass recorded a phase, and their mean (ms)."""
    loads, seconds = after[0] - before[0], after[1] - before[1]
    return {"loads": loads, "mean_ms": 1e3 * seconds / loads if loads else 0.0}


def _result(
    label: str,
    choices: list[int],
    results: list[Any],
    wall: float,
    base: dict[str, Any],
    after: dict[str, Any],
) -> dict[str, Any]:
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
    uploads = []
    with progress.phase(f"many_adapters: upload {params.adapters} through the API"):
        uploads.append(await upload_range(bench, params, 0, params.adapters))
    scenarios: dict[str, dict[str, Any]] = {}
    singles: list[dict[str, Any]] = []

    async def single(index: int) -> None:
        with progress.phase(f"many_adapters: one adapter ({index + 1})"):
            singles.extend(await scenario(bench, params, "single", [[0] * params.requests]))

    host: dict[str, Any] = {}  # the engine of the `_host` scenarios and their baseline

    async def zipf(count: int, alpha: float, seed: int, on_host: bool = False) -> None:
        label = f"zipf_{alpha:g}" + ("" if count == params.adapters else f"_{count}")
        label += "_host" if on_host else ""
        what = " (host tier in bytes)" if on_host else ""
        with progress.phase(f"many_adapters: {count} adapters, Zipf alpha={alpha:g}{what}"):
            passes = [
                zipf_choices(count, alpha, params.requests, seed=s) for s in (seed, seed + 50)
            ]
            if on_host:
                cold, steady = await scenario(
                    bench, params, label, passes, host["engine"], **host["changes"]
                )
            else:
                cold, steady = await scenario(bench, params, label, passes)
        cold_label = label.replace("_host", "_cold_host") if on_host else f"{label}_cold"
        scenarios[cold_label] = {**cold, "scenario": cold_label, "adapters": count}
        scenarios[label] = {**steady, "adapters": count}

    async def preloaded(count: int, seed: int) -> None:
        """Zipf alpha=1 (the steady pass's draws of `zipf(count, 1.0, seed)`) on the host-tier
        engine after every one of the `count` adapters was loaded once."""
        label = "zipf_1" + ("" if count == params.adapters else f"_{count}") + "_preloaded_host"
        with progress.phase(f"many_adapters: {count} adapters preloaded, Zipf alpha=1"):
            steady_draws = zipf_choices(count, 1.0, params.requests, seed=seed + 50)
            warm, steady = await scenario(
                bench, params, label, [steady_draws], host["engine"], preload=count,
                **host["changes"],
            )  # fmt: skip
        scenarios[label] = {**steady, "adapters": count, "preload": warm}

    # The one-adapter baseline runs before, between and after the Zipf scenarios; the baseline
    # is the median of those runs, so that a burst of outside load on one run does not skew it.
    await single(0)
    for index, alpha in enumerate(params.alphas):
        await zipf(params.adapters, alpha, 10 + index)
        await single(index + 1)
    async with contextlib.AsyncExitStack() as stack:
        if params.host_budget_bytes:
            with progress.phase("many_adapters: engine with a host tier in bytes"):
                host["changes"] = {
                    "max_cpu_loras": None,
                    "host_lora_budget_bytes": params.host_budget_bytes,
                }
                host["engine"] = await VLLMEngine.start(
                    bench.engine_settings().replace(**host["changes"])
                )
                stack.push_async_callback(host["engine"].shutdown)
            with progress.phase("many_adapters: one adapter, host-tier engine"):
                host["singles"] = await scenario(
                    bench, params, "single", [[0] * params.requests], host["engine"],
                    **host["changes"],
                )  # fmt: skip
            await zipf(params.adapters, 1.0, 10, on_host=True)  # the draws of zipf_1
            await preloaded(params.adapters, 10)
        if _large(params):
            with progress.phase(f"many_adapters: upload up to {params.large} through the API"):
                uploads.append(await upload_range(bench, params, params.adapters, params.large))
            await zipf(params.large, 1.0, 30)
            await single(len(params.alphas) + 1)
            if params.host_budget_bytes:
                await zipf(params.large, 1.0, 30, on_host=True)
                await preloaded(params.large, 30)
        host_cpu_loras = host["engine"].max_cpu_loras if host else None
    base_rps = float(np.median([r["throughput_rps"] for r in singles]))
    base_p99 = float(np.median([r["ttft_p99_s"] for r in singles]))
    middle = sorted(singles, key=lambda r: r["throughput_rps"])[len(singles) // 2]
    scenarios = {"single": middle, **scenarios}
    if host:
        scenarios["single_host"] = {**host["singles"][0], "scenario": "single_host"}
    for label, result in scenarios.items():
        # A `_host` scenario against the one adapter on its own engine.
        one = scenarios["single_host"] if label.endswith("_host") else None
        result["throughput_vs_single"] = result["throughput_rps"] / (
            one["throughput_rps"] if one else base_rps
        )
        result["ttft_p99_vs_single"] = result["ttft_p99_s"] / (
            one["ttft_p99_s"] if one else base_p99
        )
    headline: dict[str, float] = {}
    for label, result in scenarios.items():
        if label.startswith("single"):
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
        "host_engine": None
        if host_cpu_loras is None
        else {"host_lora_budget_bytes": params.host_budget_bytes, "max_cpu_loras": host_cpu_loras},
        "scenarios": scenarios,
        "single_runs": [{k: v for k, v in r.items() if k != "ttft_s"} for r in singles],
        "single_baseline": {"throughput_rps": base_rps, "ttft_p99_s": base_p99},
        "uploads": uploads,
        "headline": headline,
    }
