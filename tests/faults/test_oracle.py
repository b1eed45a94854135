"""The existence oracle, with the store up, broken and down (DESIGN invariants 6 and 12).

Tenant globex names three kinds of acme's names: one that exists (and whose manifest this
replica has cached, because acme uses it), one whose stored manifest is garbage, and names that
do not exist. None is shared with globex, so all three must be answered alike: same code, same
text, and latencies from one distribution (Mann-Whitney and KS at alpha 0.001 each,
tests/support/stats.py), whether the store answers or is a black hole. Before, the existing
name was NOT_FOUND from the cache, the garbage one DATA_LOSS, and a missing one cost a store
round trip, or UNAVAILABLE once the store was down.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest

from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from tests.conftest import AdapterFactory
from tests.faults.conftest import PREFIX, FaultEnv
from tests.support.metrics import residency_counts
from tests.support.stats import indistinguishable

pytestmark = pytest.mark.engine

PROMPT = devtools.SAMPLE_PROMPTS[0]
SAMPLES = 60
KEPT, JUNK = "acme/orc-kept", "acme/orc-junk"


async def _probe(client: AsyncGatewayClient, ref: str) -> tuple[float, str, str]:
    started = time.perf_counter()
    try:
        await client.generate(ref, PROMPT, GenerateOptions(max_tokens=1), timeout=10.0)
    except errors.GatewayError as exc:
        return time.perf_counter() - started, exc.code.name, str(exc)
    return time.perf_counter() - started, "OK", ""


async def _sample(client: AsyncGatewayClient, seed: int) -> dict[str, list[float]]:
    """SAMPLES probes of each kind in random order; fails at the first answer that differs."""
    asks = [KEPT] * SAMPLES + [JUNK] * SAMPLES + [f"acme/orm{i:05d}" for i in range(SAMPLES)]
    random.Random(seed).shuffle(asks)
    latencies: dict[str, list[float]] = {"kept": [], "junk": [], "missing": []}
    for ref in asks:
        seconds, code, text = await _probe(client, ref)
        assert (code, text) == ("NOT_FOUND", errors.ADAPTER_NOT_FOUND_TEXT), (ref, code, text)
        kind = {KEPT: "kept", JUNK: "junk"}.get(ref, "missing")
        latencies[kind].append(seconds)
    return latencies


def _compare(latencies: dict[str, list[float]], label: str) -> None:
    medians = ", ".join(
        f"{kind} {statistics.median(values) * 1e3:.2f} ms" for kind, values in latencies.items()
    )
    for kind in ("kept", "junk"):
        compared = indistinguishable(latencies[kind], latencies["missing"])
        print(f"\noracle ({label}): {medians}; {kind} vs missing: {compared}")
        assert compared.same, (label, kind, str(compared))


async def test_other_tenants_names_answer_like_missing_ones_store_up_and_down(
    fenv: FaultEnv, make_test_adapter: AdapterFactory
) -> None:
    async with fenv.client("acme", "admin") as admin, fenv.client("acme") as acme:
        await admin.upload_adapter("orc-kept", make_test_adapter(seed=290, rank=8))
        await acme.generate(
            "orc-kept", PROMPT, GenerateOptions(max_tokens=1)
        )  # cached on this replica now
    fenv.s3.client().put_object(
        Bucket=fenv.s3.bucket,
        Key=f"{PREFIX}/tenants/acme/adapters/orc-junk/manifest.json",
        Body=b'{"format": 1, "tenant": ',
    )
    residency = fenv.server.gateway.residency
    async with fenv.client("globex", max_retries=0) as globex:
        for i in range(10):  # warm the channel and globex's share index
            await _probe(globex, f"acme/wrm{i:05d}")
        fetches = residency_counts(residency.metrics).manifest_fetches
        _compare(await _sample(globex, seed=1), "store up")

        fenv.proxy.blackhole()
        _compare(await _sample(globex, seed=2), "store down")
        assert (
            residency_counts(residency.metrics).manifest_fetches == fetches
        )  # no name of acme's was read

    # A tenant whose share index was never read sees the store's error, the same for all
    # (calm admits 2 requests at once: two pairs, each pair waiting on one index read).
    answers: list[tuple[float, str, str]] = []
    async with fenv.client("calm", max_retries=0) as calm:
        for pair in ((KEPT, "acme/orm-cold"), (JUNK, "acme/orm-cld2")):
            answers += await asyncio.gather(*(_probe(calm, ref) for ref in pair))
    assert {(code, text) for _, code, text in answers} == {(answers[0][1], answers[0][2])}
    assert answers[0][1] == "UNAVAILABLE"
    fenv.proxy.passthrough()
    async with fenv.client("calm", max_retries=0) as calm:
        _, code, _ = await _probe(calm, KEPT)
    assert code == "NOT_FOUND"
