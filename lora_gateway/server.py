"""Build and run the gateway: grpc.aio server, health, reflection, signals and drain.

Start-up: store, disk cache and engine → gRPC server up with health NOT_SERVING → isolation
self-test → warm (pinned) adapters → SERVING. Shutdown (SIGTERM/SIGINT): health NOT_SERVING at
once → new requests refused (UNAVAILABLE) and the listener closed → in-flight requests drain
within `drain_grace_s`, then are cancelled (engine abort) → poller stopped → engine shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from adapter_store import BaseModelSpec, DiskCache, Limits, LocalBackend, Registry
from adapter_store.store import BlobBackend
from lora_gateway import errors, logs
from lora_gateway.audit import AuditLog
from lora_gateway.config import Settings
from lora_gateway.engine.base import Engine
from lora_gateway.engine.selftest import require_isolation
from lora_gateway.gateway import Gateway
from lora_gateway.interceptors import GatewayInterceptor
from lora_gateway.metrics import Metrics
from lora_gateway.residency import Residency
from lora_gateway.services.admin import AdminService
from lora_gateway.services.inference import InferenceService
from lora_gateway.tenancy import Admission, KeyRing
from lora_gateway.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


def open_backend(settings: Settings) -> BlobBackend:
    """`file:///path` → a local folder; `s3://bucket/prefix` → S3 / MinIO."""
    if settings.store.startswith("file://"):
        return LocalBackend(Path(settings.store.removeprefix("file://")))
    if settings.store.startswith("s3://"):
        from adapter_store.s3 import S3Backend

        bucket, _, prefix = settings.store.removeprefix("s3://").partition("/")
        return S3Backend(
            bucket,
            prefix.strip("/"),
            endpoint_url=settings.s3_endpoint,
            region=settings.s3_region,
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            max_attempts=settings.s3_max_attempts,
        )
    raise errors.InvalidArgument(
        "no adapter store configured (--store file:///path or s3://bucket)"
    )


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Keepalive: generation can be silent for a while (long prompts, queueing), so the
        # server pings idle connections every 30 s to notice dead peers (and free their engine
        # slots) instead of waiting for TCP timeouts, and tolerates client pings every 10 s so
        # load balancers that probe connections are not answered with GOAWAY.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Idle connections are closed after `max_connection_idle_s` (10 minutes by default); no
        # connection lives beyond 1 hour (+ 30 s grace), so clients rebalance across replicas.
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", 3_600_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert or not settings.tls_key:
        return None
    key = Path(settings.tls_key).read_bytes()
    cert = Path(settings.tls_cert).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


@dataclass
class GatewayServer:
    settings: Settings
    server: grpc.aio.Server
    health: HealthServicer
    gateway: Gateway
    engine: Engine
    owns_engine: bool
    port: int
    audit: AuditLog
    metrics: Metrics
    metrics_port: int | None = None
    _stop_poller: asyncio.Event = field(default_factory=asyncio.Event)
    _poller: asyncio.Task[None] | None = None
    _watcher: asyncio.Task[None] | None = None
    #: Set when the engine died: `run()` then exits non-zero so that Kubernetes restarts the pod.
    engine_failed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, settings: Settings, engine: Engine | None = None) -> GatewayServer:
        """Bring everything up; returns once health reports SERVING (or raises)."""
        keyring = await asyncio.to_thread(
            KeyRing.load, settings.tenants_file, settings.tenant_defaults()
        )
        spec = await asyncio.to_thread(
            BaseModelSpec.from_hf_config,
            Path(settings.model),
            max_rank=settings.max_lora_rank,
            aliases=settings.base_model_aliases,
        )
        limits = Limits(max_file_bytes=settings.max_upload_bytes)
        backend = await asyncio.to_thread(open_backend, settings)
        registry = Registry(backend, spec, limits)
        cache = await asyncio.to_thread(
            DiskCache, settings.cache_path, settings.cache_budget_bytes, registry.fetch_file
        )
        owns_engine = engine is None
        if engine is None:
            from lora_gateway.engine.vllm_engine import VLLMEngine

            engine = await VLLMEngine.start(settings)
        metrics = Metrics()
        residency = Residency(
            engine,
            registry,
            cache,
            spec,
            limits,
            poll_interval_s=settings.poll_interval_s,
            metrics=metrics,
            manifest_cache_size=settings.manifest_cache_size,
            slot_wait_s=settings.engine_slot_wait_s,
        )
        admission = Admission(settings.max_concurrent_requests, on_change=metrics.set_inflight)
        gateway = Gateway(settings, engine, registry, residency, keyring, admission, metrics)
        audit = await asyncio.to_thread(AuditLog, settings.audit_log)

        server = grpc.aio.server(
            interceptors=[GatewayInterceptor(keyring, metrics, audit)],
            options=grpc_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_requests * 4,
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(gateway), server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(gateway, audit), server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        credentials = await asyncio.to_thread(server_credentials, settings)
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
        if port == 0:
            raise errors.Unavailable(f"cannot listen on {settings.listen}")
        for name in ("", *SERVICE_NAMES):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self = cls(settings, server, health, gateway, engine, owns_engine, port, audit, metrics)
        try:
            if settings.metrics_listen:
                self.metrics_port = metrics.start_http(settings.metrics_listen)[1]
            if settings.self_test:
                await require_isolation(engine, settings.model)
            await self._warm_up()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._poller = asyncio.create_task(residency.run_poller(self._stop_poller))
        self._watcher = asyncio.create_task(self._watch_engine())
        for name in ("", *SERVICE_NAMES):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        metrics.set_engine_healthy(True)
        log.info("lora-gateway serving on port %d", port)
        return self

    async def _watch_engine(self) -> None:
        """Health follows the engine: if it dies, NOT_SERVING at once and `engine_failed` set.

        Checked every `engine_watch_interval_s`."""
        every_s = self.settings.engine_watch_interval_s
        while not self._stop_poller.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_poller.wait(), every_s)
            if self._stop_poller.is_set():
                return
            try:
                await self.engine.check_health()
            except errors.GatewayError:
                log.error("engine is not healthy: reporting NOT_SERVING and stopping")
                self.metrics.set_engine_healthy(False)
                for name in ("", *SERVICE_NAMES):
                    await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                self.engine_failed.set()
                return

    async def _warm_up(self) -> None:
        """Load and pin the configured warm set (`tenant/name[@alias]`)."""
        from adapter_store import AdapterRef, InvalidAdapter

        residency = self.gateway.residency
        for text in self.settings.warm_adapters:
            try:
                ref = AdapterRef.parse(text)
            except InvalidAdapter as exc:
                raise errors.InvalidArgument(f"warm_adapters: {exc}") from None
            if ref.owner is None:
                raise errors.InvalidArgument(f"warm_adapters: {text!r} needs its tenant/")
            version = await residency.resolve(ref.owner, ref)
            await residency.pin(version)

    async def stop(self, grace: float | None = None) -> None:
        """The shutdown order of DESIGN invariant 10."""
        grace = self.settings.drain_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.gateway.draining = True
        await self.server.stop(grace)
        self._stop_poller.set()
        for task in (self._poller, self._watcher):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.owns_engine:
            await self.engine.shutdown()
        else:
            with contextlib.suppress(errors.GatewayError):
                await self.gateway.residency.close()
        self.audit.close()
        self.metrics.set_engine_healthy(False)
        self.metrics.close()


async def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT (drain, exit 0) or until the engine dies (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await GatewayServer.start(settings)
    print(f"lora-gateway listening on port {server.port}", flush=True)
    signalled = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(server.engine_failed.wait())
    await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    failed.cancel()
    if server.engine_failed.is_set():
        await server.stop(grace=0)
        return 1
    log.info("signal received: draining for up to %.0fs", settings.drain_grace_s)
    await server.stop()
    return 0


def serve(settings: Settings) -> int:
    """Blocking entry point for `lora-gateway serve`."""
    logs.configure()
    try:
        return asyncio.run(run(settings))
    except errors.GatewayError as exc:
        log.error("lora-gateway could not start: %s", exc)
        return 1
