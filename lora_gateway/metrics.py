"""Prometheus metrics of the gateway, served over HTTP (`Settings.metrics_listen`).

`Metrics` owns its own `CollectorRegistry` (never the global default), so that a process, or a
test, can build several. All metric names start with `lora_gateway_`.

Label values are bounded: `tenant` comes from the tenants file, `tier` and `phase` from fixed
sets, `code` from the gRPC status names, and `adapter` is "<tenant>/<name>" of an adapter that
*resolved* (no version, no user free text). Requests whose adapter did not resolve are labelled
`adapter="none"`, base-model requests `adapter="base"`; see `adapter_label`.

Per-version series (`lora_gateway_version_*`, labels tenant, adapter, version) add the
version ("sha256:<hex>") of a call whose adapter resolved. Their `version` values are bounded per
adapter by `VersionSeries`: the versions an alias points at (plain or weighted), plus at most
`version_metrics_max` others that served within `version_metrics_window_s`; any other version's
calls count under `version="other"`. A version's series are removed when it leaves that set. The
same bookkeeping keeps a short in-memory ring of each labelled version's recent calls, from which
GetAdapter reports a summary (`VersionSummary`).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from adapter_store.rollback import REASONS as ROLLBACK_REASONS

__all__ = [
    "BASE_ADAPTER_LABEL",
    "CONTENT_TYPE_LATEST",
    "NO_ADAPTER_LABEL",
    "VERSION_OTHER_LABEL",
    "LoadPhase",
    "Metrics",
    "SlotQueue",
    "Tier",
    "VersionCall",
    "VersionSeries",
    "VersionSummary",
    "adapter_label",
    "parse_listen",
]

Tier = Literal["engine", "disk"]
#: The phases residency records for each cold load: `fetch` (store → disk cache: download,
#: fsync, sha256 verify, atomic rename; the cache verifies as it fetches, so there is no
#: separate verify phase), `validate` (adapter checks), `evict` (remove_lora of the idle
#: versions a load had to make room for: recorded only by loads that evicted), `engine_add`
#: (add_lora, once the load holds its slot).
LoadPhase = Literal["fetch", "validate", "evict", "engine_add"]
#: The queues a request may wait in for an engine slot: `tenant` (its tenant holds its
#: `max_engine_slots`), `engine` (a load waits for a free or evictable slot).
SlotQueue = Literal["tenant", "engine"]
_TIERS: frozenset[str] = frozenset(get_args(Tier))
_SLOT_QUEUES: frozenset[str] = frozenset(get_args(SlotQueue))
_CANARY_RESULTS: frozenset[str] = frozenset({"pass", "fail", "error"})
_PHASES: frozenset[str] = frozenset(get_args(LoadPhase))

_RELOAD_RESULTS: frozenset[str] = frozenset({"ok", "invalid"})
_ROLLBACK_REASONS: frozenset[str] = frozenset(ROLLBACK_REASONS)
_EVALUATION_RESULTS: frozenset[str] = frozenset({"pass", "fail", "error"})
#: Values of `limit` on lora_gateway_limit_refusals_total.
REFUSAL_LIMITS: frozenset[str] = frozenset(
    {
        "public_streams",
        "public_streams_per_peer",
        "rpcs",
        "tenant_rpcs",
        "uploads",
        "spool",
        "quota",
        "rate",
    }
)

BASE_ADAPTER_LABEL = "base"
NO_ADAPTER_LABEL = "none"
UNAUTHENTICATED_TENANT_LABEL = "-"
#: The `version` label of calls on versions without labels of their own (see `VersionSeries`).
VERSION_OTHER_LABEL = "other"
#: Most recent calls one ring (one version, one caller tenant) keeps for the summary.
VERSION_RING_SIZE = 512

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def adapter_label(tenant: str | None, name: str | None) -> str:
    """The `adapter` label: "<tenant>/<name>" of a resolved adapter, "base" for the base model.

    Pass `tenant=None` for a request whose adapter did not resolve (NOT_FOUND, denied): its
    name is user text and must not become a label value.
    """
    if tenant is None:
        return NO_ADAPTER_LABEL
    if not name:
        return BASE_ADAPTER_LABEL
    return f"{tenant}/{name}"


def parse_listen(listen: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port). Port 0 picks a free one."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)  # noqa: S104 - an explicit ":port" means all


@dataclass(frozen=True)
class VersionCall:
    """One finished inference call on an adapter version, as the gateway core saw it."""

    #: The caller's tenant (from the tenants file).
    tenant: str
    #: The owner and name of the adapter, and the version ("sha256:<hex>") that served.
    owner: str
    name: str
    version: str
    #: gRPC status code name ("OK", "INVALID_ARGUMENT", ...).
    code: str
    #: From the call's arrival at the core to its end.
    seconds: float
    #: From arrival to the first token (None when no token came).
    ttft_seconds: float | None
    completion_tokens: int
    #: "stop" or "length" (None when the call did not finish normally).
    finish_reason: str | None
    #: A case of an evaluation (EvaluateAdapter, or a scheduled one), not a client's call.
    evaluation: bool = False


@dataclass(frozen=True)
class VersionSummary:
    """A version's recent calls: GetAdapter's per-version summary."""

    #: "sha256:<hex>", or "other" (versions without labels of their own).
    version: str
    #: Seconds of history this covers: the window, or less when the ring holds fewer calls.
    window_seconds: float
    requests: int
    errors: int
    #: Code name -> calls that ended with it (errors only).
    error_codes: dict[str, int] = field(default_factory=dict)
    #: Finish reason -> calls that finished with it.
    finish_reasons: dict[str, int] = field(default_factory=dict)
    latency_p50_seconds: float | None = None
    latency_p99_seconds: float | None = None
    ttft_p50_seconds: float | None = None
    completion_tokens: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


_Sample = tuple[float, float, float | None, int, str, str | None]  # t, s, ttft, tokens, code, fin


@dataclass
class _AdapterSeries:
    """One adapter's labelled versions: version -> when it last served (monotonic)."""

    labelled: dict[str, float] = field(default_factory=dict)
    #: The versions its aliases pointed at, as of the last call recorded.
    aliased: frozenset[str] = frozenset()
    #: (version label, caller tenant) -> its recent calls, oldest first.
    rings: dict[tuple[str, str], deque[_Sample]] = field(default_factory=dict)
    #: When its last call was recorded (monotonic).
    last: float = 0.0


def _quantile(values: list[float], q: float) -> float | None:
    """The `q` quantile of `values` (nearest rank); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class VersionSeries:
    """Which adapter versions get labels of their own, and their recent calls (bounded).

    Per adapter, a version has labels while an alias points at it (as of the adapter's last
    recorded call), or while it holds one of `max_recent` slots: a version without an alias
    takes a free slot on its call and keeps it while it serves within `window_s`. Calls of
    any other version are labelled "other". So one adapter's `version` label has at most
    `max_recent` + (versions its aliases name) + 1 values. When a version leaves the set, its
    series are removed from the registry (each by its label values) and its ring is dropped.

    Rings hold the calls of the last `window_s` (at most `VERSION_RING_SIZE` per version and
    caller tenant); an adapter with no call for `window_s` loses its rings and all its
    series (aliased versions' too), swept a few at a time as other calls are recorded.
    Thread-safe; no I/O.
    """

    def __init__(
        self, remove: Callable[[dict[str, str]], None], *, max_recent: int, window_s: float
    ) -> None:
        self.max_recent = max_recent
        self.window_s = window_s
        self._remove = remove
        self._lock = threading.Lock()
        #: adapter label -> its series, least recently called first.
        self._adapters: OrderedDict[str, _AdapterSeries] = OrderedDict()

    def label(
        self,
        call: VersionCall,
        aliased: Collection[str],
        now: float,
        record: Callable[[str], None] | None = None,
    ) -> str:
        """The `version` label of `call` (updating the set), with its sample in the ring;
        `record(label)` runs under the lock (series are not removed while it records)."""
        adapter = adapter_label(call.owner, call.name)
        with self._lock:
            self._sweep(now, keep=adapter)
            series = self._adapters.get(adapter)
            if series is None:
                series = self._adapters[adapter] = _AdapterSeries()
            self._adapters.move_to_end(adapter)
            series.last = now
            series.aliased = frozenset(aliased)
            if call.version in series.labelled:  # the version serving now is the most recent
                series.labelled[call.version] = now
            self._expire(adapter, series, now)
            version = call.version
            if version not in series.labelled and version not in series.aliased:
                free = self.max_recent - sum(1 for v in series.labelled if v not in series.aliased)
                if free <= 0:
                    version = VERSION_OTHER_LABEL
            if version != VERSION_OTHER_LABEL:
                series.labelled[version] = now
            ring = series.rings.get((version, call.tenant))
            if ring is None:
                ring = series.rings[(version, call.tenant)] = deque(maxlen=VERSION_RING_SIZE)
            ring.append(
                (
                    now,
                    call.seconds,
                    call.ttft_seconds,
                    call.completion_tokens,
                    call.code,
                    call.finish_reason,
                )
            )
            if record is not None:
                record(version)
            return version

    def labelled(self, owner: str, name: str) -> set[str]:
        """The versions of an adapter that have labels now ("other" not included)."""
        with self._lock:
            series = self._adapters.get(adapter_label(owner, name))
            return set() if series is None else set(series.labelled)

    def summary(
        self, owner: str, name: str, tenant: str | None, now: float
    ) -> list[VersionSummary]:
        """Each labelled version's calls within the window (and "other"'s, when it has any),
        sorted by version: the calls of `tenant` only, or of every caller for None."""
        adapter = adapter_label(owner, name)
        with self._lock:
            series = self._adapters.get(adapter)
            if series is None:
                return []
            since = now - self.window_s
            by_version: dict[str, list[_Sample]] = {}
            full: dict[str, float] = {}
            for (version, caller), ring in series.rings.items():
                if tenant is not None and caller != tenant:
                    continue
                samples = [s for s in ring if s[0] >= since]
                by_version.setdefault(version, []).extend(samples)
                if len(ring) == ring.maxlen and ring[0][0] >= since:
                    full[version] = min(full.get(version, now), ring[0][0])
        out = []
        for version, samples in sorted(by_version.items()):
            if not samples:
                continue
            errors: dict[str, int] = {}
            finish: dict[str, int] = {}
            for sample in samples:
                if sample[4] != "OK":
                    errors[sample[4]] = errors.get(sample[4], 0) + 1
                if sample[5] is not None:
                    finish[sample[5]] = finish.get(sample[5], 0) + 1
            ttfts = [s[2] for s in samples if s[2] is not None]
            latencies = [s[1] for s in samples]
            out.append(
                VersionSummary(
                    version=version,
                    window_seconds=now - full[version] if version in full else self.window_s,
                    requests=len(samples),
                    errors=sum(errors.values()),
                    error_codes=dict(sorted(errors.items())),
                    finish_reasons=dict(sorted(finish.items())),
                    latency_p50_seconds=_quantile(latencies, 0.5),
                    latency_p99_seconds=_quantile(latencies, 0.99),
                    ttft_p50_seconds=_quantile(ttfts, 0.5),
                    completion_tokens=sum(s[3] for s in samples),
                )
            )
        return out

    def _expire(self, adapter: str, series: _AdapterSeries, now: float) -> None:
        """Drop the versions that left the set: unaliased and idle for the window, or beyond
        `max_recent` unaliased ones (an alias moved off them), least recently served first."""
        unaliased = sorted(
            (when, v) for v, when in series.labelled.items() if v not in series.aliased
        )
        excess = len(unaliased) - self.max_recent
        for index, (when, version) in enumerate(unaliased):
            if index < excess or now - when > self.window_s:
                self._drop(adapter, series, version)
        since = now - self.window_s
        for key, ring in list(series.rings.items()):
            while ring and ring[0][0] < since:
                ring.popleft()
            if not ring:
                del series.rings[key]

    def _drop(self, adapter: str, series: _AdapterSeries, version: str) -> None:
        del series.labelled[version]
        for key in [k for k in series.rings if k[0] == version]:
            del series.rings[key]
        self._remove({"adapter": adapter, "version": version})

    def _sweep(self, now: float, keep: str, most: int = 4) -> None:
        """Forget up to `most` adapters without a call for the window: their rings and all
        their series (aliased versions' and "other"'s too; the next call starts them again)."""
        for _ in range(most):
            if not self._adapters:
                return
            adapter, series = next(iter(self._adapters.items()))
            if adapter == keep or now - series.last <= self.window_s:
                return
            for version in list(series.labelled):
                self._drop(adapter, series, version)
            self._remove({"adapter": adapter, "version": VERSION_OTHER_LABEL})
            del self._adapters[adapter]


def _tenant(tenant: str) -> str:
    return tenant or UNAUTHENTICATED_TENANT_LABEL


def _code(code: grpc.StatusCode | str) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else code


class Metrics:
    """The gateway's metrics and their registry. The methods are cheap and thread-safe."""

    def __init__(
        self,
        *,
        process_metrics: bool = True,
        version_metrics_max: int = 8,
        version_metrics_window_s: float = 300.0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.requests_total = Counter(
            "lora_gateway_requests_total",
            "Finished RPCs by tenant, adapter (<tenant>/<name>) and gRPC status code.",
            ["tenant", "adapter", "code"],
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "lora_gateway_time_to_first_token_seconds",
            "From request arrival to the first generated token.",
            ["tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "lora_gateway_request_seconds",
            "Whole Generate request latency.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_out_total = Counter(
            "lora_gateway_tokens_out_total",
            "Generated tokens by tenant.",
            ["tenant"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "lora_gateway_queue_seconds",
            "Time a request waited before its adapter was resident and it was submitted.",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.cache_hits_total = Counter(
            "lora_gateway_cache_hits_total",
            "Adapter lookups served by a tier (engine: already loaded; disk: local cache).",
            ["tier"],
            registry=r,
        )
        self.cache_misses_total = Counter(
            "lora_gateway_cache_misses_total",
            "Adapter lookups a tier could not serve.",
            ["tier"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "lora_gateway_adapter_load_seconds",
            "Cold adapter load latency by phase (fetch incl. sha256 verify, validate, evict (only "
            "loads that made room), engine_add).",
            ["phase"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.evictions_total = Counter(
            "lora_gateway_evictions_total",
            "Adapters evicted from a tier.",
            ["tier"],
            registry=r,
        )
        self.engine_loads_total = Counter(
            "lora_gateway_engine_loads_total",
            "Adapter versions added to the engine (cold loads that completed).",
            registry=r,
        )
        self.revoked_unloads_total = Counter(
            "lora_gateway_revoked_unloads_total",
            "Adapter versions removed from the engine because they were revoked.",
            registry=r,
        )
        self.slot_waits_total = Counter(
            "lora_gateway_slot_waits_total",
            "Requests that queued for an engine adapter slot, by queue (tenant: the tenant held "
            "its max_engine_slots; engine: no slot was free or evictable).",
            ["queue"],
            registry=r,
        )
        self.manifest_reads_total = Counter(
            "lora_gateway_manifest_reads_total",
            "Manifest reads from the store on a request's path (the poller's re-reads aside).",
            registry=r,
        )
        self.manifest_evictions_total = Counter(
            "lora_gateway_manifest_evictions_total",
            "Manifests dropped from the in-memory cache (least recently used beyond "
            "manifest_cache_size).",
            registry=r,
        )
        self.resident_adapters = Gauge(
            "lora_gateway_resident_adapters",
            "Adapters held by a tier.",
            ["tier"],
            registry=r,
        )
        self.resident_bytes = Gauge(
            "lora_gateway_resident_bytes",
            "Bytes of adapter weights held by a tier (engine: vLLM's host LoRA cache, by each "
            "version's weights file; disk: the disk cache).",
            ["tier"],
            registry=r,
        )
        self.engine_healthy = Gauge(
            "lora_gateway_engine_healthy",
            "1 while the engine is up and passed its self-test, else 0.",
            registry=r,
        )
        self.inflight_requests = Gauge(
            "lora_gateway_inflight_requests",
            "Admitted requests in flight, by tenant.",
            ["tenant"],
            registry=r,
        )
        self.canary_checks_total = Counter(
            "lora_gateway_canary_checks_total",
            "Runtime canary checks by result (pass, fail: outputs differ from the references, "
            "error: the check could not run).",
            ["result"],
            registry=r,
        )
        self.quarantined_versions_total = Counter(
            "lora_gateway_quarantined_versions_total",
            "Adapter versions quarantined after a failed runtime canary check.",
            registry=r,
        )
        self.engine_restarts_total = Counter(
            "lora_gateway_engine_restarts_total",
            "In-process engine restarts after a failed runtime canary check.",
            registry=r,
        )
        # --- availability (issue 12): poller, tenants file reloads, refusals by limit ---------
        self.manifest_poll_errors_total = Counter(
            "lora_gateway_manifest_poll_errors_total",
            "Manifest polls (or single manifests in one) that failed; the poller keeps running.",
            registry=r,
        )
        self.manifest_poll_last_complete = Gauge(
            "lora_gateway_manifest_poll_last_complete_timestamp_seconds",
            "Unix time of the last manifest poll that read the change feed to its end and "
            "re-read the cached manifests it named.",
            registry=r,
        )
        self.manifest_poll_requests = Gauge(
            "lora_gateway_manifest_poll_last_store_requests",
            "Store requests the last manifest poll made (feed listings and manifest re-reads).",
            registry=r,
        )
        self.manifests_cached = Gauge(
            "lora_gateway_manifests_cached",
            "Manifests in this replica's cache (kept fresh by the poller), at the last poll.",
            registry=r,
        )
        self.manifest_poll_requests_total = Counter(
            "lora_gateway_manifest_poll_store_requests_total",
            "Store requests made by manifest polls (feed listings and manifest re-reads).",
            registry=r,
        )
        self.manifest_poll_seconds = Histogram(
            "lora_gateway_manifest_poll_seconds",
            "How long each manifest poll took (listing the feed, re-reading what it names, the "
            "resync slice): the propagation bound is poll_interval_s plus about one of these.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0),
            registry=r,
        )
        self.propagation_stale = Gauge(
            "lora_gateway_propagation_stale",
            "1 while no poll completed within propagation_stale_after_s (readiness NOT_SERVING).",
            registry=r,
        )
        self.tenants_reloads_total = Counter(
            "lora_gateway_tenants_reloads_total",
            "Changes of the tenants file seen: result=ok (in force) or invalid (old one kept).",
            ["result"],
            registry=r,
        )
        self.limit_refusals_total = Counter(
            "lora_gateway_limit_refusals_total",
            "Calls refused by a cap or rate, by limit.",
            ["limit"],
            registry=r,
        )
        # --- per adapter version (issue 11): bounded by `VersionSeries` ------------------------
        version_labels = ["tenant", "adapter", "version"]
        self.version_requests_total = Counter(
            "lora_gateway_version_requests_total",
            "Inference calls by caller tenant, adapter (<owner>/<name>), version (sha256:<hex>, "
            'or "other") and gRPC status code.',
            [*version_labels, "code"],
            registry=r,
        )
        self.version_request_seconds = Histogram(
            "lora_gateway_version_request_seconds",
            "Inference call latency by tenant, adapter and version (errors included).",
            version_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.version_time_to_first_token_seconds = Histogram(
            "lora_gateway_version_time_to_first_token_seconds",
            "From arrival to the first generated token, by tenant, adapter and version.",
            version_labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.version_completion_tokens_total = Counter(
            "lora_gateway_version_completion_tokens_total",
            "Generated tokens by tenant, adapter and version.",
            version_labels,
            registry=r,
        )
        self.version_finish_total = Counter(
            "lora_gateway_version_finish_total",
            "Calls that finished (stop, length) by tenant, adapter, version and finish reason.",
            [*version_labels, "reason"],
            registry=r,
        )
        # --- automatic rollback (issue 11; lora_gateway.rollback) -----------------------------
        self.rollbacks_total = Counter(
            "lora_gateway_rollbacks_total",
            "Automatic rollbacks of canaries written by this replica, by owner tenant, adapter "
            "(<owner>/<name>) and reason (error_rate, length_rate, evaluation, quarantined).",
            ["tenant", "adapter", "reason"],
            registry=r,
        )
        self.scheduled_evaluations_total = Counter(
            "lora_gateway_scheduled_evaluations_total",
            "Scheduled evaluations of canaries run by this replica, by result (pass, fail: below "
            "the rollback policy's min_eval_score, error: it could not run).",
            ["result"],
            registry=r,
        )
        self._version_metrics = (
            self.version_requests_total,
            self.version_request_seconds,
            self.version_time_to_first_token_seconds,
            self.version_completion_tokens_total,
            self.version_finish_total,
        )
        #: (adapter, version) -> the (metric, label values) of its series (`_version_series`).
        self._series_by_version: dict[tuple[str, str], set[tuple[Any, tuple[str, ...]]]] = {}
        self.versions = VersionSeries(
            self._remove_version,
            max_recent=version_metrics_max,
            window_s=version_metrics_window_s,
        )
        self._http: WSGIServer | None = None

    def _version_series(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)` (values start with tenant, adapter, version), remembered
        under (adapter, version) so that `_remove_version` removes exactly its series: the
        registry's `remove_by_labels` scans every series of the metric, which with 10,000
        adapters made each request pay for the sweep of others (docs/benchmarks.md)."""
        self._series_by_version.setdefault((values[1], values[2]), set()).add((metric, values))
        return metric.labels(*values)

    def _remove_version(self, labels: dict[str, str]) -> None:
        """Remove the series of one (adapter, version); `VersionSeries` calls it under its lock,
        as it does `version_done`'s recording."""
        for metric, values in self._series_by_version.pop(
            (labels["adapter"], labels["version"]), ()
        ):
            with contextlib.suppress(KeyError):
                metric.remove(*values)

    # --- recording ----------------------------------------------------------------------------
    def request_done(
        self, tenant: str, adapter: str, code: grpc.StatusCode | str, seconds: float | None = None
    ) -> None:
        """Count a finished request; `adapter` from `adapter_label`. `seconds` feeds the latency
        histogram (pass it for Generate requests only)."""
        self.requests_total.labels(_tenant(tenant), adapter, _code(code)).inc()
        if seconds is not None:
            self.request_seconds.observe(seconds)

    def version_done(
        self, call: VersionCall, aliased: Collection[str] = (), now: float | None = None
    ) -> str:
        """Record a finished call on an adapter version (`aliased`: the versions the adapter's
        aliases point at now; `now`: time.monotonic() unless given). Returns the `version`
        label it was counted under."""

        def record(version: str) -> None:
            labels = (_tenant(call.tenant), adapter_label(call.owner, call.name), version)
            series = self._version_series
            series(self.version_requests_total, *labels, call.code).inc()
            series(self.version_request_seconds, *labels).observe(call.seconds)
            if call.ttft_seconds is not None:
                ttft = self.version_time_to_first_token_seconds
                series(ttft, *labels).observe(call.ttft_seconds)
            if call.completion_tokens > 0:
                tokens = self.version_completion_tokens_total
                series(tokens, *labels).inc(call.completion_tokens)
            if call.finish_reason is not None:
                series(self.version_finish_total, *labels, call.finish_reason).inc()

        when = time.monotonic() if now is None else now
        return self.versions.label(call, aliased, when, record)

    def version_summary(
        self, owner: str, name: str, tenant: str | None, now: float | None = None
    ) -> list[VersionSummary]:
        """The recent calls of an adapter's versions (`VersionSeries.summary`): those of
        `tenant`, or of every caller for None."""
        when = time.monotonic() if now is None else now
        return self.versions.summary(owner, name, tenant, when)

    def rolled_back(self, owner: str, name: str, reason: str) -> None:
        """An automatic rollback this replica wrote; `reason` from adapter_store.rollback."""
        label = adapter_label(owner, name)
        self.rollbacks_total.labels(_tenant(owner), label, _check(reason, _ROLLBACK_REASONS)).inc()

    def scheduled_evaluation(self, result: Literal["pass", "fail", "error"]) -> None:
        self.scheduled_evaluations_total.labels(_check(result, _EVALUATION_RESULTS)).inc()

    def first_token(self, tenant: str, seconds: float) -> None:
        self.time_to_first_token_seconds.labels(_tenant(tenant)).observe(seconds)

    def tokens_out(self, tenant: str, count: int) -> None:
        if count > 0:
            self.tokens_out_total.labels(_tenant(tenant)).inc(count)

    def queued(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)

    def cache_hit(self, tier: Tier) -> None:
        self.cache_hits_total.labels(_check(tier, _TIERS)).inc()

    def cache_miss(self, tier: Tier) -> None:
        self.cache_misses_total.labels(_check(tier, _TIERS)).inc()

    def load_phase(self, phase: LoadPhase, seconds: float) -> None:
        self.adapter_load_seconds.labels(_check(phase, _PHASES)).observe(seconds)

    @contextlib.contextmanager
    def time_load(self, phase: LoadPhase) -> Iterator[None]:
        """`with metrics.time_load("fetch"): ...` observes the block's duration (also on error)."""
        _check(phase, _PHASES)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.load_phase(phase, time.perf_counter() - start)

    def evicted(self, tier: Tier, count: int = 1) -> None:
        self.evictions_total.labels(_check(tier, _TIERS)).inc(count)

    def engine_loaded(self) -> None:
        self.engine_loads_total.inc()

    def revoked_unload(self) -> None:
        self.revoked_unloads_total.inc()

    def slot_waited(self, queue: SlotQueue) -> None:
        self.slot_waits_total.labels(_check(queue, _SLOT_QUEUES)).inc()

    def manifest_read(self) -> None:
        self.manifest_reads_total.inc()

    def manifest_evicted(self) -> None:
        self.manifest_evictions_total.inc()

    def set_resident(self, tier: Tier, count: int, nbytes: int | None = None) -> None:
        self.resident_adapters.labels(_check(tier, _TIERS)).set(count)
        if nbytes is not None:
            self.resident_bytes.labels(tier).set(nbytes)

    def set_engine_healthy(self, healthy: bool) -> None:
        self.engine_healthy.set(1 if healthy else 0)

    def canary_check(self, result: str) -> None:
        """Matches `engine.canary.CanaryMonitor(on_result=...)`."""
        self.canary_checks_total.labels(_check(result, _CANARY_RESULTS)).inc()

    def quarantined(self, count: int = 1) -> None:
        self.quarantined_versions_total.inc(count)

    def engine_restarted(self) -> None:
        self.engine_restarts_total.inc()

    def set_inflight(self, tenant: str, count: int) -> None:
        """Matches `tenancy.Admission(on_change=...)`."""
        self.inflight_requests.labels(_tenant(tenant)).set(count)

    def poll_failed(self, count: int = 1) -> None:
        self.manifest_poll_errors_total.inc(count)

    def poll_requests(self, count: int, cached: int) -> None:
        self.manifests_cached.set(cached)
        self.manifest_poll_requests.set(count)
        self.manifest_poll_requests_total.inc(count)

    def poll_took(self, seconds: float) -> None:
        self.manifest_poll_seconds.observe(seconds)

    def poll_completed(self) -> None:
        self.manifest_poll_last_complete.set(time.time())

    def set_propagation_stale(self, stale: bool) -> None:
        self.propagation_stale.set(1 if stale else 0)

    def tenants_reloaded(self, result: Literal["ok", "invalid"]) -> None:
        self.tenants_reloads_total.labels(_check(result, _RELOAD_RESULTS)).inc()

    def refused(self, limit: str) -> None:
        """Matches `tenancy.RpcLimits(on_refused=...)`; `limit` from `REFUSAL_LIMITS`."""
        self.limit_refusals_total.labels(_check(limit, REFUSAL_LIMITS)).inc()

    # --- exposition ---------------------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in the Prometheus text format (content type `CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)

    def start_http(self, listen: str) -> tuple[str, int]:
        """Serve /metrics on "host:port" from a daemon thread; returns the bound (host, port).

        Port 0 picks a free port, reported in the result. Call `close()` to stop serving.
        """
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        host, port = parse_listen(listen)
        server, _thread = start_http_server(port, host, registry=self.registry)
        self._http = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    @property
    def http_server(self) -> WSGIServer | None:
        return self._http

    def close(self) -> None:
        """Stop the HTTP server, if started. Idempotent."""
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _check(value: str, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise ValueError(f"label value {value!r} not in {sorted(allowed)}")
    return value
