"""Overload: the excess is refused at once, admitted requests complete, tenants stay fair.

A gateway with small limits on the shared engine: 4 requests in flight in all, 2 each for the
tenants `flood` and `calm` (`acme` may use all 4). Requests are base-model generations long
enough (96 tokens) that refusals and completions are far apart in time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from tests.faults.conftest import FaultEnv, key_of, start_gateway

pytestmark = pytest.mark.engine

GLOBAL_CAP = 4
TENANT_CAP = 2  # flood and calm, from tests/faults/conftest.py TENANTS
LONG = 96
PROMPT = devtools.SAMPLE_PROMPTS[0]


@pytest.fixture(scope="module")
async def limited(
    fenv: FaultEnv, engine: VLLMEngine, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayServer]:
    work = tmp_path_factory.mktemp("overload")
    server = await start_gateway(
        engine,
        tiny_model,
        fenv.proxy,
        fenv.s3,
        work,
        max_concurrent_requests=GLOBAL_CAP,
    )
    yield server
    await server.stop(grace=1.0)


def client(server: GatewayServer, tenant: str) -> AsyncGatewayClient:
    return AsyncGatewayClient(f"127.0.0.1:{server.port}", key_of(tenant), max_retries=0)


async def timed(c: AsyncGatewayClient) -> tuple[str, float]:
    started = time.monotonic()
    try:
        await c.generate("", PROMPT, GenerateOptions(max_tokens=LONG, ignore_eos=True))
    except errors.ResourceExhausted as exc:
        reason = str(exc)  # admission refusals only, never the max_tokens cap
        if "in flight" not in reason and "capacity" not in reason:
            raise
        return "refused", time.monotonic() - started
    return "ok", time.monotonic() - started


async def test_twice_the_admitted_concurrency_excess_refused_fast(limited: GatewayServer) -> None:
    admission = limited.gateway.admission
    refusals: list[float] = []
    served: list[float] = []
    for tenant, cap in (("flood", TENANT_CAP), ("acme", GLOBAL_CAP)):
        async with client(limited, tenant) as c:
            for _ in range(3):
                outcomes = await asyncio.gather(*(timed(c) for _ in range(2 * cap)))
                kinds = [k for k, _ in outcomes]
                assert kinds.count("ok") == cap, (tenant, outcomes)
                assert kinds.count("refused") == cap, (tenant, outcomes)
                refusals += [t for k, t in outcomes if k == "refused"]
                served += [t for k, t in outcomes if k == "ok"]
    assert admission.total_in_flight == 0
    # "Quickly": a refusal costs a small fraction of one admitted request's engine time.
    assert max(refusals) < 0.25 * min(served), (max(refusals), min(served))
    print(
        f"\noverload: {len(refusals)} refused (max {max(refusals) * 1000:.0f} ms, median "
        f"{statistics.median(refusals) * 1000:.0f} ms), {len(served)} served (median "
        f"{statistics.median(served):.2f}s)"
    )


async def test_one_tenant_flooding_does_not_starve_another(limited: GatewayServer) -> None:
    counts = {"flood": {"ok": 0, "refused": 0}, "calm": {"ok": 0, "refused": 0}}
    peak = 0
    done = asyncio.Event()

    async def worker(tenant: str, attempts: int) -> None:
        async with client(limited, tenant) as c:
            for _ in range(attempts):
                kind, _ = await timed(c)
                counts[tenant][kind] += 1
                if kind == "refused":
                    await asyncio.sleep(0.02)  # a tight but bounded retry loop

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, limited.gateway.admission.total_in_flight)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    # flood: 4 workers (twice its cap) hammering; calm: 2 workers (its cap), 4 requests each.
    await asyncio.gather(
        *(worker("flood", 20) for _ in range(2 * TENANT_CAP)),
        *(worker("calm", 4) for _ in range(TENANT_CAP)),
    )
    took = time.monotonic() - started
    done.set()
    await sampler
    calm, flood = counts["calm"], counts["flood"]
    assert calm == {"ok": 4 * TENANT_CAP, "refused": 0}, counts
    assert flood["ok"] > 0, counts
    assert flood["refused"] > 0, counts
    assert peak <= GLOBAL_CAP
    print(
        f"\nfairness over {took:.1f}s: calm {calm['ok']}/{calm['ok'] + calm['refused']} served; "
        f"flood {flood['ok']}/{flood['ok'] + flood['refused']} served; peak in flight {peak}"
    )
