"""Peer on many adapters: the gateway against stock `vllm serve` resolving adapters itself.

`adapters` adapters (200) under Zipf traffic, the scale issue's second peer workload. Both
systems run as server processes on 127.0.0.1, one at a time, with the same engine settings
(float32, eager, `max_loras` 4, `max_cpu_loras` 16, rank 16, 16 sequences):
- the gateway: `lora-gateway serve` on a local-folder store holding the adapters (its tiers:
  store, disk cache, engine);
- the peer: `python -m vllm.entrypoints.openai.api_server` with runtime LoRA updating and vLLM's
  own filesystem resolver (the `lora_filesystem_resolver` plugin) over a folder holding one
  folder per adapter name: a request naming an adapter it has not loaded yet resolves it there.

Each system, fresh (nothing loaded), per pass:
1. cold: `cold_probes` adapters nobody else asks for, one request each, one at a time, 1 token:
   the latency of an adapter's first request; then the same again (warm) for comparison (and
   after both systems, the gateway once more with its runtime canary off, cold probes only:
   `NO_CANARY`);
2. solo answers: every (adapter, prompt) of the workload alone, the reference for wrongs;
3. `rounds` closed-loop rounds of `requests` requests at `concurrency`, adapters drawn from a
   Zipf law of exponent `alpha` over the names (seeded: the same draws for both systems and
   every round; 113 distinct of 200 at the defaults), `tokens` tokens (greedy, `ignore_eos`).
Passes alternate which system goes first. Reported: per system the median req/s with its
10th-90th percentile, the rounds in a slow phase (below half the median of the upper half), the
median of the upper half ("fast phase": the like-phases comparison), wrong outputs, and the
cold and warm first-token latency; the ratios of the medians. Standalone, like `peer`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai

from benchmarks._support import Progress, prompts
from benchmarks.many_adapters import zipf_choices
from benchmarks.peer import (
    TENANT,
    Ask,
    gateway_ask,
    gateway_server,
    measure,
    peer_ask,
    peer_server,
    stats,
)
from lora_gateway import devtools
from lora_gateway.client import AsyncGatewayClient
from tests.support.gateway import ENGINE_DEFAULTS, key_of

NAME = "peer_zipf"
STANDALONE = True
#: The issue's settings for this workload: 4 adapters in a batch, 16 loaded.
ENGINE: dict[str, object] = {**ENGINE_DEFAULTS, "max_loras": 4, "max_cpu_loras": 16}


@dataclass(frozen=True)
class Params:
    adapters: int = 200
    alpha: float = 1.0
    requests: int = 400
    concurrency: int = 8
    tokens: int = 8
    prompt_tokens: int = 8
    distinct_prompts: int = 2
    rounds: int = 8
    passes: int = 2
    cold_probes: int = 12


DEFAULT = Params()
SMOKE = Params(adapters=12, requests=24, concurrency=4, tokens=4, rounds=2, passes=1, cold_probes=2)
SYSTEMS = ("gateway", "peer")
#: Cold probes only: the gateway with its runtime canary off. The canary checks the engine right
#: after the first request on each newly loaded version (engine/canary.py), so on the gateway a
#: cold request that follows another shares the engine with that check; this tells the load
#: path's own cost from the check's.
NO_CANARY = "gateway_no_canary"


def phases(params: Params) -> int:
    return 1 + (len(SYSTEMS) + 1) * params.passes


def names(params: Params) -> list[str]:
    return [f"z{i:04d}" for i in range(params.adapters + params.cold_probes)]


def workload(params: Params) -> list[tuple[str, list[int]]]:
    """The round's requests: Zipf draws over the first `adapters` names, prompts in turn."""
    all_names = names(params)
    ids = prompts(params.distinct_prompts, params.prompt_tokens, seed=9)
    draws = zipf_choices(params.adapters, params.alpha, params.requests, seed=21)
    return [(all_names[k], ids[i % len(ids)]) for i, k in enumerate(draws)]


def first_token_ask(ask: Ask) -> Callable[[str, list[int]], Awaitable[float]]:
    """The latency of one request (its `ask` is built for 1 token: the time to first token)."""

    async def timed(model: str, ids: list[int]) -> float:
        started = time.perf_counter()
        await ask(model, ids)
        return time.perf_counter() - started

    return timed


async def cold_and_warm(ask: Ask, params: Params) -> dict[str, list[float]]:
    """The probes' first requests (cold: nothing of them loaded), then their second (warm)."""
    timed = first_token_ask(ask)
    probe_names = names(params)[params.adapters :]
    ids = prompts(1, params.prompt_tokens, seed=11)[0]
    cold = [await timed(name, ids) for name in probe_names]
    warm = [await timed(name, ids) for name in probe_names]
    return {"cold_s": cold, "warm_s": warm}


async def one_system(
    system: str,
    model: Path,
    work: Path,
    folders: dict[str, Path],
    params: Params,
    progress: Progress,
) -> dict[str, Any]:
    from tests.support.processes import free_port

    jobs = workload(params)
    one_token = dataclass_replace(params, tokens=1)
    if system.startswith("gateway"):
        # Fresh like the peer: its disk cache too (the store stays: the peer's folder does).
        await asyncio.to_thread(shutil.rmtree, work / "gateway" / "cache", ignore_errors=True)
        changes = {"canary_interval_s": 0} if system == NO_CANARY else {}
        with gateway_server(
            model, work / "gateway", folders, engine=ENGINE, changes=changes
        ) as target:
            async with AsyncGatewayClient(target, key_of(TENANT)) as client:
                latency = await cold_and_warm(gateway_ask(client, one_token), params)
                if system == NO_CANARY:
                    return latency
                result = await measure(gateway_ask(client, params), params, progress, system, jobs)
    else:
        with peer_server(
            model, {}, free_port(), engine=ENGINE, resolver_dir=work / "adapters"
        ) as base_url:
            http = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
            try:
                latency = await cold_and_warm(peer_ask(http, one_token), params)
                result = await measure(peer_ask(http, params), params, progress, system, jobs)
            finally:
                await http.close()
    return {**result, **latency}


def dataclass_replace(params: Params, **changes: Any) -> Params:
    return Params(**{**asdict(params), **changes})


def summarize_system(passes: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    rates = list(itertools.chain.from_iterable(p["rounds_rps"] for p in passes))
    cold = list(itertools.chain.from_iterable(p["cold_s"] for p in passes))
    warm = list(itertools.chain.from_iterable(p["warm_s"] for p in passes))
    return {
        **stats(rates),
        "wrong_outputs": sum(sum(p["wrong"]) for p in passes),
        "outputs": params.requests * len(rates),
        "cold_p50_s": float(np.median(cold)),
        "warm_p50_s": float(np.median(warm)),
        "passes": passes,
    }


async def run_standalone(work: Path, params: Params, progress: Progress) -> dict[str, Any]:
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    with progress.phase(f"peer_zipf: tiny model and {params.adapters} adapters"):
        model = await asyncio.to_thread(devtools.make_model, work / "tiny-llama")
        # The peer's resolver accepts an adapter whose base_model_name_or_path is the served
        # model's path; the gateway accepts that path as an alias of its base too.
        write = functools.partial(devtools.write_random_lora, model, rank=8, base_model=str(model))
        folders = {
            name: await asyncio.to_thread(write, work / "adapters" / name, seed=100 + i)
            for i, name in enumerate(names(params))
        }
    distinct = len({name for name, _ in workload(params)})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in (*SYSTEMS, NO_CANARY)}
    for number in range(params.passes):
        for system in (*(SYSTEMS if number % 2 == 0 else SYSTEMS[::-1]), NO_CANARY):
            with progress.phase(f"peer_zipf: pass {number + 1}, {system}"):
                runs[system].append(
                    await one_system(system, model, work, folders, params, progress)
                )
    no_canary = runs.pop(NO_CANARY)
    systems = {name: summarize_system(passes, params) for name, passes in runs.items()}
    cold_nc = [x for p in no_canary for x in p["cold_s"]]
    warm_nc = [x for p in no_canary for x in p["warm_s"]]
    systems[NO_CANARY] = {
        "cold_p50_s": float(np.median(cold_nc)),
        "warm_p50_s": float(np.median(warm_nc)),
        "passes": no_canary,
    }
    gateway, peer = systems["gateway"], systems["peer"]
    headline = {
        "gateway_vs_peer": gateway["median_rps"] / peer["median_rps"],
        "gateway_vs_peer_fast_phase": gateway["fast_phase_rps"] / peer["fast_phase_rps"],
        "cold_p50_gateway_vs_peer": gateway["cold_p50_s"] / peer["cold_p50_s"],
        "cold_p50_gateway_no_canary_vs_peer": systems[NO_CANARY]["cold_p50_s"] / peer["cold_p50_s"],
        "gateway_wrong": gateway["wrong_outputs"],
        "peer_wrong": peer["wrong_outputs"],
    }
    problems = [f"gateway returned {gateway['wrong_outputs']} wrong outputs"] * bool(
        gateway["wrong_outputs"]
    )
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "distinct_adapters_used": distinct,
        "engine": ENGINE,
        "systems": systems,
        "headline": headline,
        "problems": problems,
    }


async def run(bench: Any, params: Params) -> dict[str, Any]:
    return await run_standalone(bench.work / NAME, params, bench.progress)
