"""Which adapter versions the engine holds: resolve → manifest → disk cache → validate → engine.

- Capacity is the engine's `max_cpu_loras`; beyond it the least recently used idle, unpinned
  version is removed (`remove_lora`). GPU slots (`max_loras`) are left to vLLM's scheduler.
- A version gets one `lora_int_id` for the life of the process (never reused); its `lora_name`
  carries the sha256. Versions are keyed by (tenant, name, sha256): two tenants may upload the
  same bytes, and revoking one must not touch the other. The disk cache, keyed by sha256 only,
  shares the bytes.
- Load before evict: the newcomer is fetched, verified and validated before anyone is evicted; a
  failed load never reaches the engine (DESIGN invariant 3).
- Single flight: one fetch and one engine load per cold version, however many requests wait;
  the load runs in its own task, so a waiter that cancels does not cancel it (invariant 4).
- Manifests are cached in memory and re-read with a conditional GET every `poll_interval_s`, so
  alias moves, shares and revocations made by other replicas apply within that bound, and warm
  adapters keep serving while the store is down.
- Pins are ours (never evicted by our LRU), not vLLM's: see engine/vllm_engine.py for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from adapter_store import (
    AdapterNotFound,
    AdapterRef,
    AdapterStore,
    AdapterVersion,
    BaseModelSpec,
    DiskCache,
    Limits,
    Manifest,
    StoreError,
)
from adapter_store.validate import validate_adapter
from lora_gateway import errors
from lora_gateway.engine.base import Engine, LoadedAdapter, next_lora_id
from lora_gateway.metrics import LoadPhase, Metrics, Tier

log = logging.getLogger(__name__)

#: Names remembered as missing (bounded: made-up names cannot grow memory without limit).
ABSENT_MAX = 10_000
#: How long a load waits for an engine slot to free up when every resident adapter is busy.
SLOT_WAIT_S = 30.0
#: Threads for manifest reads. Their own pool: a slow or dead store (and requests naming many
#: distinct adapters) then queues here instead of filling asyncio's default executor, which the
#: warm path needs (disk checks, validation).
STORE_THREADS = 4

T = TypeVar("T")


VersionKey = tuple[str, str, str]


def key_of(version: AdapterVersion) -> VersionKey:
    return (version.tenant, version.name, version.sha)


@dataclass
class Resident:
    version: AdapterVersion
    loaded: LoadedAdapter
    active: int = 0
    pinned: bool = False


@dataclass
class ResidencyStats:
    """Counters for tests, benchmarks and metrics."""

    engine_hits: int = 0
    engine_misses: int = 0
    disk_hits: int = 0
    disk_misses: int = 0
    engine_loads: int = 0
    evictions: int = 0
    revoked_unloads: int = 0
    manifest_fetches: int = 0
    load_seconds: dict[str, list[float]] = field(default_factory=dict)

    def observe(self, phase: str, seconds: float) -> None:
        self.load_seconds.setdefault(phase, []).append(seconds)


@dataclass(frozen=True)
class ResidencyEntry:
    version: AdapterVersion
    tier: str  # "engine" | "disk" | "store"
    pinned: bool
    lora_int_id: int


class Residency:
    def __init__(
        self,
        engine: Engine,
        store: AdapterStore,
        cache: DiskCache,
        spec: BaseModelSpec,
        limits: Limits,
        *,
        poll_interval_s: float = 2.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.cache = cache
        self.spec = spec
        self.limits = limits
        self.capacity = engine.max_cpu_loras
        self.poll_interval_s = poll_interval_s
        self.stats = ResidencyStats()
        self.metrics = metrics
        self._resident: OrderedDict[VersionKey, Resident] = OrderedDict()  # LRU first
        self._loading: dict[VersionKey, asyncio.Task[None]] = {}
        self._ids: dict[VersionKey, int] = {}
        self._blocked: set[VersionKey] = set()
        self._manifests: dict[tuple[str, str], Manifest] = {}
        #: (tenant, name) → when the store last said it does not exist.
        self._absent: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._manifest_fetches: dict[tuple[str, str], asyncio.Task[Manifest]] = {}
        #: tenant → (when read, its share index): see `shares_of`.
        self._shares: dict[str, tuple[float, frozenset[tuple[str, str]]]] = {}
        self._share_fetches: dict[str, asyncio.Task[frozenset[tuple[str, str]]]] = {}
        self._share_generation: dict[str, int] = {}
        self._engine_lock = asyncio.Lock()
        self._freed = asyncio.Condition()
        #: Called after a version was added to the engine (the runtime canary's hook).
        self.on_loaded: Callable[[AdapterVersion, LoadedAdapter], None] | None = None
        self._store_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="residency-store")

    async def _read_store(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking store read in the residency's own bounded pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_pool, functools.partial(fn, *args))

    # --- accounting (stats for tests and benchmarks, metrics for Prometheus) -----------------
    def _tier(self, tier: Tier, hit: bool) -> None:
        if tier == "engine":
            if hit:
                self.stats.engine_hits += 1
            else:
                self.stats.engine_misses += 1
        elif hit:
            self.stats.disk_hits += 1
        else:
            self.stats.disk_misses += 1
        if self.metrics is not None:
            (self.metrics.cache_hit if hit else self.metrics.cache_miss)(tier)

    def _phase(self, phase: LoadPhase, seconds: float) -> None:
        self.stats.observe(phase, seconds)
        if self.metrics is not None:
            self.metrics.load_phase(phase, seconds)

    def _resident_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.set_resident("engine", len(self._resident))
            self.metrics.set_resident("disk", len(self.cache.entries()))

    # --- resolution -------------------------------------------------------------------------
    async def manifest(self, tenant: str, name: str) -> Manifest:
        """The cached manifest, fetched once (single flight) when absent.

        Misses are cached too, for one poll interval: a name that does not exist is then
        answered as fast as one that exists but is not the caller's (no timing oracle on
        another tenant's adapters, DESIGN invariant 6), and a flood of made-up names costs the
        store one read per name per interval. An upload on this replica clears the entry; one
        on another replica shows within the interval, like every other change.
        """
        key = (tenant, name)
        cached = self._manifests.get(key)
        if cached is not None:
            return cached
        missed = self._absent.get(key)
        if missed is not None and time.monotonic() - missed < self.poll_interval_s:
            raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        task = self._manifest_fetches.get(key)
        if task is None:
            self.stats.manifest_fetches += 1
            task = asyncio.create_task(self._read_store(self.store.get_manifest, tenant, name))
            self._manifest_fetches[key] = task
            task.add_done_callback(lambda _: self._manifest_fetches.pop(key, None))
        try:
            manifest = await asyncio.shield(task)
        except AdapterNotFound:
            self._absent[key] = time.monotonic()
            self._absent.move_to_end(key)
            while len(self._absent) > ABSENT_MAX:
                self._absent.popitem(last=False)
            raise
        self._absent.pop(key, None)
        self._manifests[key] = manifest
        return manifest

    def remember(self, manifest: Manifest) -> None:
        """Replace the cached manifest after a write made on this replica."""
        self._manifests[(manifest.tenant, manifest.name)] = manifest

    def forget(self, tenant: str, name: str) -> None:
        self._manifests.pop((tenant, name), None)
        self._absent.pop((tenant, name), None)

    async def resolve(
        self, caller: str, ref: AdapterRef, *, any_owner: bool = False
    ) -> AdapterVersion:
        """The version `ref` names for tenant `caller`; NotFound, with one text, otherwise.

        A tenant sees its own adapters and those shared with it (`any_owner`: operators), by
        the one sharing rule (`Manifest.usable_by`, i.e. `adapter_store.model.can_use`).
        "Not yours" is decided before anything that depends on whether the name exists: for
        another owner's name, visibility comes from the caller's own share index
        (`shares_of`), and the owner's manifest is read (and cached) only once the index
        names it. A name of another tenant that is not shared with the caller and a name that
        does not exist take the same path: same code, text and time (DESIGN invariant 6).
        """
        owner = ref.owner or caller
        try:
            foreign = owner != caller and not any_owner
            if foreign and (owner, ref.name) not in await self.shares_of(caller):
                raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)
            manifest = await self.manifest(owner, ref.name)
            if not manifest.usable_by(caller, operator=any_owner):
                raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)
            version = manifest.resolve(ref)
        except AdapterNotFound:
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT) from None
        if key_of(version) in self._blocked:
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        return version

    async def shares_of(self, tenant: str) -> frozenset[tuple[str, str]]:
        """(owner, name) in `tenant`'s share index: hints, confirmed by the manifest later.

        Cached per tenant for one poll interval, whatever it holds (a tenant with no grants is
        cached like one with many), and read by one task at a time however many requests ask.
        Past the interval the cached index still answers while a fresh read runs in the
        background (a stale marker is harmless: the manifest confirms every grant; a new share
        shows once the read lands). When the store fails, the last index keeps answering and a
        read is tried again one interval later; with no index read yet, requests wait for the
        read and get the store's error, the same for every name. Only authenticated tenants
        have entries: bounded by the tenants file. A share or unshare on this replica drops the
        grantee's entry (`forget_shares`).
        """
        cached = self._shares.get(tenant)
        if cached is not None and time.monotonic() - cached[0] < self.poll_interval_s:
            return cached[1]
        task = self._share_fetches.get(tenant)
        if task is None:
            task = asyncio.create_task(self._read_shares(tenant))
            self._share_fetches[tenant] = task
            task.add_done_callback(functools.partial(self._share_read_done, tenant))
        if cached is not None:
            return cached[1]
        return await asyncio.shield(task)

    async def _read_shares(self, tenant: str) -> frozenset[tuple[str, str]]:
        generation = self._share_generation.get(tenant, 0)
        try:
            hints = await self._read_store(self.store.share_hints, tenant)
        except StoreError:
            cached = self._shares.get(tenant)
            if cached is None:
                raise
            log.warning("share index of %s not refreshed: the store failed", tenant)
            self._shares[tenant] = (time.monotonic(), cached[1])
            return cached[1]
        if self._share_generation.get(tenant, 0) == generation:  # not forgotten meanwhile
            self._shares[tenant] = (time.monotonic(), hints)
        return hints

    def _share_read_done(self, tenant: str, task: asyncio.Task[frozenset[tuple[str, str]]]) -> None:
        if self._share_fetches.get(tenant) is task:
            del self._share_fetches[tenant]
        if not task.cancelled() and task.exception() is not None and tenant in self._shares:
            log.warning(
                "share index of %s not refreshed: %s", tenant, type(task.exception()).__name__
            )

    def forget_shares(self, tenant: str) -> None:
        """Drop the cached share index of `tenant` (after a share or unshare made here); a read
        already under way is not used: the next request reads the index afresh."""
        self._shares.pop(tenant, None)
        self._share_fetches.pop(tenant, None)
        self._share_generation[tenant] = self._share_generation.get(tenant, 0) + 1

    # --- use --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, version: AdapterVersion) -> AsyncIterator[LoadedAdapter]:
        """Hold `version` loaded in the engine for the duration of a request."""
        resident = await self._acquire(version)
        try:
            yield resident.loaded
        finally:
            resident.active -= 1
            if resident.active == 0:
                async with self._freed:
                    self._freed.notify_all()

    async def _acquire(self, version: AdapterVersion) -> Resident:
        key = key_of(version)
        for _ in range(5):
            if key in self._blocked:
                raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
            resident = self._resident.get(key)
            if resident is not None:
                resident.active += 1
                self._resident.move_to_end(key)
                self._tier("engine", hit=True)
                return resident
            task = self._loading.get(key)
            if task is None:
                self._tier("engine", hit=False)
                task = asyncio.create_task(self._load(version))
                self._loading[key] = task
                task.add_done_callback(lambda _: self._loading.pop(key, None))
            await asyncio.shield(task)
        raise errors.ResourceExhausted("adapter was evicted repeatedly; the engine is overloaded")

    def lora_id(self, key: VersionKey) -> int:
        """The version's engine id: assigned once, never reused in this process."""
        if key not in self._ids:
            self._ids[key] = next_lora_id()
        return self._ids[key]

    async def _load(self, version: AdapterVersion) -> None:
        key, sha = key_of(version), version.sha
        was_on_disk = self.cache.contains(sha)
        started = time.perf_counter()
        path = await self.cache.ensure(version)
        fetched = time.perf_counter()
        self._tier("disk", hit=was_on_disk)
        self._phase("fetch", fetched - started)  # the cache verifies sha256 as part of it
        self.cache.pin(sha)
        try:
            files = {name: path / name for name in (f.filename for f in version.files)}
            await asyncio.to_thread(validate_adapter, files, self.spec, self.limits)
            validated = time.perf_counter()
            self._phase("validate", validated - fetched)
            loaded = LoadedAdapter(
                lora_int_id=self.lora_id(key),
                lora_name=f"{version.tenant}/{version.name}@sha256:{sha}",
                path=path,
            )
            async with self._engine_lock:
                if key in self._blocked:
                    raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
                await self._make_room()
                await self.engine.add_adapter(loaded)
                self._resident[key] = Resident(version, loaded)
                if self.on_loaded is not None:
                    self.on_loaded(version, loaded)
            self.stats.engine_loads += 1
            self._phase("engine_add", time.perf_counter() - validated)
            self._resident_changed()
        finally:
            self.cache.unpin(sha)

    async def _make_room(self) -> None:
        """Evict the least recently used idle, unpinned version until one slot is free."""
        deadline = time.monotonic() + SLOT_WAIT_S
        while len(self._resident) >= self.capacity:
            victim = next(
                (s for s, r in self._resident.items() if r.active == 0 and not r.pinned), None
            )
            if victim is not None:
                resident = self._resident.pop(victim)
                await self.engine.remove_adapter(resident.loaded.lora_int_id)
                self.stats.evictions += 1
                if self.metrics is not None:
                    self.metrics.evicted("engine")
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.ResourceExhausted(
                    f"all {self.capacity} engine adapter slots are busy; try again"
                )
            async with self._freed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), remaining)

    # --- operator actions -------------------------------------------------------------------
    async def prefetch(self, version: AdapterVersion) -> ResidencyEntry:
        async with self.use(version):
            pass
        return self.entry(version)

    async def pin(self, version: AdapterVersion) -> ResidencyEntry:
        pinned = sum(1 for r in self._resident.values() if r.pinned)
        resident = self._resident.get(key_of(version))
        if (resident is None or not resident.pinned) and pinned >= self.capacity - 1:
            raise errors.ResourceExhausted(
                f"at most {self.capacity - 1} adapters can be pinned (one slot stays free)"
            )
        async with self.use(version):
            resident = self._resident[key_of(version)]
            if not resident.pinned:
                resident.pinned = True
                self.cache.pin(version.sha)
        return self.entry(version)

    async def unpin(self, version: AdapterVersion) -> ResidencyEntry:
        resident = self._resident.get(key_of(version))
        if resident is not None and resident.pinned:
            resident.pinned = False
            self.cache.unpin(version.sha)
        return self.entry(version)

    def entry(self, version: AdapterVersion) -> ResidencyEntry:
        resident = self._resident.get(key_of(version))
        if resident is not None:
            return ResidencyEntry(version, "engine", resident.pinned, resident.loaded.lora_int_id)
        tier = "disk" if self.cache.contains(version.sha) else "store"
        return ResidencyEntry(version, tier, False, 0)

    def resident_versions(self) -> list[AdapterVersion]:
        return [r.version for r in self._resident.values()]

    # --- revocation -------------------------------------------------------------------------
    def block(self, keys: Iterable[VersionKey]) -> None:
        """From now on, requests for these versions are answered NOT_FOUND on this replica."""
        self._blocked.update(keys)

    def is_resident(self, key: VersionKey) -> bool:
        return key in self._resident

    def is_blocked(self, key: VersionKey) -> bool:
        return key in self._blocked

    async def unload(self, keys: Iterable[VersionKey]) -> int:
        """Abort in-flight requests, remove from the engine, delete from the disk cache.

        The versions must be blocked first. Returns the number of requests aborted.
        """
        aborted = 0
        for key in keys:
            sha = key[2]
            task = self._loading.get(key)
            if task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)
            async with self._engine_lock:
                resident = self._resident.pop(key, None)
                if resident is not None:
                    aborted += await self.engine.remove_adapter(resident.loaded.lora_int_id)
                    self.stats.revoked_unloads += 1
                    if resident.pinned:
                        self.cache.unpin(sha)
            await self.cache.remove(sha)
        if aborted:
            async with self._freed:
                self._freed.notify_all()
        return aborted

    async def forget_engine(self) -> list[AdapterVersion]:
        """The engine was restarted and holds nothing: forget every resident version (no
        `remove_lora`). Returns the versions that were pinned, to pin again."""
        async with self._engine_lock:
            pinned = [r.version for r in self._resident.values() if r.pinned]
            for version in pinned:
                self.cache.unpin(version.sha)
            self._resident.clear()
        self._resident_changed()
        return pinned

    async def close(self) -> None:
        """Unload every version this residency put in the engine (for a shared engine)."""
        try:
            async with self._engine_lock:
                while self._resident:
                    _, resident = self._resident.popitem()
                    await self.engine.remove_adapter(resident.loaded.lora_int_id)
        finally:
            self._store_pool.shutdown(wait=False, cancel_futures=True)

    async def apply_manifest(self, manifest: Manifest) -> int:
        """Take a newer manifest (from this replica or the poller); unload what it revoked."""
        self._manifests[(manifest.tenant, manifest.name)] = manifest
        gone = [
            key
            for key in self._resident
            if key[:2] == (manifest.tenant, manifest.name) and key[2] not in manifest.versions
        ]
        gone += [
            key
            for key in ((manifest.tenant, manifest.name, sha) for sha in manifest.revoked)
            if key not in self._blocked and key not in gone
        ]
        if not gone:
            return 0
        self.block(gone)
        return await self.unload(gone)

    async def poll_once(self) -> int:
        """Re-read every cached manifest (conditional GET); returns how many changed."""
        changed = 0
        for (tenant, name), cached in list(self._manifests.items()):
            try:
                if cached.etag is None:
                    newer: Manifest | None = await self._read_store(
                        self.store.get_manifest, tenant, name
                    )
                else:
                    newer = await self._read_store(
                        self.store.get_manifest_if_changed, tenant, name, cached.etag
                    )
            except AdapterNotFound:
                # The whole adapter is gone from the store: nothing of it may serve any more.
                self._manifests.pop((tenant, name), None)
                stale = [key for key in self._resident if key[:2] == (tenant, name)]
                self.block(stale)
                await self.unload(stale)
                changed += 1
                continue
            except StoreError as exc:
                self.poll_failures += 1
                log.warning("manifest poll failed for %s/%s: %s", tenant, name, type(exc).__name__)
                continue
            if newer is not None:
                changed += 1
                await self.apply_manifest(newer)
        return changed

    #: Manifests (or whole polls) that failed in the current poll; set by `poll_once`.
    poll_failures: int = 0
    #: time.monotonic() of the last poll that re-read every cached manifest (the start of
    #: `run_poller` before the first one): what the server's staleness check reads.
    last_complete_poll: float | None = None

    async def run_poller(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval_s` until `stop` is set. Nothing ends the loop but `stop`
        (or cancellation): any error is logged and counted (metric
        lora_gateway_manifest_poll_errors_total), and a poll without failures records
        `last_complete_poll` (lora_gateway_manifest_poll_last_complete_timestamp_seconds)."""
        self.last_complete_poll = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_interval_s)
            if stop.is_set():
                return
            self.poll_failures = 0
            try:
                await self.poll_once()
            except Exception:
                self.poll_failures += 1
                log.exception("manifest poll failed; polling continues")
            if self.poll_failures:
                if self.metrics is not None:
                    self.metrics.poll_failed(self.poll_failures)
                continue
            self.last_complete_poll = time.monotonic()
            if self.metrics is not None:
                self.metrics.poll_completed()
