"""Availability against hostile clients and tenants (issue 12): nobody takes the service down.

Gateways on the session engine and the fault package's S3 server, under their own store prefix
(`avail`) and their own tenants file:

- a Watch/reflection flood from one peer (1,000 streams) leaves Generate, Health/Check and
  kubelet-style probes (a fresh channel, Health/Check, 1 s deadline) answering within 1 s;
- a flood of another RPC kind (held uploads, reads) from one tenant does not starve another
  tenant's Generate (the global RPC cap is not shared with Generate any more);
- per-tenant rates: requests and generated tokens per minute, refused with RESOURCE_EXHAUSTED
  and a `retry-after` hint that the SDK surfaces;
- 20 slow 512 MiB uploads: the spool budget and the per-tenant upload caps refuse what does
  not fit at the header, before any byte is spooled;
- storage quotas (stored bytes, adapters) refuse uploads and are shown by GetAdapter,
  ListAdapters and the CLI;
- the manifest poller survives any error and readiness follows propagation staleness;
- the tenants file is re-read when it changes (a Kubernetes Secret's `..data` symlink swap).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE
from adapter_store.spool import format_bytes
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key
from lora_gateway.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import AdapterFactory
from tests.faults.conftest import FaultEnv, key_of, start_gateway

pytestmark = pytest.mark.engine

SC = grpc.StatusCode
PROMPT = devtools.SAMPLE_PROMPTS[0]
ZERO_SHA = "0" * 64
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: tenant -> limits of its entry in this module's tenants file (keys: <tenant>-user, -admin).
TENANTS: dict[str, dict[str, int]] = {
    "acme": {"max_concurrent": 32},
    "flood": {"max_concurrent": 2},
    "calm": {"max_concurrent": 2},
    "rated": {"requests_per_minute": 3},
    "metered": {"tokens_per_minute": 24},
    "names": {"max_adapters": 2},
    "bytes": {"max_stored_bytes": 100_000},  # one test adapter (about 58 KB), not two
    **{f"up{i}": {} for i in range(10)},
}


def tenants_doc(
    tenants: dict[str, dict[str, int]] | None = None, *, keys: dict[str, str] | None = None
) -> dict[str, Any]:
    """A tenants file; `keys` replaces a key's secret (tenant-role -> secret) to rotate it."""
    doc: dict[str, Any] = {}
    for tenant, limits in (tenants or TENANTS).items():
        entries = []
        for role, label in (("user", "user"), ("tenant-admin", "admin")):
            key_id = f"{tenant}-{label}"
            secret = (keys or {}).get(key_id, key_of(tenant, label if label == "admin" else "user"))
            entries.append({"id": key_id, "sha256": hash_key(secret), "role": role})
        doc[tenant] = {"max_tokens": 128, **limits, "keys": entries}
    return {"tenants": doc}


def write_tenants(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def client(server: GatewayServer, tenant: str, role: str = "user", **kw: Any) -> AsyncGatewayClient:
    kw.setdefault("max_retries", 0)
    return AsyncGatewayClient(f"127.0.0.1:{server.port}", key_of(tenant, role), **kw)


async def gateway(
    fenv: FaultEnv, engine: VLLMEngine, model: Path, work: Path, **changes: Any
) -> GatewayServer:
    # not work/tenants.yaml: start_gateway writes the fault package's own file there
    changes.setdefault("tenants_file", str(write_tenants(work / "avail.yaml", tenants_doc())))
    return await start_gateway(
        engine,
        model,
        fenv.proxy,
        fenv.s3,
        work,
        store=f"s3://{fenv.s3.bucket}/avail",
        **changes,
    )


def refusals(server: GatewayServer, limit: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "lora_gateway_limit_refusals_total", {"limit": limit}
    )
    return value or 0.0


@pytest.fixture(scope="module")
async def gw(
    fenv: FaultEnv, engine: VLLMEngine, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayServer]:
    """Defaults everywhere but a small Generate cap (8: gRPC's old global cap would be 32)."""
    server = await gateway(
        fenv, engine, tiny_model, tmp_path_factory.mktemp("avail"), max_concurrent_requests=8
    )
    yield server
    await server.stop(grace=0)


# --- unauthenticated streams -------------------------------------------------------------------


async def _first(call: Any, wait_s: float) -> str:
    """How a public stream's first read ends: "open" (a message came), or the status code."""
    try:
        await asyncio.wait_for(call.read(), wait_s)
    except TimeoutError:
        return "hung"
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "open"


async def _probe(target: str, deadline_s: float = 1.0) -> tuple[int, float]:
    """Kubelet-style: a fresh channel, one Health/Check with a 1 s deadline."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=deadline_s
        )
    return reply.status, time.monotonic() - started


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_watch_flood_from_one_peer_leaves_generate_and_probes_answering(
    gw: GatewayServer,
) -> None:
    target = f"127.0.0.1:{gw.port}"
    quiet: list[float] = []
    async with client(gw, "acme") as c:  # the engine warm, and the latency without a flood
        for _ in range(5):
            started = time.monotonic()
            await c.generate("", PROMPT, GenerateOptions(max_tokens=4))
            quiet.append(time.monotonic() - started)
    # 10 connections of their own (no shared subchannel): 110 streams each, under HTTP/2's
    # max_concurrent_streams (256), so every stream reaches the server.
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(10)
    ]
    calls: list[Any] = []
    try:
        for i in range(1000):
            stub = health_pb2_grpc.HealthStub(channels[i % len(channels)])
            calls.append(stub.Watch(health_pb2.HealthCheckRequest()))
        for i in range(100):  # reflection streams, opened and left open
            stub = reflection_pb2_grpc.ServerReflectionStub(channels[i % len(channels)])
            call = stub.ServerReflectionInfo()
            with contextlib.suppress(grpc.aio.AioRpcError):  # refused before the write
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            calls.append(call)
        outcomes = await asyncio.gather(*(_first(c, 10.0) for c in calls))
        opened = outcomes.count("open")
        print(
            f"\n1,000 Watch + 100 reflection streams from one peer: {opened} open, "
            f"{outcomes.count('RESOURCE_EXHAUSTED')} refused, {outcomes.count('hung')} hung "
            f"({Counter(outcomes)})"
        )
        assert "hung" not in outcomes, "every stream is answered at once: open or refused"
        assert opened <= gw.settings.public_max_streams_per_peer
        watch, reflection = outcomes[:1000], outcomes[1000:]
        assert set(watch) <= {"open", "RESOURCE_EXHAUSTED"}
        # A refused reflection stream may read INTERNAL on grpc.aio's client when the refusal
        # races the client's first write (grpc/grpc#36066); the server refused it all the same.
        assert set(reflection) <= {"open", "RESOURCE_EXHAUSTED", "INTERNAL"}
        assert refusals(gw, "public_streams_per_peer") == len(calls) - opened

        # While the admitted streams stay open and the attacker keeps trying, everyone else is
        # served: Generate (authenticated), Health/Check on a busy channel, kubelet-style probes.
        stop = asyncio.Event()

        async def keep_trying() -> None:
            stub = health_pb2_grpc.HealthStub(channels[0])
            while not stop.is_set():
                extra = [stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(20)]
                await asyncio.gather(*(_first(c, 5.0) for c in extra))
                for c in extra:
                    c.cancel()

        attacker = asyncio.create_task(keep_trying())
        generate_s: list[float] = []
        probe_s: list[float] = []
        async with client(gw, "acme") as c:
            for _ in range(20):
                started = time.monotonic()
                result = await c.generate("", PROMPT, GenerateOptions(max_tokens=4), timeout=1.0)
                generate_s.append(time.monotonic() - started)
                assert result.completion_tokens == 4
                status, took = await _probe(target)
                assert status == SERVING
                probe_s.append(took)
        check = health_pb2_grpc.HealthStub(channels[1])
        for _ in range(5):
            reply = await check.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            assert reply.status == SERVING
        stop.set()
        await attacker
        print(
            f"during the flood: Generate p99 {_p99(generate_s):.3f}s (median "
            f"{statistics.median(generate_s):.3f}s; {max(quiet):.3f}s max without the flood), "
            f"fresh-channel Health/Check p99 {_p99(probe_s):.3f}s"
        )
        assert max(generate_s) < 1.0
        assert max(probe_s) < 1.0
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


async def test_probe_port_serves_health_only(
    fenv: FaultEnv, engine: VLLMEngine, tiny_model: Path, tmp_path: Path
) -> None:
    """`health_listen`: kubelet's probes get a listener where nothing else is reachable."""
    server = await gateway(fenv, engine, tiny_model, tmp_path, health_listen="127.0.0.1:0")
    try:
        assert server.health_port
        target = f"127.0.0.1:{server.health_port}"
        assert (await _probe(target))[0] == SERVING
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=1.0
            )
            assert reply.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin_pb2_grpc.AdminStub(channel).ListAdapters(
                    admin_pb2.ListAdaptersRequest(),
                    metadata=(("authorization", f"Bearer {key_of('acme')}"),),
                    timeout=1.0,
                )
            assert info.value.code() == SC.UNIMPLEMENTED
    finally:
        await server.stop(grace=0)


# --- the global RPC cap: one tenant's flood of another kind ------------------------------------


def _held_upload(port: int, release: threading.Event) -> tuple[grpc.StatusCode, str]:
    """An UploadAdapter that sends its header and then nothing until `release` is set."""

    def requests() -> Iterator[admin_pb2.UploadAdapterRequest]:
        yield admin_pb2.UploadAdapterRequest(
            header=admin_pb2.UploadHeader(
                name="held",
                files=[
                    admin_pb2.DeclaredFile(filename=CONFIG_FILE, size=100, sha256=ZERO_SHA),
                    admin_pb2.DeclaredFile(filename=WEIGHTS_FILE, size=1000, sha256=ZERO_SHA),
                ],
            )
        )
        release.wait(30)

    metadata = (("authorization", f"Bearer {key_of('flood', 'admin')}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            admin_pb2_grpc.AdminStub(channel).UploadAdapter(
                requests(), metadata=metadata, timeout=30
            )
        except grpc.RpcError as exc:
            # (Not `release.set()` here: a refused upload must not end the held ones.)
            return exc.code(), f"{exc.details()} at {time.monotonic():.2f}"
    return SC.OK, ""


async def test_a_flood_of_other_rpcs_from_one_tenant_does_not_starve_another_tenants_generate(
    gw: GatewayServer,
) -> None:
    release = threading.Event()
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(48)
    try:
        held = [loop.run_in_executor(pool, _held_upload, gw.port, release) for _ in range(40)]
        await asyncio.sleep(0.5)  # the uploads are open (or refused) before the reads start
        stop = asyncio.Event()
        read_codes: list[str] = []

        async def reads() -> None:
            async with client(gw, "flood") as c:
                while not stop.is_set():
                    try:
                        await c.list_adapters(timeout=5.0)
                        read_codes.append("OK")
                    except errors.GatewayError as exc:
                        read_codes.append(exc.code.name)

        readers = [asyncio.create_task(reads()) for _ in range(48)]
        await asyncio.sleep(0.2)
        latencies: list[float] = []
        async with client(gw, "calm") as c:
            for _ in range(10):
                started = time.monotonic()
                await c.generate("", PROMPT, GenerateOptions(max_tokens=4), timeout=1.0)
                latencies.append(time.monotonic() - started)
        stop.set()
        await asyncio.gather(*readers)
        # Every upload beyond the cap must have been answered while the first ones still hold
        # their slots (on a loaded machine some threads open their upload late).
        pending: set[asyncio.Future[tuple[grpc.StatusCode, str]]] = set(held)
        while len(held) - len(pending) < 40 - TENANT_UPLOADS:
            done, pending = await asyncio.wait(pending, timeout=10.0, return_when="FIRST_COMPLETED")
            if not done:
                break
        release.set()
        answers = await asyncio.gather(*held)
        codes = [code for code, _ in answers]
        print(
            f"\nflood: 40 held uploads -> {codes.count(SC.RESOURCE_EXHAUSTED)} refused at once; "
            f"{len(read_codes)} reads ({read_codes.count('RESOURCE_EXHAUSTED')} refused); "
            f"calm's Generate p99 {_p99(latencies):.3f}s"
        )
        assert max(latencies) < 1.0
        # beyond its upload cap (2) the flood is refused at once, not queued
        assert codes.count(SC.RESOURCE_EXHAUSTED) >= 40 - TENANT_UPLOADS, answers
    finally:
        release.set()
        pool.shutdown(wait=True)


TENANT_UPLOADS = 2  # Settings.tenant_max_concurrent_uploads, the default


# --- the upload spool and storage quotas ------------------------------------------------------


def _declared_upload(port: int, tenant: str, size: int, release: threading.Event) -> str:
    """An UploadAdapter declaring `size` bytes that sends its header and then waits."""

    def requests() -> Iterator[admin_pb2.UploadAdapterRequest]:
        yield admin_pb2.UploadAdapterRequest(
            header=admin_pb2.UploadHeader(
                name="huge",
                files=[
                    admin_pb2.DeclaredFile(filename=CONFIG_FILE, size=100, sha256=ZERO_SHA),
                    admin_pb2.DeclaredFile(filename=WEIGHTS_FILE, size=size, sha256=ZERO_SHA),
                ],
            )
        )
        release.wait(30)

    metadata = (("authorization", f"Bearer {key_of(tenant, 'admin')}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            admin_pb2_grpc.AdminStub(channel).UploadAdapter(
                requests(), metadata=metadata, timeout=30
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return "OK"


async def test_slow_huge_uploads_cannot_fill_the_spool(gw: GatewayServer) -> None:
    """20 uploads declaring 512 MiB each, from 10 tenants (2 each), sent slowly: the spool's
    budget (4 GiB by default) holds 8; the other 12 are refused at their header."""
    budget = gw.settings.spool_budget_bytes
    size = 512 << 20
    release = threading.Event()
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(24)
    try:
        tasks = [
            loop.run_in_executor(pool, _declared_upload, gw.port, f"up{i % 10}", size, release)
            for i in range(20)
        ]
        refused: list[str] = []
        deadline = time.monotonic() + 10
        while len(refused) < 20 - budget // (size + 100) and time.monotonic() < deadline:
            refused = [t.result() for t in tasks if t.done()]
            await asyncio.sleep(0.05)
        took = 10 - (deadline - time.monotonic())
        spool = gw.gateway.store.spool
        reserved, on_disk = spool.reserved_bytes, _tree_bytes(spool.working_folder)
        release.set()
        outcomes = await asyncio.gather(*tasks)
    finally:
        release.set()
        pool.shutdown(wait=True)
    full = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED: the upload spool is full")]
    print(
        f"\n20 slow 512 MiB uploads, spool budget {budget >> 30} GiB: {len(full)} refused at the "
        f"header within {took:.2f}s; {reserved >> 20} MiB reserved, {on_disk} bytes on disk"
    )
    assert len(full) == 20 - budget // (size + 100), outcomes
    assert reserved <= budget
    assert on_disk < 1 << 20, "nothing but headers arrived"
    assert spool.reserved_bytes == 0


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _sync_upload(server: GatewayServer, tenant: str, name: str, folder: Path) -> str:
    # The blocking client: grpc.aio's reports INTERNAL when the server refuses while the client
    # still writes (grpc/grpc#36066, see tests/faults/test_uploads.py).
    from lora_gateway.client import GatewayClient

    with GatewayClient(f"127.0.0.1:{server.port}", key_of(tenant, "admin"), max_retries=0) as admin:
        try:
            admin.upload_adapter(name, folder)
        except errors.GatewayError as exc:
            return f"{exc.code.name}: {exc}"
    return "OK"


async def test_storage_quotas_refuse_uploads_and_are_shown(
    gw: GatewayServer, make_test_adapter: AdapterFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from lora_gateway.cli import main

    folders = [make_test_adapter(seed=90 + i, rank=8) for i in range(3)]
    one = sum((folders[0] / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE))
    # `names` may store 2 adapters
    assert await asyncio.to_thread(_sync_upload, gw, "names", "a", folders[0]) == "OK"
    assert await asyncio.to_thread(_sync_upload, gw, "names", "b", folders[1]) == "OK"
    third = await asyncio.to_thread(_sync_upload, gw, "names", "c", folders[2])
    assert third.startswith("RESOURCE_EXHAUSTED: adapter quota of tenant names reached: 2 of 2")
    # a new version of an existing adapter is not a new adapter
    assert await asyncio.to_thread(_sync_upload, gw, "names", "b", folders[2]) == "OK"
    # `bytes` may store 100,000 bytes: one adapter
    assert await asyncio.to_thread(_sync_upload, gw, "bytes", "a", folders[0]) == "OK"
    second = await asyncio.to_thread(_sync_upload, gw, "bytes", "b", folders[1])
    assert second.startswith("RESOURCE_EXHAUSTED: storage quota of tenant bytes exceeded: ")

    async with client(gw, "names") as c:
        info = await c.get_adapter("b")
        listed = await c.list_adapters()
    assert (info.usage.tenant, info.usage.adapters, info.usage.max_adapters) == ("names", 2, 2)
    assert info.usage.stored_bytes == 3 * one
    assert listed.usage == info.usage
    environ = {"LORA_GATEWAY_TARGET": f"127.0.0.1:{gw.port}"}
    environ["LORA_GATEWAY_API_KEY"] = key_of("bytes")
    assert await asyncio.to_thread(main, ["adapter", "show", "a"], environ=environ) == 0
    shown = capsys.readouterr().out
    assert await asyncio.to_thread(main, ["adapter", "list"], environ=environ) == 0
    listed_out = capsys.readouterr().out
    print(f"\n{shown}{listed_out}")
    assert (
        f"usage       tenant bytes: {format_bytes(one)} of {format_bytes(100_000)} stored, "
        "1 of 10000 adapters"
    ) in shown
    assert "usage       tenant bytes:" in listed_out
    assert refusals(gw, "quota") >= 2


# --- rates -------------------------------------------------------------------------------------


async def test_requests_per_minute_refused_with_retry_after(gw: GatewayServer) -> None:
    async with client(gw, "rated") as c:
        for _ in range(3):
            await c.generate("", PROMPT, GenerateOptions(max_tokens=2))
        with pytest.raises(errors.ResourceExhausted) as info:
            await c.generate("", PROMPT, GenerateOptions(max_tokens=2))
    print(f"\nrequests_per_minute 3, 4th request: {info.value} (retry {info.value.retry_after_s})")
    assert "rate limit of 3 requests per minute" in str(info.value)
    assert info.value.retry_after_s is not None
    assert 15 <= info.value.retry_after_s <= 20
    # the raw trailing metadata, as any gRPC client sees it
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        from lora_gateway.v1 import inference_pb2, inference_pb2_grpc

        call = inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(text=PROMPT),
            metadata=(("authorization", f"Bearer {key_of('rated')}"),),
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await call
        assert raw.value.code() == SC.RESOURCE_EXHAUSTED
        trailing = dict(raw.value.trailing_metadata() or ())
        assert 15 <= int(trailing["retry-after"]) <= 20


async def test_tokens_per_minute_counts_generated_tokens(gw: GatewayServer) -> None:
    async with client(gw, "metered") as c:
        with pytest.raises(errors.ResourceExhausted) as too_big:
            await c.generate("", PROMPT, GenerateOptions(max_tokens=25))
        assert "exceeds the rate limit" in str(too_big.value)
        assert too_big.value.retry_after_s is None
        result = await c.generate("", PROMPT, GenerateOptions(max_tokens=16, ignore_eos=True))
        assert result.completion_tokens == 16  # 24 - 16 = 8 left
        await c.generate(
            "", PROMPT, GenerateOptions(max_tokens=8, ignore_eos=True)
        )  # exactly what is left
        with pytest.raises(errors.ResourceExhausted) as info:
            await c.generate("", PROMPT, GenerateOptions(max_tokens=8))
    print(f"\ntokens_per_minute 24 after 24 tokens: {info.value}")
    assert "24 generated tokens per minute" in str(info.value)
    assert info.value.retry_after_s is not None
    assert 1 <= info.value.retry_after_s <= 20


# --- the manifest poller -----------------------------------------------------------------------


async def _upload_and_use(server: GatewayServer, adapter_dir: Path, name: str) -> None:
    async with client(server, "acme", "admin") as admin:
        await admin.upload_adapter(name, adapter_dir)
    async with client(server, "acme") as c:
        await c.generate(name, PROMPT, GenerateOptions(max_tokens=2))


async def _refused_within(server: GatewayServer, name: str, bound_s: float) -> float:
    """Seconds until `name` is NOT_FOUND on `server` (fails after `bound_s`)."""
    started = time.monotonic()
    async with client(server, "acme") as c:
        while time.monotonic() - started < bound_s:
            try:
                await c.generate(name, PROMPT, GenerateOptions(max_tokens=1), timeout=2.0)
            except errors.NotFound:
                return time.monotonic() - started
            except errors.Aborted:
                pass  # in flight while the revocation arrived: aborted, as it must be
            await asyncio.sleep(0.05)
    pytest.fail(f"{name} still served {bound_s}s after another replica revoked it")


async def test_poller_survives_any_error_and_keeps_propagating(
    fenv: FaultEnv,
    engine: VLLMEngine,
    tiny_model: Path,
    tmp_path: Path,
    make_test_adapter: AdapterFactory,
) -> None:
    """An OSError from cache removal (applying another replica's revocation) used to end the
    poller for good; later revocations then never arrived."""
    a = await gateway(fenv, engine, tiny_model, tmp_path / "a", poll_interval_s=0.2)
    b = await gateway(fenv, engine, tiny_model, tmp_path / "b", poll_interval_s=0.2)
    try:
        await _upload_and_use(a, make_test_adapter(seed=71, rank=8), "poll-one")
        await _upload_and_use(a, make_test_adapter(seed=72, rank=8), "poll-two")
        cache = a.gateway.residency.cache
        real_release = cache.release  # what revocation calls (owner-aware removal)
        failed = asyncio.Event()

        async def failing_release(sha: str, owner: str) -> bool:
            failed.set()
            raise OSError(errno.EIO, "Input/output error (injected)")

        cache.release = failing_release  # type: ignore[method-assign]
        async with client(b, "acme", "admin") as admin:
            await admin.revoke_adapter("poll-one")
        took_one = await _refused_within(a, "poll-one", 5.0)
        await asyncio.wait_for(failed.wait(), 5.0)  # the injected fault was hit
        cache.release = real_release  # type: ignore[method-assign]
        async with client(b, "acme", "admin") as admin:
            await admin.revoke_adapter("poll-two")
        took_two = await _refused_within(a, "poll-two", 5.0)
        errors_seen = a.metrics.registry.get_sample_value("lora_gateway_manifest_poll_errors_total")
        last = a.metrics.registry.get_sample_value(
            "lora_gateway_manifest_poll_last_complete_timestamp_seconds"
        )
        print(
            f"\npoller: revocation refused on A after {took_one:.2f}s (cache removal failing), "
            f"the next after {took_two:.2f}s; errors counted {errors_seen}"
        )
        assert errors_seen is not None
        assert errors_seen >= 1
        assert last is not None
        assert time.time() - last < 2.0
    finally:
        await a.stop(grace=0)
        await b.stop(grace=0)


async def test_readiness_follows_propagation_staleness(
    fenv: FaultEnv,
    engine: VLLMEngine,
    tiny_model: Path,
    tmp_path: Path,
    make_test_adapter: AdapterFactory,
) -> None:
    """Store unreachable: no poll completes; after `propagation_stale_after_s` readiness is
    NOT_SERVING (liveness stays SERVING), and SERVING again once polls complete."""
    server = await gateway(
        fenv,
        engine,
        tiny_model,
        tmp_path,
        poll_interval_s=0.2,
        propagation_stale_after_s=1.0,
        health_listen="127.0.0.1:0",
    )
    target = f"127.0.0.1:{server.health_port}"

    async def status(service: str = "") -> int:
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
        return int(reply.status)

    try:
        await _upload_and_use(server, make_test_adapter(seed=73, rank=8), "stale")
        assert await status() == SERVING
        fenv.proxy.blackhole()
        started = time.monotonic()
        while await status() == SERVING:
            assert time.monotonic() - started < 6.0, "still SERVING while propagation is stale"
            await asyncio.sleep(0.1)
        went_stale = time.monotonic() - started
        assert await status("liveness") == SERVING
        assert server.metrics.registry.get_sample_value("lora_gateway_propagation_stale") == 1
        # warm adapters keep serving meanwhile (readiness is for the load balancer)
        async with client(server, "acme") as c:
            await c.generate("stale", PROMPT, GenerateOptions(max_tokens=2), timeout=2.0)
        fenv.proxy.passthrough()
        started = time.monotonic()
        while await status() != SERVING:
            assert time.monotonic() - started < 10.0, "not SERVING again after recovery"
            await asyncio.sleep(0.1)
        print(
            f"\nstore black-holed: readiness NOT_SERVING after {went_stale:.2f}s (bound 1 s), "
            f"SERVING {time.monotonic() - started:.2f}s after recovery; liveness SERVING"
        )
        # not at once: the last complete poll was at most one interval (0.2 s) before the fault
        assert went_stale >= 1.0 - 2 * 0.2
    finally:
        fenv.proxy.passthrough()
        await server.stop(grace=0)


# --- tenants file reload -----------------------------------------------------------------------


class SecretVolume:
    """A folder laid out like a mounted Kubernetes Secret: `<key>` -> `..data/<key>`, `..data` ->
    `..<timestamp>/`; an update writes a new timestamped folder and swaps `..data` atomically."""

    def __init__(self, root: Path, key: str = "tenants.yaml") -> None:
        self.root, self.key, self.generation = root, key, 0
        root.mkdir(parents=True)
        (root / key).symlink_to(Path("..data") / key)

    def update(self, text: str) -> None:
        self.generation += 1
        folder = self.root / f"..2026_01_01_00_00_{self.generation:02d}.{os.getpid()}"
        folder.mkdir()
        (folder / self.key).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap kubelet's AtomicWriter does

    @property
    def path(self) -> Path:
        return self.root / self.key


async def _until(predicate: Any, bound_s: float) -> float:
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < bound_s, f"not within {bound_s}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


#: A removed key is refused this soon after the file changes (reload interval 0.2 s).
REVOKE_BOUND_S = 2.0


async def test_tenants_file_reload_rotates_and_revokes_keys(
    fenv: FaultEnv, engine: VLLMEngine, tiny_model: Path, tmp_path: Path
) -> None:
    volume = SecretVolume(tmp_path / "secret")
    volume.update(yaml.safe_dump(tenants_doc()))
    server = await gateway(
        fenv,
        engine,
        tiny_model,
        tmp_path,
        tenants_file=str(volume.path),
        tenants_reload_interval_s=0.2,
    )
    target = f"127.0.0.1:{server.port}"

    async def accepted(key: str, max_tokens: int = 2) -> bool:
        async with AsyncGatewayClient(target, key, max_retries=0) as c:
            try:
                await c.generate("", PROMPT, GenerateOptions(max_tokens=max_tokens), timeout=5.0)
            except errors.Unauthenticated:
                return False
        return True

    old_key, new_key = key_of("acme"), "rotated-acme-user-key"
    reloads = server.metrics.registry.get_sample_value
    try:
        assert await accepted(old_key)
        assert not await accepted(new_key)
        # 1. rotation: the new key next to the old one
        both = tenants_doc()
        both["tenants"]["acme"]["keys"].append(
            {"id": "acme-user-2", "sha256": hash_key(new_key), "role": "user"}
        )
        volume.update(yaml.safe_dump(both))
        took_add = await _until(lambda: accepted(new_key), REVOKE_BOUND_S)
        assert await accepted(old_key)
        # 2. revocation: the old key removed; the interceptor, gateway and admission all see the
        # new ring (acme's max_tokens drops to 4 in the same file)
        only_new = tenants_doc(keys={"acme-user": new_key})
        only_new["tenants"]["acme"]["max_tokens"] = 4
        volume.update(yaml.safe_dump(only_new))
        revoked_at = time.monotonic()
        took_revoke = await _until(lambda: _not(accepted(old_key)), REVOKE_BOUND_S)
        assert await accepted(new_key, max_tokens=4)
        async with AsyncGatewayClient(target, new_key, max_retries=0) as c:
            with pytest.raises(errors.ResourceExhausted, match="max_tokens 5 exceeds"):
                await c.generate("", PROMPT, GenerateOptions(max_tokens=5))
        assert reloads("lora_gateway_tenants_reloads_total", {"result": "ok"}) == 2
        # 3. an invalid new file: logged, counted, the previous one stays in force
        volume.update("tenants:\n  acme: {keys: [{id: x, sha256: nothex, role: user}]}\n")
        await _until(
            lambda: _value(reloads("lora_gateway_tenants_reloads_total", {"result": "invalid"})),
            3.0,
        )
        assert await accepted(new_key)
        assert not await accepted(old_key)
        # counted once, not once per interval
        await asyncio.sleep(0.6)
        assert reloads("lora_gateway_tenants_reloads_total", {"result": "invalid"}) == 1
        print(
            f"\ntenants reload (interval 0.2 s): new key accepted after {took_add:.2f}s; "
            f"revoked key refused after {took_revoke:.2f}s "
            f"({time.monotonic() - revoked_at:.2f}s incl. checks); invalid file kept the old one"
        )
    finally:
        await server.stop(grace=0)


async def _not(awaitable: Any) -> bool:
    return not await awaitable


async def _value(value: float | None) -> bool:
    return bool(value)
