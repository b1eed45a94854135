"""Revocation racing requests on one replica, many trials.

Each trial uploads an adapter, warms it, starts 4 client loops that generate with it back to
back, revokes it at a random moment, lets the loops run on for 0.3 s, then checks:

- zero requests that started after RevokeAdapter returned succeeded (all NOT_FOUND);
- every request in flight when Revoke was called ended (OK if it finished first, else ABORTED
  or NOT_FOUND), nothing hangs (the whole trial is bounded), no other code appears.

(Propagation to another replica is tests/test_replicas.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.vllm_engine import VLLMEngine
from tests.conftest import AdapterFactory
from tests.faults.conftest import FaultEnv, start_gateway

pytestmark = pytest.mark.engine

PROMPT = devtools.SAMPLE_PROMPTS[2]
LOOPS = 4
AFTER_S = 0.3


@dataclass
class Record:
    started: float
    ended: float
    outcome: str


async def race(fenv: FaultEnv, adapter: object, trials: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    figures: Counter[str] = Counter()
    async with fenv.client("acme", "admin") as admin:
        clients = [fenv.client("acme") for _ in range(LOOPS)]
        try:
            for trial in range(trials):
                name = f"race-{seed}-{trial}"
                await admin.upload_adapter(name, adapter)  # type: ignore[arg-type]
                await clients[0].generate(name, PROMPT, GenerateOptions(max_tokens=2))
                records: list[Record] = []
                revoked: list[float] = []  # when RevokeAdapter returned

                async def loop(
                    client: object,
                    name: str = name,
                    records: list[Record] = records,
                    revoked: list[float] = revoked,
                ) -> None:
                    while not revoked or time.monotonic() < revoked[0] + AFTER_S:
                        started = time.monotonic()
                        try:
                            await client.generate(  # type: ignore[attr-defined]
                                name,
                                PROMPT,
                                GenerateOptions(max_tokens=16, ignore_eos=True),
                                timeout=30,
                            )
                            outcome = "ok"
                        except errors.NotFound:
                            outcome = "not_found"
                        except errors.Aborted:
                            outcome = "aborted"
                        records.append(Record(started, time.monotonic(), outcome))

                loops = [asyncio.create_task(loop(c)) for c in clients]
                await asyncio.sleep(rng.uniform(0.02, 0.3))
                called = await revoke(admin, name)
                revoked_at = time.monotonic()
                revoked.append(revoked_at)
                await asyncio.wait_for(asyncio.gather(*loops), 30)  # nothing hangs

                after = [r for r in records if r.started > revoked_at]
                in_flight = [r for r in records if r.started < called < r.ended]
                assert after, "requests were sent after the revocation"
                assert [r.outcome for r in after] == ["not_found"] * len(after), trial
                figures["trials"] += 1
                figures["after_revoke"] += len(after)
                figures["served_after_revoke"] += sum(r.outcome == "ok" for r in after)
                figures["before_revoke_ok"] += sum(
                    r.outcome == "ok" for r in records if r.ended <= called
                )
                for r in in_flight:
                    figures[f"in_flight_{r.outcome}"] += 1
        finally:
            for c in clients:
                await c.close()
    return figures


def report(figures: Counter[str]) -> None:
    print(f"\nrevocation race: {dict(sorted(figures.items()))}")


async def test_revocation_race_one_replica(
    fenv: FaultEnv, make_test_adapter: AdapterFactory
) -> None:
    figures = await race(fenv, make_test_adapter(seed=250, rank=8), trials=12, seed=7)
    report(figures)
    assert figures["served_after_revoke"] == 0
    assert figures["trials"] == 12


@pytest.mark.slow
async def test_revocation_race_one_replica_many_trials(
    fenv: FaultEnv,
    make_test_adapter: AdapterFactory,
    engine: VLLMEngine,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """60 trials, on a gateway of its own whose S3 read timeout is 5 s instead of the fault
    gateway's 1 s: over 60 uploads and whole-adapter revokes, SeaweedFS answered some requests
    between 1 and 5 s (five RevokeAdapter calls in a row failed with ReadTimeout at 1 s; all 60
    trials passed at 5 s). A slow store is not what this test measures."""
    server = await start_gateway(
        engine, tiny_model, fenv.proxy, fenv.s3, tmp_path, s3_read_timeout_s=5.0
    )
    try:
        patient = dataclasses.replace(fenv, server=server)
        figures = await race(patient, make_test_adapter(seed=251, rank=8), trials=60, seed=11)
    finally:
        await server.stop(grace=0)
    report(figures)
    assert figures["served_after_revoke"] == 0


#: RevokeAdapter calls per trial at most (one more each time the store did not answer in time).
REVOKE_ATTEMPTS = 5


async def revoke(admin: AsyncGatewayClient, name: str) -> float:
    """RevokeAdapter, again if the store did not answer within the fault gateway's 1 s read
    timeout (SeaweedFS sometimes takes longer: once in three full runs here); a store hiccup is
    not what these tests measure. Returns when the call that revoked began; NOT_FOUND on a
    retry means the earlier call's write went through."""
    for attempt in range(REVOKE_ATTEMPTS):
        called = time.monotonic()
        try:
            await admin.revoke_adapter(name)
            return called
        except errors.Unavailable:
            if attempt == REVOKE_ATTEMPTS - 1:
                raise
            await asyncio.sleep(1.0)  # a SeaweedFS stall lasts seconds: three at once failed
        except errors.NotFound:
            if attempt == 0:
                raise
            return called
    raise AssertionError("unreachable")
