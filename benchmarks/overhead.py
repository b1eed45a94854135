"""Gateway overhead: the same workload through the gRPC gateway and straight into the engine.

N requests at concurrency C, prompts of a fixed length (seeded, the same list for every path),
a fixed output length (`ignore_eos`), a round-robin mix of adapters and the base model. Three
paths, run in interleaved rounds so that machine noise hits all of them alike:

- `engine`: `Engine.generate` in this process, the adapters held loaded through residency (the
  very `LoadedAdapter`s the gateway uses);
- `gateway_unary`: `Generate` through a real loopback gRPC connection to the gateway in this
  process (authentication, admission, resolution, residency, protobuf both ways);
- `gateway_stream`: `GenerateStream`, the same way.

Reported: throughput ratio gateway / engine, added p50 / p99 latency per request, time to first
token both ways (unary responses carry every token at once, so their "first token" is the whole
response). Each comparison pairs a gateway run with the engine run of the same round (adjacent
in time; the order of the paths rotates from round to round) and takes the median over rounds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from adapter_store import AdapterRef
from benchmarks._support import (
    TENANT,
    Bench,
    RequestResult,
    closed_loop,
    engine_request,
    prompts,
    stream_request,
    summarize,
    unary_request,
    write_lora,
)
from lora_gateway import devtools
from lora_gateway.client import GenerateOptions
from lora_gateway.engine.base import LoadedAdapter

NAME = "overhead"
Job = Callable[[], Awaitable[RequestResult]]
PATHS = ("engine", "gateway_unary", "gateway_stream")


@dataclass(frozen=True)
class Params:
    requests: int = 120
    """Requests per path per round."""
    concurrency: int = 8
    prompt_tokens: int = 32
    max_tokens: int = 16
    adapters: int = 3
    """Adapters in the mix (plus the base model)."""
    rounds: int = 8
    warmup: int = 16


DEFAULT = Params()
SMOKE = Params(requests=12, concurrency=4, max_tokens=4, rounds=2, warmup=4)


def phases(params: Params) -> int:
    return 1 + params.rounds * len(PATHS)


async def run(bench: Bench, params: Params) -> dict[str, Any]:
    progress = bench.progress
    async with bench.gateway("overhead") as gw:
        with progress.phase("overhead: upload + warm adapters"):
            names: list[str] = []
            described: list[str] = []
            for index in range(params.adapters):
                name = f"mix-{index}"
                rank, every = 8 * (index + 1), bool(index % 2)
                folder = write_lora(
                    bench.model,
                    bench.work / "overhead" / name,
                    rank=rank,
                    seed=100 + index,
                    modules=devtools.ALL_MODULES if every else devtools.ATTENTION_MODULES,
                )
                await gw.admin.upload_adapter(name, folder)
                names.append(name)
                described.append(f"{name}: rank {rank}, {'all' if every else 'attention'} modules")
            mix = [*names, ""]  # "" = the base model
            for name in mix:
                await gw.user.generate(name, "warm up", GenerateOptions(max_tokens=2))
        residency = gw.server.gateway.residency
        versions = [await residency.resolve(TENANT, AdapterRef.parse(n)) for n in names]
        work = prompts(params.requests, params.prompt_tokens, seed=1)
        warm = prompts(params.warmup, params.prompt_tokens, seed=2)
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
        samples: dict[str, list[RequestResult]] = {path: [] for path in PATHS}

        async with contextlib.AsyncExitStack() as stack:
            # Hold every adapter loaded for the whole benchmark (no eviction, no reload).
            held = [await stack.enter_async_context(residency.use(v)) for v in versions]
            loaded: dict[str, LoadedAdapter | None] = dict(zip(names, held, strict=True))
            loaded[""] = None

            def jobs(path: str, batch: list[list[int]]) -> list[Job]:
                out: list[Job] = []
                for index, ids in enumerate(batch):
                    adapter = mix[index % len(mix)]
                    if path == "engine":
                        out.append(
                            partial(
                                engine_request,
                                bench.engine,
                                loaded[adapter],
                                ids,
                                params.max_tokens,
                            )
                        )
                    elif path == "gateway_unary":
                        out.append(partial(unary_request, gw.user, adapter, ids, params.max_tokens))
                    else:
                        out.append(
                            partial(stream_request, gw.user, adapter, ids, params.max_tokens)
                        )
                return out

            for round_ in range(params.rounds):
                shift = round_ % len(PATHS)  # each path takes each position in turn
                for path in PATHS[shift:] + PATHS[:shift]:
                    with progress.phase(f"overhead: round {round_ + 1} {path}"):
                        if round_ == 0 and warm:
                            await closed_loop(jobs(path, warm), params.concurrency)
                        results, wall = await closed_loop(
                            jobs(path, work), params.concurrency, progress, path
                        )
                        runs[path].append(summarize(results, wall))
                        samples[path].extend(results)

    totals = {path: _combine(runs[path], samples[path]) for path in PATHS}
    engine = totals["engine"]
    comparison = {path: _compare(runs[path], runs["engine"]) for path in PATHS[1:]}
    for path in PATHS[1:]:
        comparison[path]["throughput_ratio_pooled"] = (
            totals[path]["throughput_rps"] / engine["throughput_rps"]
        )
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "mix": [*described, "base model"],
        "paths": totals,
        "rounds": runs,
        "comparison": comparison,
        "samples": {
            path: {
                "latency_s": [r.latency for r in samples[path] if r.ok],
                "ttft_s": [t for r in samples[path] if r.ok and (t := r.ttft) is not None],
            }
            for path in PATHS
        },
        "headline": {
            "throughput_ratio_unary": comparison["gateway_unary"]["throughput_ratio"],
            "throughput_ratio_stream": comparison["gateway_stream"]["throughput_ratio"],
            "added_latency_p50_ms_unary": 1e3 * comparison["gateway_unary"]["added_latency_p50_s"],
            "added_latency_p99_ms_unary": 1e3 * comparison["gateway_unary"]["added_latency_p99_s"],
            "added_latency_p50_ms_stream": 1e3
            * comparison["gateway_stream"]["added_latency_p50_s"],
            "added_latency_p99_ms_stream": 1e3
            * comparison["gateway_stream"]["added_latency_p99_s"],
            "ttft_p50_ms_engine": 1e3 * engine["ttft_p50_s"],
            "ttft_p50_ms_stream": 1e3 * totals["gateway_stream"]["ttft_p50_s"],
        },
    }


def _compare(path: list[dict[str, Any]], engine: list[dict[str, Any]]) -> dict[str, Any]:
    """Gateway against engine, round by round (adjacent in time), then the median over rounds.

    Pairing runs that ran back to back cancels most of the drift of a shared, noisy machine;
    the median discards the rounds a burst of outside load hit.
    """
    pairs = list(zip(path, engine, strict=True))
    ratios = [p["throughput_rps"] / e["throughput_rps"] for p, e in pairs]

    def added(key: str) -> float:
        return float(np.median([p[key] - e[key] for p, e in pairs]))

    return {
        "throughput_ratio": float(np.median(ratios)),
        "throughput_ratio_per_round": ratios,
        "added_latency_p50_s": added("latency_p50_s"),
        "added_latency_p99_s": added("latency_p99_s"),
        "added_ttft_p50_s": added("ttft_p50_s"),
        "added_ttft_p99_s": added("ttft_p99_s"),
    }


def _combine(rounds: list[dict[str, Any]], samples: list[RequestResult]) -> dict[str, Any]:
    """All rounds of one path together: throughput over the summed wall time."""
    wall = sum(r["wall_s"] for r in rounds)
    return summarize(samples, wall)
