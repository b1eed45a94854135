"""Single flight under a thundering herd: many concurrent requests for one cold adapter.

Per trial, a fresh adapter (its own bytes, only in the store) and `requests` streaming requests
for it, all sent at once. Counted from residency's statistics: manifest reads, store fetches
(disk-cache misses), engine loads, and measured: the time until every request has its first
token (and the median), from the moment they were sent. Single flight means one manifest read,
one fetch and one engine load per trial, whatever the herd's size.

Beside it, in the same trial, the same herd again on the now warm adapter: the cold / warm ratio
of "all have their first token" is what the cold load costs a herd (the rest is the engine
prefilling that many prompts at once).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks._support import Bench, pct, prompts, stream_request
from lora_gateway import devtools
from tests.support.metrics import load_seconds, residency_counts

NAME = "herd"


@dataclass(frozen=True)
class Params:
    requests: int = 100
    trials: int = 5
    max_tokens: int = 4
    prompt_tokens: int = 16
    rank: int = 16


DEFAULT = Params()
SMOKE = Params(requests=30, trials=1, max_tokens=2)


def phases(params: Params) -> int:
    return params.trials


async def run(bench: Bench, params: Params) -> dict[str, Any]:
    trials: list[dict[str, Any]] = []
    async with bench.gateway("herd") as gw:
        metrics = gw.server.gateway.residency.metrics
        for trial in range(params.trials):
            with bench.progress.phase(f"herd: trial {trial + 1}/{params.trials}"):
                name = f"herd-{trial}"
                folder = devtools.write_random_lora(
                    bench.model, bench.work / "herd" / name, rank=params.rank, seed=500 + trial
                )
                await gw.admin.upload_adapter(name, folder)
                before = residency_counts(metrics)
                load_phases = ("fetch", "validate", "evict", "engine_add")
                load_before = sum(load_seconds(metrics, p)[1] for p in load_phases)
                work = prompts(params.requests, params.prompt_tokens, seed=trial)
                sent = time.perf_counter()
                results = await asyncio.gather(
                    *(stream_request(gw.user, name, ids, params.max_tokens) for ids in work)
                )
                firsts = [r.first - sent for r in results if r.first is not None]
                sent_warm = time.perf_counter()
                again = await asyncio.gather(
                    *(stream_request(gw.user, name, ids, params.max_tokens) for ids in work)
                )
                warm = [r.first - sent_warm for r in again if r.first is not None]
                stats = residency_counts(metrics).minus(before)
                load = sum(load_seconds(metrics, p)[1] for p in load_phases) - load_before
                trials.append(
                    {
                        "trial": trial,
                        "requests": params.requests,
                        "ok": sum(r.ok for r in results),
                        "warm_ok": sum(r.ok for r in again),
                        "errors": sorted({r.error for r in [*results, *again] if not r.ok}),
                        "manifest_fetches": int(stats.manifest_fetches),
                        "fetches": int(stats.disk_misses),
                        "engine_loads": int(stats.engine_loads),
                        "all_first_token_s": max(firsts) if firsts else float("nan"),
                        "median_first_token_s": pct(firsts, 50),
                        "first_first_token_s": min(firsts) if firsts else float("nan"),
                        "all_done_s": max(r.end for r in results) - sent,
                        "warm_all_first_token_s": max(warm) if warm else float("nan"),
                        "warm_median_first_token_s": pct(warm, 50),
                        "cold_vs_warm_all_first_token": (max(firsts) / max(warm))
                        if firsts and warm
                        else float("nan"),
                        "load_s": load,
                        "first_token_s": firsts,
                        "warm_first_token_s": warm,
                    }
                )
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "trials": trials,
        "headline": {
            "requests": params.requests,
            "fetches_max": max(t["fetches"] for t in trials),
            "engine_loads_max": max(t["engine_loads"] for t in trials),
            "manifest_fetches_max": max(t["manifest_fetches"] for t in trials),
            "all_first_token_ms_median": 1e3
            * float(np.median([t["all_first_token_s"] for t in trials])),
            "median_first_token_ms_median": 1e3
            * float(np.median([t["median_first_token_s"] for t in trials])),
            "warm_all_first_token_ms_median": 1e3
            * float(np.median([t["warm_all_first_token_s"] for t in trials])),
            "cold_vs_warm_all_first_token_median": float(
                np.median([t["cold_vs_warm_all_first_token"] for t in trials])
            ),
            "errors": sum(2 * t["requests"] - t["ok"] - t["warm_ok"] for t in trials),
        },
    }
