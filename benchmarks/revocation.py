"""Revocation racing requests: how fast in-flight requests end, and that nothing runs after.

Per trial, a fresh adapter is uploaded and warmed, then:

1. `inflight` streaming requests with long outputs start on it; the trial waits until each has
   its first token (they are generating);
2. a racer starts a new streaming request on the adapter every `race_interval_s`, from before
   the revoke until `race_after_s` after it returned;
3. after a random delay (0 … `jitter_s`), RevokeAdapter is called (`t_call`) and returns
   (`t_return`), both as the admin client sees them.

Every request records when it was sent (`start`), when its last message or its error arrived
(`end`) and whether it succeeded. Definitions, per trial:

- `inflight_end_after_return_s`: max(end) - t_return over the requests sent before t_call and
  still running then: how long after RevokeAdapter returned the last in-flight request's client
  saw its error (<= 0 when all had ended before the admin saw the reply);
- `succeeded_started_after_return`: requests sent at or after t_return that succeeded. Must be 0
  (the version is refused once RevokeAdapter returned);
- `succeeded_completed_after_return`: requests that succeeded and whose last message arrived
  after t_return, whenever they were sent. Must be 0 as well here: outputs are long enough that
  none can finish during the trial, so a success would be a request that escaped the abort;
- `race_window`: outcomes of the requests sent between t_call and t_return (either is correct).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks._support import (
    USER_KEY,
    Bench,
    RequestResult,
    pct,
    stream_request,
    write_lora,
)
from lora_gateway import errors
from lora_gateway.client import GenerateOptions

NAME = "revocation"


@dataclass(frozen=True)
class Params:
    trials: int = 20
    inflight: int = 4
    max_tokens: int = 200
    race_interval_s: float = 0.01
    race_after_s: float = 0.2
    jitter_s: float = 0.05


DEFAULT = Params()
SMOKE = Params(trials=3)


def phases(params: Params) -> int:
    return 1


async def run(bench: Bench, params: Params) -> dict[str, Any]:
    rng = random.Random(6)
    trials: list[dict[str, Any]] = []
    problems: list[str] = []
    engine_died = False
    with bench.progress.phase(f"revocation: {params.trials} trials"):
        # No client retries (max_retries=0): every outcome is the server's first answer.
        async with (
            bench.gateway("revocation") as gw,
            gw.client(USER_KEY, max_retries=0, timeout=60.0) as user,
        ):
            for trial in range(params.trials):
                bench.progress.note(f"trial {trial + 1}/{params.trials}")
                try:
                    trials.append(await _trial(bench, gw, user, params, trial, rng))
                except errors.GatewayError as exc:
                    # The engine died (a revocation race can kill it): report, do not hide it.
                    problems.append(f"trial {trial}: {type(exc).__name__}: {exc}")
                    with contextlib.suppress(errors.GatewayError):
                        await bench.engine.check_health()
                        continue
                    problems.append(f"the engine died during trial {trial}; trials stopped")
                    engine_died = True
                    break
    inflight_end = [t["inflight_end_after_return_s"] for t in trials] or [float("nan")]
    revoke_rpc = [t["revoke_rpc_s"] for t in trials] or [float("nan")]
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "trials": trials,
        "problems": problems,
        "engine_died": engine_died,
        "summary": {
            "trials_completed": len(trials),
            "inflight_end_after_return_p50_s": pct(inflight_end, 50),
            "inflight_end_after_return_max_s": max(inflight_end),
            "revoke_rpc_p50_s": pct(revoke_rpc, 50),
            "revoke_rpc_max_s": max(revoke_rpc),
            "inflight_requests": sum(t["inflight"] for t in trials),
            "inflight_failed": sum(t["inflight_failed"] for t in trials),
            "racing_requests": sum(t["racers"] for t in trials),
            "succeeded_started_after_return": sum(
                t["succeeded_started_after_return"] for t in trials
            ),
            "succeeded_completed_after_return": sum(
                t["succeeded_completed_after_return"] for t in trials
            ),
            "errors": dict(sum((Counter(t["errors"]) for t in trials), Counter())),
        },
        "headline": {
            "trials": len(trials),
            "engine_died": engine_died,
            "inflight_end_after_return_ms_p50": 1e3 * pct(inflight_end, 50),
            "inflight_end_after_return_ms_max": 1e3 * max(inflight_end),
            "revoke_rpc_ms_p50": 1e3 * pct(revoke_rpc, 50),
            "succeeded_started_after_return": sum(
                t["succeeded_started_after_return"] for t in trials
            ),
            "succeeded_completed_after_return": sum(
                t["succeeded_completed_after_return"] for t in trials
            ),
        },
    }


async def _trial(
    bench: Bench, gw: Any, user: Any, params: Params, trial: int, rng: random.Random
) -> dict[str, Any]:
    name = f"rev-{trial}"
    folder = write_lora(bench.model, bench.work / "revocation" / name, rank=8, seed=900 + trial)
    await gw.admin.upload_adapter(name, folder)
    await user.generate(name, "warm up", GenerateOptions(max_tokens=1))
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    started = asyncio.Event()
    generating = 0

    def on_first() -> None:
        nonlocal generating
        generating += 1
        if generating == params.inflight:
            started.set()

    inflight = [
        asyncio.create_task(stream_request(user, name, ids, params.max_tokens, on_first=on_first))
        for _ in range(params.inflight)
    ]
    await asyncio.wait_for(started.wait(), 60)
    racers: list[asyncio.Task[RequestResult]] = []
    stop = asyncio.Event()

    async def race() -> None:
        while not stop.is_set():
            racers.append(asyncio.create_task(stream_request(user, name, ids, params.max_tokens)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), params.race_interval_s)

    racer = asyncio.create_task(race())
    await asyncio.sleep(rng.uniform(0, params.jitter_s))
    t_call = time.perf_counter()
    await gw.admin.revoke_adapter(name)
    t_return = time.perf_counter()
    await asyncio.sleep(params.race_after_s)
    stop.set()
    await racer
    first = await asyncio.gather(*inflight)
    raced = await asyncio.gather(*racers)
    everything = [*first, *raced]
    running = [r for r in everything if r.start < t_call and r.end >= t_call]
    window = [r for r in raced if t_call <= r.start < t_return]
    return {
        "trial": trial,
        "revoke_rpc_s": t_return - t_call,
        "inflight": len(running),
        "inflight_failed": sum(not r.ok for r in running),
        "inflight_end_after_return_s": max(r.end for r in running) - t_return,
        "inflight_end_after_return_each_s": [r.end - t_return for r in running],
        "racers": len(raced),
        "racers_before_call": sum(r.start < t_call for r in raced),
        "race_window": {
            "sent": len(window),
            "succeeded": sum(r.ok for r in window),
            "failed": sum(not r.ok for r in window),
        },
        "sent_after_return": sum(r.start >= t_return for r in everything),
        "succeeded_started_after_return": sum(r.ok and r.start >= t_return for r in everything),
        "succeeded_completed_after_return": sum(r.ok and r.end > t_return for r in everything),
        "errors": dict(Counter(r.error for r in everything if not r.ok)),
        # (sent, ended, succeeded) of every request, seconds relative to t_return.
        "requests": [[r.start - t_return, r.end - t_return, r.ok] for r in everything],
        "first_error_after_return_s": float(
            np.min([r.end - t_return for r in running if not r.ok] or [np.nan])
        ),
    }
