"""Hostile tenants against residency, end to end: pins, engine slots, shared bytes, manifests.

A real grpc.aio gateway on the session's vLLM engine (3 adapter slots, so at most 2 pins and a
default per-tenant share of 2 slots), S3 over HTTP (SeaweedFS). Tenants (each with a user and a
tenant-admin key): acme and globex (1 pin each), bigpin (5 pins: only the global cap binds),
flood and calm (the fairness pair). Adapters are put in the store directly (fast); requests go
through gRPC. Figures are printed for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from adapter_store import AdapterVersion
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions, Residency, ResidencyTier
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from tests.conftest import AdapterFactory
from tests.support.gateway import (
    client,
    gateway_settings,
    key_of,
    running_gateway,
    write_tenants,
)
from tests.support.metrics import residency_counts
from tests.support.s3server import S3Server, s3_server

pytestmark = pytest.mark.engine

PROMPT = devtools.SAMPLE_PROMPTS[1]
#: tenant -> its limits in the tenants file.
TENANTS: dict[str, dict[str, int]] = {
    "acme": {"max_pins": 1, "max_tokens": 256},
    "globex": {"max_pins": 1, "max_tokens": 256},
    "bigpin": {"max_pins": 5, "max_tokens": 256},
    "flood": {"max_concurrent": 16, "max_tokens": 256},
    "calm": {"max_concurrent": 4, "max_tokens": 256},
}
MANIFEST_CACHE = 8


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server("residency-hostile") as server, server.credentials_in_env():
        yield server


@pytest.fixture(scope="module")
async def gw(
    engine: VLLMEngine, tiny_model: Path, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayServer]:
    work = tmp_path_factory.mktemp("residency-hostile")
    settings = gateway_settings(
        tiny_model,
        work,
        tenants=write_tenants(work / "tenants.yaml", TENANTS),
        s3=s3,
        prefix="hostile",
        # Nothing here tests propagation; a slow poll keeps the store free for the
        # revocation's own store calls, which the 200 ms bound includes.
        poll_interval_s=5.0,
        default_max_tokens=8,
        tenant_max_tokens=256,
        max_concurrent_requests=64,
    )
    async with running_gateway(settings, engine) as server:
        # Set on the object (not through Settings) so that this module also runs against code
        # that predates these settings, where the checks below must fail for the right reason.
        server.gateway.residency.manifest_cache_size = MANIFEST_CACHE
        server.gateway.residency.slot_wait_s = 20.0
        yield server


async def put(
    gw: GatewayServer, make: AdapterFactory, tenant: str, name: str, seed: int
) -> AdapterVersion:
    """Put an adapter in the store directly (the Admin upload path is tested elsewhere)."""
    folder = make(seed=seed, rank=8)
    return await asyncio.to_thread(
        gw.gateway.store.upload_dir, tenant, name, folder, created_by="test"
    )


# --- pins -------------------------------------------------------------------------------------


async def test_concurrent_pins_on_cold_adapters_respect_the_caps(
    gw: GatewayServer, make_test_adapter: AdapterFactory
) -> None:
    """6 concurrent PinAdapter calls on cold adapters, per tenant: acme (max_pins 1) gets 1,
    bigpin (max_pins 5) gets 1 more, and then the global cap (capacity - 1 = 2) refuses
    everyone, globex included; the slot left unpinned serves another tenant's cold adapter.
    Before the fix every concurrent pin passed the capacity check before any was counted."""
    residency = gw.gateway.residency
    names = [f"pin{i}" for i in range(6)]
    for i, name in enumerate(names):
        await put(gw, make_test_adapter, "acme", name, 500 + i)
        await put(gw, make_test_adapter, "bigpin", name, 510 + i)
    await put(gw, make_test_adapter, "globex", "mine", 520)
    await put(gw, make_test_adapter, "calm", "free", 521)
    outcomes: dict[str, Counter[str]] = {}
    async with (
        client(gw, "acme", "admin") as acme,
        client(gw, "bigpin", "admin") as bigpin,
        client(gw, "globex", "admin") as globex,
        client(gw, "calm") as calm,
    ):
        try:
            for tenant, admin in (("acme", acme), ("bigpin", bigpin)):
                results = await asyncio.gather(
                    *(admin.pin_adapter(name) for name in names), return_exceptions=True
                )
                outcomes[tenant] = Counter(type(r).__name__ for r in results)
            pinned = sum(residency.entry(v).pinned for v in residency.resident_versions())
            print(f"\nconcurrent pins: {outcomes}; pinned in all {pinned}")
            assert outcomes["acme"] == Counter({"ResidencyEntry": 1, "ResourceExhausted": 5})
            assert outcomes["bigpin"] == Counter({"ResidencyEntry": 1, "ResourceExhausted": 5})
            assert pinned == 2
            with pytest.raises(errors.ResourceExhausted):
                await globex.pin_adapter("mine")  # the global cap: two pins in all
            served = await calm.generate("free", PROMPT, GenerateOptions(max_tokens=2))
            assert served.adapter is not None
        finally:
            for admin in (acme, bigpin):
                for name in names:
                    await admin.unpin_adapter(name)
    assert not any(residency.entry(v).pinned for v in residency.resident_versions())


async def test_a_grantee_cannot_pin_unpin_or_prefetch_the_owners_adapter(
    gw: GatewayServer, make_test_adapter: AdapterFactory
) -> None:
    """A grantee may generate with a shared adapter but not decide where it lives: Pin,
    Unpin and Prefetch answer NOT_FOUND, exactly as for a missing name. Before the fix a
    grantee could pin the owner's adapter (and spend the owner's and everyone's pins)."""
    residency = gw.gateway.residency
    version = await put(gw, make_test_adapter, "acme", "shared-pin", 525)
    async with (
        client(gw, "acme", "admin") as acme,
        client(gw, "globex", "admin") as globex,
        client(gw, "globex") as globex_user,
    ):
        await acme.share_adapter("shared-pin", "globex")
        assert (
            await globex_user.generate("acme/shared-pin", PROMPT, GenerateOptions(max_tokens=2))
        ).adapter
        for call in (globex.pin_adapter, globex.unpin_adapter, globex.prefetch_adapter):
            for ref in ("acme/shared-pin", "acme/no-such-adapter"):
                with pytest.raises(errors.NotFound, match="adapter not found"):
                    await call(ref)
        assert not residency.entry(version).pinned
        # The owner still can.
        assert (await acme.pin_adapter("shared-pin")).pinned
        await acme.unpin_adapter("shared-pin")


# --- engine slots -----------------------------------------------------------------------------


async def ttft(c: AsyncGatewayClient, ref: str) -> float:
    """Seconds to the first streamed token of a short generation (the rest is drained)."""
    started = time.perf_counter()
    stream = c.generate_stream(ref, PROMPT, GenerateOptions(max_tokens=4))
    first = await anext(stream)
    took = time.perf_counter() - started
    assert first.token_ids
    async for _ in stream:
        pass
    return took


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


FLOOD_ADAPTERS = 8
#: Concurrent flood requests: twice its slot share and more than the engine's 3 slots. (With 8
#: loops calm's p99 rose 1.6-2.4x on this loaded 2-core machine with only 2 adapters as well, no
#: churn at all: that is batch and CPU sharing, which admission's max_concurrent bounds.)
FLOOD_LOOPS = 4
ROUNDS = 8
SAMPLES = 25  # per round and phase: 200 solo and 200 flooded samples in all (a p99 of 100
# samples is nearly their maximum: one outlier decided it)
REPO = Path(__file__).resolve().parents[1]


class Flood:
    """flood's loops in their own process (tests/support/flood_client.py), as a remote client
    would be: its client work shares neither the gateway's event loop and GIL nor (at nice 19)
    the CPU the gateway needs. The flood's requests are what the gateway serves either way."""

    def __init__(self, gw: GatewayServer, names: list[str]) -> None:
        self.args = [
            sys.executable,
            "-m",
            "tests.support.flood_client",
            f"127.0.0.1:{gw.port}",
            key_of("flood"),
            str(FLOOD_LOOPS),
            "16",
            *names,
        ]
        self.process: asyncio.subprocess.Process | None = None
        self.counts: Counter[str] = Counter()

    async def __aenter__(self) -> Flood:
        self.process = await asyncio.create_subprocess_exec(
            *self.args,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            preexec_fn=lambda: os.nice(19),
        )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), 60)
            assert line.strip() == b"flooding", line
        except BaseException:
            self.process.terminate()  # never leave the flood running
            await self.process.wait()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(self.process.stdout.read(), 30)
        assert await self.process.wait() == 0
        self.counts.update(json.loads(out.decode().strip().splitlines()[-1]))


async def test_a_flooding_tenant_leaves_others_their_slot_and_their_ttft(
    gw: GatewayServer, make_test_adapter: AdapterFactory
) -> None:
    """flood runs 4 loops over 8 distinct adapters (more than the engine's 3 slots) from its
    own client process; calm generates on its one adapter. Solo and flooded phases alternate
    (8 rounds of 25), so that a change in the machine's background load hits both alike. calm's p99
    time to first token under the flood stays within 2x its p99 alone, flood never holds more
    than its share (2 slots), and a revocation of calm's adapter aborts calm's in-flight stream
    within 200 ms. Before the fix flood filled every slot, calm's adapter was evicted and its
    reload waited for a slot holding the engine lock, which the revocation then waited for."""
    residency = gw.gateway.residency
    flood_names = [f"flood{i}" for i in range(FLOOD_ADAPTERS)]
    for i, name in enumerate(flood_names):
        await put(gw, make_test_adapter, "flood", name, 530 + i)
    await put(gw, make_test_adapter, "calm", "mine", 540)
    await put(gw, make_test_adapter, "calm", "victim", 541)
    stop = asyncio.Event()
    peak_share = 0

    async def watch_share() -> None:
        nonlocal peak_share
        while not stop.is_set():
            peak_share = max(peak_share, residency.tenant_slots("flood"))
            await asyncio.sleep(0.002)

    solo: list[float] = []
    flooded: list[float] = []
    flood_counts: Counter[str] = Counter()
    watcher = asyncio.create_task(watch_share())
    try:
        async with client(gw, "calm") as calm, client(gw, "calm", "admin") as calm_admin:
            await calm.generate("mine", PROMPT, GenerateOptions(max_tokens=2))  # warm
            # Each version's first use costs one runtime-canary check, once: out of the way
            # before measuring (what is measured is the flood's steady state).
            async with client(gw, "flood") as first_use:
                for name in flood_names:
                    await first_use.generate(name, PROMPT, GenerateOptions(max_tokens=2))
            await asyncio.sleep(1.0)
            for _ in range(ROUNDS):
                solo += [await ttft(calm, "mine") for _ in range(SAMPLES)]
                async with Flood(gw, flood_names) as flood:
                    await asyncio.sleep(0.5)  # the flood is in full swing
                    flooded += [await ttft(calm, "mine") for _ in range(SAMPLES)]
                flood_counts.update(flood.counts)

            # Revocation under the flood: calm's long stream on "victim" is aborted fast.
            async with Flood(gw, flood_names) as flood:
                await asyncio.sleep(0.5)
                stream = calm.generate_stream(
                    "victim", PROMPT, GenerateOptions(max_tokens=200, ignore_eos=True)
                )
                await anext(stream)
                aborted_at: list[float] = []

                async def drain() -> None:
                    with pytest.raises(errors.Aborted):
                        async for _ in stream:
                            pass
                    aborted_at.append(time.perf_counter())

                drainer = asyncio.create_task(drain())
                called = time.perf_counter()
                response = await calm_admin.revoke_adapter("victim")
                returned = time.perf_counter()
                await asyncio.wait_for(drainer, 10)
            flood_counts.update(flood.counts)
    finally:
        stop.set()
        await watcher
    revoke_s = aborted_at[0] - called
    solo_p99, flooded_p99 = p99(solo), p99(flooded)
    engine_loads = residency_counts(residency.metrics).engine_loads
    print(
        f"\nflood of {FLOOD_LOOPS} loops over {FLOOD_ADAPTERS} adapters ({dict(flood_counts)}, "
        f"peak share {peak_share} slots, {engine_loads:.0f} engine loads): calm "
        f"TTFT p99 {flooded_p99 * 1000:.0f} ms vs solo {solo_p99 * 1000:.0f} ms (median "
        f"{statistics.median(flooded) * 1000:.0f} vs {statistics.median(solo) * 1000:.0f} ms, "
        f"{len(solo)} samples each); revoke aborted the stream {revoke_s * 1000:.0f} ms after "
        f"the call (RPC returned after {(returned - called) * 1000:.0f} ms)"
    )
    assert response.aborted_requests == 1
    assert revoke_s < 0.2
    assert flood_counts["ok"] > FLOOD_ADAPTERS
    assert flood_counts["other"] == 0
    assert peak_share <= 2
    assert flooded_p99 <= 2 * solo_p99


# --- shared bytes -----------------------------------------------------------------------------


def tier(reply: Residency, name: str) -> ResidencyTier:
    entries = [e for e in reply.entries if e.name == name]
    assert len(entries) == 1
    return entries[0].tier


async def test_identical_bytes_residency_is_per_tenant_and_revocation_keeps_the_other(
    gw: GatewayServer, make_test_adapter: AdapterFactory
) -> None:
    """acme and globex upload the same bytes (one sha, one folder on disk). globex's version
    is STORE until globex uses it, whatever acme cached (before the fix: DISK). acme's revoke
    leaves globex's files, residency and outputs as they were (before the fix it deleted the
    folder both versions share)."""
    residency = gw.gateway.residency
    folder = make_test_adapter(seed=550, rank=8)
    async with (
        client(gw, "acme", "admin") as acme_admin,
        client(gw, "acme") as acme,
        client(gw, "globex", "admin") as globex_admin,
        client(gw, "globex") as globex,
    ):
        a = await acme_admin.upload_adapter("same", folder)
        b = await globex_admin.upload_adapter("twin", folder)
        assert a.version == b.version
        await acme.generate("same", PROMPT, GenerateOptions(max_tokens=4))
        assert tier(await acme_admin.get_residency(), "same") is ResidencyTier.ENGINE
        assert tier(await globex_admin.get_residency(), "twin") is ResidencyTier.STORE
        before = await globex.generate("twin", PROMPT, GenerateOptions(max_tokens=8))
        assert tier(await globex_admin.get_residency(), "twin") is ResidencyTier.ENGINE

        await acme_admin.revoke_adapter("same")
        sha = b.version.removeprefix("sha256:")
        path = residency.cache.path_for(sha)
        assert sorted(p.name for p in path.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert tier(await globex_admin.get_residency(), "twin") is ResidencyTier.ENGINE
        assert (
            await globex.generate("twin", PROMPT, GenerateOptions(max_tokens=8))
        ).token_ids == before.token_ids
        # Out of the engine, globex's version comes back from the very same files: three
        # tenants hold a stream each on a fresh adapter, so every slot is taken and it goes.
        evictors = [client(gw, t) for t in ("calm", "flood", "bigpin")]
        streams = []
        for i, (c, t) in enumerate(zip(evictors, ("calm", "flood", "bigpin"), strict=True)):
            await put(gw, make_test_adapter, t, "evictor", 560 + i)
            stream = c.generate_stream(
                "evictor", PROMPT, GenerateOptions(max_tokens=120, ignore_eos=True)
            )
            streams.append(stream)
        await asyncio.gather(*(anext(s) for s in streams))
        assert not residency.is_resident(("globex", "twin", b.version.removeprefix("sha256:")))
        for stream in streams:
            await stream.aclose()
        for c in evictors:
            await c.close()
        assert tier(await globex_admin.get_residency(), "twin") is ResidencyTier.DISK
        downloads = residency.cache.stats.downloads
        assert (
            await globex.generate("twin", PROMPT, GenerateOptions(max_tokens=8))
        ).token_ids == before.token_ids
        assert residency.cache.stats.downloads == downloads  # from disk, not the store


# --- the manifest cache -----------------------------------------------------------------------


async def test_probing_names_cannot_grow_the_poll_set(
    gw: GatewayServer, make_test_adapter: AdapterFactory
) -> None:
    """A user key names 24 existing adapters (its own tenant's and another's) and 24 made-up
    ones: the manifests cached, which the poller re-reads every interval, stay within the bound
    (8 here) plus those whose versions are in use. Before the fix every manifest ever fetched
    was kept and polled."""
    residency = gw.gateway.residency
    for i in range(12):
        await put(gw, make_test_adapter, "globex", f"probe{i}", 570 + (i % 4))
        await put(gw, make_test_adapter, "acme", f"probe{i}", 570 + (i % 4))
    outcomes: Counter[str] = Counter()
    async with client(gw, "acme") as acme:
        for i in range(12):
            for ref in (f"probe{i}", f"globex/probe{i}", f"nothing{i}", f"globex/nothing{i}"):
                try:
                    await acme.generate(ref, PROMPT, GenerateOptions(max_tokens=1))
                    outcomes["ok"] += 1
                except errors.NotFound:
                    outcomes["not_found"] += 1
    protected = len({v.name for v in residency.resident_versions()})
    print(
        f"\nprobing 48 names ({dict(outcomes)}): {residency.cached_manifests()} manifests "
        f"cached and polled (bound {MANIFEST_CACHE}, {protected} protected by resident versions)"
    )
    assert outcomes == Counter({"ok": 12, "not_found": 36})
    assert residency.cached_manifests() <= MANIFEST_CACHE + protected
