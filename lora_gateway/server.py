"""Build and run the gateway: grpc.aio server, health, reflection, signals and drain.

Start-up: store, disk cache and engine → gRPC server up with health NOT_SERVING → isolation
self-test → runtime canary references → warm (pinned) adapters → the OpenAI-compatible HTTP
listener (`openai_listen`) → SERVING. Shutdown (SIGTERM/SIGINT): health NOT_SERVING at once → new
requests refused (UNAVAILABLE, HTTP 503) and both listeners closed → in-flight requests of both
drain within `drain_grace_s`, then are cancelled (engine abort) → poller stopped → engine shut
down.

Health names: "" and the two API services (readiness) are SERVING while the engine is healthy,
the server is neither draining nor recovering, and manifest propagation is fresh (a poll
completed within `propagation_stale_after_s`); "liveness" is SERVING until the engine dies or the
server stops, so a store outage or an engine recovery takes a replica out of the load balancer
without restarting it. With `health_listen`, the same statuses are also served on a listener of
their own (the chart's probe port), where nothing else is reachable.

While serving, five tasks watch: the engine (`engine_watch_interval_s`), propagation staleness
(every `poll_interval_s`), the tenants file (`tenants_reload_interval_s`: a changed, valid file
replaces the keys and limits in force; an invalid one is logged, counted and ignored, the previous
one staying in force), the runtime canary (engine/canary.py, `canary_interval_s`): on a
mismatch readiness goes NOT_SERVING, the suspect versions are quarantined (store manifest, audit,
log), and the engine is restarted in-process when this server owns it (self-test and canary
again, then SERVING), else `engine_failed` is set; and the automatic rollback of canaries
(lora_gateway.rollback, `rollback_check_interval_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import signal
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from adapter_store import AdapterVersion, StoreError
from lora_gateway import errors, logs
from lora_gateway.adapters import Adapters
from lora_gateway.audit import AuditLog
from lora_gateway.config import Settings
from lora_gateway.engine.base import Engine, LoadedAdapter
from lora_gateway.engine.canary import Canary, CanaryEngine, CanaryMonitor, CanaryReport
from lora_gateway.engine.selftest import require_isolation
from lora_gateway.gateway import Gateway
from lora_gateway.interceptors import GatewayInterceptor
from lora_gateway.metrics import Metrics
from lora_gateway.residency import Residency, key_of
from lora_gateway.rollback import RollbackGuard
from lora_gateway.services.admin import AdminService
from lora_gateway.services.inference import InferenceService
from lora_gateway.services.openai_http import OpenAIFront, OpenAIServer
from lora_gateway.stores import open_store
from lora_gateway.tenancy import Admission, KeyRing, RpcLimits, Tenants
from lora_gateway.usage import UsageLog
from lora_gateway.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)
#: Health names that follow readiness (engine, draining, propagation staleness).
READINESS_NAMES = ("", *SERVICE_NAMES)
#: The health name kubelet's liveness probe asks for: NOT_SERVING only when the engine died or
#: the server stops (a restart helps then; it does not help a store outage).
LIVENESS_NAME = "liveness"


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


def rpc_limits(settings: Settings, metrics: Metrics | None) -> RpcLimits:
    """The caps on public streams and on non-Generate RPCs (one set per listener)."""
    return RpcLimits(
        max_public_streams=settings.public_max_streams,
        max_public_streams_per_peer=settings.public_max_streams_per_peer,
        max_rpcs=settings.max_concurrent_rpcs,
        max_rpcs_per_tenant=settings.tenant_max_concurrent_rpcs,
        on_refused=metrics.refused if metrics is not None else None,
    )


@dataclass
class Recovery:
    """What one canary failure did (timings in seconds)."""

    mismatches: tuple[str, ...]
    quarantined: tuple[str, ...]
    #: From the failed check to SERVING again (None: not recovered in-process).
    recovered_s: float | None = None
    #: Of which the engine core restart (a fresh AsyncLLM).
    restart_s: float | None = None


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
    #: The admin core (upload, alias, share, compose, revoke, quarantine, pin).
    adapters: Adapters
    metrics_port: int | None = None
    #: The keys and limits in force (replaced when the tenants file changes).
    tenants: Tenants | None = None
    #: Usage records of inference calls (`usage_log`; closed after the drain).
    usage: UsageLog | None = None
    #: The digest of the tenants file in force, and of the last invalid one seen.
    tenants_digest: str = ""
    _tenants_bad: str = ""
    #: The health-only listener (`health_listen`) and its port.
    probe_server: grpc.aio.Server | None = None
    health_port: int | None = None
    #: True while propagation is stale (readiness NOT_SERVING).
    propagation_stale: bool = False
    _stop_poller: asyncio.Event = field(default_factory=asyncio.Event)
    _poller: asyncio.Task[None] | None = None
    _watcher: asyncio.Task[None] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Set when the engine died: `run()` then exits non-zero so that Kubernetes restarts the pod.
    engine_failed: asyncio.Event = field(default_factory=asyncio.Event)
    #: The runtime canary (None: off, or the engine has no canary slot).
    canary: CanaryMonitor | None = None
    _canary_task: asyncio.Task[None] | None = None
    #: True while a canary failure is being handled (the engine watcher stands aside).
    recovering: bool = False
    #: One entry per canary failure handled: timings for logs, tests and docs.
    recoveries: list[Recovery] = field(default_factory=list)
    #: The OpenAI-compatible HTTP listener (`openai_listen`) and its port.
    openai: OpenAIServer | None = None
    openai_port: int | None = None
    #: The base model's name in the OpenAI API (`openai_model_name`, else its own name).
    base_model_name: str = ""
    #: The automatic rollback of canaries (lora_gateway.rollback); set by `start`.
    rollbacks: RollbackGuard | None = None

    @classmethod
    async def start(cls, settings: Settings, engine: Engine | None = None) -> GatewayServer:
        """Bring everything up; returns once health reports SERVING (or raises)."""
        tenants_bytes = await asyncio.to_thread(KeyRing.read_file, settings.tenants_file)
        keyring = await asyncio.to_thread(
            KeyRing.parse, tenants_bytes, settings.tenant_defaults(), where=settings.tenants_file
        )
        tenants = Tenants(keyring)
        store = await asyncio.to_thread(open_store, settings)
        registry, cache = store.registry, store.cache
        owns_engine = engine is None
        if engine is None:
            from lora_gateway.engine.vllm_engine import VLLMEngine

            engine = await VLLMEngine.start(settings)
        metrics = Metrics(
            version_metrics_max=settings.version_metrics_max,
            version_metrics_window_s=settings.version_metrics_window_s,
        )
        residency = Residency(
            engine,
            registry,
            cache,
            store.spec,
            store.limits,
            poll_interval_s=settings.poll_interval_s,
            metrics=metrics,
            manifest_cache_size=settings.manifest_cache_size,
            slot_wait_s=settings.engine_slot_wait_s,
            host_budget_bytes=settings.host_lora_budget_bytes,
            resync_per_poll=settings.manifest_resync_per_poll,
            feed_lookback_s=settings.change_feed_lookback_s,
            feed_retention_s=settings.change_feed_retention_s,
        )
        admission = Admission(
            settings.max_concurrent_requests,
            on_change=metrics.set_inflight,
            on_refused=metrics.refused,
        )
        gateway = Gateway(settings, engine, registry, residency, tenants, admission, metrics)
        await gateway.chat.check_base()
        if gateway.chat.base_problem is not None:
            log.error(
                "the base model's chat template cannot be used; chat requests will be refused "
                "(text and token prompts are served): %s",
                gateway.chat.base_problem,
            )
        audit = await asyncio.to_thread(AuditLog, settings.audit_log)
        usage = await asyncio.to_thread(UsageLog, settings.usage_log)

        # No `maximum_concurrent_rpcs`: at that cap grpc.aio stops taking calls (they wait until
        # their deadline, probes included). Every kind of call has its own cap instead, answered
        # RESOURCE_EXHAUSTED at once (tenancy.RpcLimits, tenancy.Admission).
        server = grpc.aio.server(
            interceptors=[
                GatewayInterceptor(
                    tenants, metrics, audit, rpc_limits(settings, metrics), usage=usage
                )
            ],
            options=grpc_options(settings),
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(gateway), server)
        adapters = Adapters(gateway, audit)
        guard = RollbackGuard(adapters)
        guard.attach()
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(adapters), server)
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
        probe_server, health_port = None, None
        if settings.health_listen:
            probe_server = grpc.aio.server(
                interceptors=[
                    GatewayInterceptor(tenants, metrics, None, rpc_limits(settings, metrics))
                ],
                options=grpc_options(settings),
            )
            health_pb2_grpc.add_HealthServicer_to_server(health, probe_server)
            health_port = probe_server.add_insecure_port(settings.health_listen)
            if health_port == 0:
                raise errors.Unavailable(f"cannot listen on {settings.health_listen}")
        for name in (*READINESS_NAMES, LIVENESS_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        if probe_server is not None:
            await probe_server.start()
        self = cls(
            settings, server, health, gateway, engine, owns_engine, port, audit, metrics, adapters
        )
        self.rollbacks = guard
        self.tenants = tenants
        self.usage = usage
        self.tenants_digest = hashlib.sha256(tenants_bytes).hexdigest()
        self.probe_server, self.health_port = probe_server, health_port
        self.base_model_name = settings.openai_model_name or store.spec.name
        try:
            if settings.metrics_listen:
                self.metrics_port = metrics.start_http(settings.metrics_listen)[1]
            if settings.self_test:
                await require_isolation(engine, settings.model)
            await self._start_canary()
            await self._warm_up()
            if settings.openai_listen:
                # Started last, so that no HTTP request is served before the self-test passed.
                front = OpenAIFront(
                    gateway, audit, rpc_limits(settings, metrics), self.base_model_name, usage
                )
                self.openai = await OpenAIServer.start(settings, front)
                self.openai_port = self.openai.port
        except BaseException:
            await self.stop(grace=0)
            raise
        self._poller = asyncio.create_task(residency.run_poller(self._stop_poller))
        self._watcher = asyncio.create_task(self._watch_engine())
        if self.canary is not None:
            self._canary_task = asyncio.create_task(self.canary.run(self._stop_poller))
        self._tasks = [
            asyncio.create_task(self._watch_propagation()),
            asyncio.create_task(self._watch_tenants()),
            asyncio.create_task(guard.run(self._stop_poller)),
        ]
        for name in (*READINESS_NAMES, LIVENESS_NAME):
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
            if self.recovering:
                continue  # the canary's recovery restarts the engine; it reports on its own
            try:
                await self.engine.check_health()
            except errors.GatewayError:
                log.error("engine is not healthy: reporting NOT_SERVING and stopping")
                self.metrics.set_engine_healthy(False)
                self.engine_failed.set()
                for name in (*READINESS_NAMES, LIVENESS_NAME):
                    await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                return

    # --- runtime canary -----------------------------------------------------------------------
    async def _start_canary(self) -> None:
        """Record the canary's references (the self-test just passed) and hook residency."""
        engine = self.engine
        if (
            self.settings.canary_interval_s <= 0
            or not isinstance(engine, CanaryEngine)
            or engine.canary_adapter is None
        ):
            return
        canary = Canary.of(engine)
        await canary.record()
        monitor = CanaryMonitor(
            canary,
            self.settings.canary_interval_s,
            self._on_canary_failure,
            on_result=self.metrics.canary_check,
        )

        def loaded(version: AdapterVersion, adapter: LoadedAdapter) -> None:
            monitor.loaded(version, adapter.lora_int_id)  # the version is the suspect's key

        self.gateway.residency.on_loaded = loaded
        self.canary = monitor

    async def _update_readiness(self) -> None:
        """Readiness is SERVING only while nothing holds it down: a drain, a dead engine, a
        canary recovery, or stale propagation. (Liveness is left alone: a recovery or a store
        outage must not make Kubernetes restart the pod.)"""
        down = (
            self.gateway.draining
            or self.engine_failed.is_set()
            or self.recovering
            or self.propagation_stale
        )
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if down
            else health_pb2.HealthCheckResponse.SERVING
        )
        for name in READINESS_NAMES:
            await self.health.set(name, status)

    async def _on_canary_failure(self, report: CanaryReport, suspects: list[Hashable]) -> bool:
        """NOT_SERVING at once → quarantine the suspects → restart the engine (or exit)."""
        detected = time.monotonic()
        self.recovering = True
        await self._update_readiness()
        self.metrics.set_engine_healthy(False)
        versions = [key for key in suspects if isinstance(key, AdapterVersion)]
        await self.adapters.quarantine(versions, report.mismatches)
        recovery = Recovery(
            mismatches=report.mismatches,
            quarantined=tuple(f"{v.tenant}/{v.name}@{v.version_id}" for v in versions),
        )
        self.recoveries.append(recovery)
        if not self.owns_engine or not isinstance(self.engine, CanaryEngine):
            log.error("runtime canary failed; the engine is not ours to restart: exiting")
            self.engine_failed.set()
            return False
        try:
            restarting = time.monotonic()
            await self.engine.restart()
            recovery.restart_s = time.monotonic() - restarting
            pinned = await self.gateway.residency.forget_engine()
            self.metrics.engine_restarted()
            if self.settings.self_test:
                await require_isolation(self.engine, self.settings.model)
            again = await Canary.of(self.engine).check()
            if not again.ok:
                raise errors.Unavailable(
                    "runtime canary still fails after the restart: "
                    + (", ".join(again.mismatches) or again.detail)
                )
        except Exception:
            log.exception("engine recovery failed: reporting NOT_SERVING and stopping")
            self.engine_failed.set()
            return False
        quarantined = {key_of(v) for v in versions}
        for version in pinned:
            if key_of(version) not in quarantined:
                try:
                    await self.gateway.residency.pin(version)
                except (errors.GatewayError, StoreError):
                    log.exception(
                        "could not pin %s/%s again after the restart", version.tenant, version.name
                    )
        recovery.recovered_s = time.monotonic() - detected
        self.recovering = False
        await self._update_readiness()
        self.metrics.set_engine_healthy(True)
        log.warning("engine recovered in %.1fs after the canary failed", recovery.recovered_s)
        return True

    async def _watch_propagation(self) -> None:
        """Readiness follows propagation: NOT_SERVING while no manifest poll has completed for
        `propagation_stale_after_s` (other replicas' revocations would not be seen), SERVING
        again after the next complete poll. Checked every `poll_interval_s`."""
        residency = self.gateway.residency
        bound = self.settings.propagation_stale_after_s
        started = time.monotonic()
        while not self._stop_poller.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_poller.wait(), self.settings.poll_interval_s)
            if self._stop_poller.is_set() or self.engine_failed.is_set():
                return
            last = residency.last_complete_poll or started
            stale = time.monotonic() - last > bound
            if stale == self.propagation_stale:
                continue
            self.propagation_stale = stale
            self.metrics.set_propagation_stale(stale)
            if stale:
                log.error(
                    "no manifest poll completed for %.0fs (bound %.0fs): other replicas' "
                    "revocations may not be seen; reporting NOT_SERVING (readiness)",
                    time.monotonic() - last,
                    bound,
                )
            else:
                log.info("manifest polls complete again: reporting SERVING")
            await self._update_readiness()

    async def _watch_tenants(self) -> None:
        """Re-read the tenants file every `tenants_reload_interval_s` (in a thread) and put a
        changed, valid one in force; an invalid one is logged and counted once, and the keys
        and limits in force stay."""
        every = self.settings.tenants_reload_interval_s
        tenants = self.tenants
        if every <= 0 or tenants is None:
            return
        path = self.settings.tenants_file
        defaults = self.settings.tenant_defaults()
        loop = asyncio.get_running_loop()
        # One thread of its own: the reads never wait behind (or add threads to) the default
        # executor, which the disk cache uses.
        with ThreadPoolExecutor(1, thread_name_prefix="tenants-reload") as pool:
            while not self._stop_poller.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_poller.wait(), every)
                if self._stop_poller.is_set():
                    return
                try:
                    data = await loop.run_in_executor(pool, KeyRing.read_file, path)
                except errors.InvalidArgument as exc:
                    self._tenants_invalid(f"unreadable: {exc}", exc)
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if digest in (self.tenants_digest, self._tenants_bad):
                    continue
                parse = functools.partial(KeyRing.parse, data, defaults, where=path)
                try:
                    keyring = await loop.run_in_executor(pool, parse)
                except Exception as exc:  # invalid (InvalidArgument) or anything unexpected
                    self._tenants_invalid(digest, exc)
                    continue
                self._tenants_in_force(tenants, keyring, digest)

    def _tenants_in_force(self, tenants: Tenants, keyring: KeyRing, digest: str) -> None:
        tenants.replace(keyring)
        self.tenants_digest, self._tenants_bad = digest, ""
        self.metrics.tenants_reloaded("ok")
        log.info(
            "tenants file reloaded: %d tenants, %d keys", len(keyring.tenants), keyring.key_count
        )

    def _tenants_invalid(self, marker: str, exc: Exception) -> None:
        """Log and count an unusable tenants file once (`marker`: its digest or the error)."""
        if marker == self._tenants_bad:
            return
        self._tenants_bad = marker
        if isinstance(exc, errors.InvalidArgument):
            log.error("tenants file not reloaded, the previous one stays in force: %s", exc)
        else:
            log.error("tenants file not reloaded, the previous one stays in force", exc_info=exc)
        self.metrics.tenants_reloaded("invalid")

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
        # Both fronts stop accepting and drain their in-flight requests within the same grace.
        await asyncio.gather(
            self.server.stop(grace),
            *([self.openai.stop(grace)] if self.openai is not None else []),
        )
        self._stop_poller.set()
        for task in (self._poller, self._watcher, self._canary_task, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.probe_server is not None:
            await self.probe_server.stop(0)
        if self.owns_engine:
            await self.engine.shutdown()
        else:
            with contextlib.suppress(errors.GatewayError):
                await self.gateway.residency.close()
        self.gateway.close()
        self.audit.close()
        if self.usage is not None:
            self.usage.close()
        self.metrics.set_engine_healthy(False)
        self.metrics.close()
        await asyncio.to_thread(self.gateway.store.spool.close)


async def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT (drain, exit 0) or until the engine dies (exit 1)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await GatewayServer.start(settings)
    print(f"lora-gateway listening on port {server.port}", flush=True)
    if server.openai_port is not None:
        print(f"OpenAI-compatible HTTP API on port {server.openai_port}", flush=True)
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
