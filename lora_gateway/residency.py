"""Which adapter versions the engine holds: resolve → manifest → disk cache → validate → engine.

- Capacity is the engine's `max_cpu_loras`; beyond it an idle, unpinned version is removed
  (`remove_lora`): the loading tenant's own least recently used one first, else the least
  recently used of all. GPU slots (`max_loras`) are left to vLLM's scheduler.
- A version gets one `lora_int_id` for the life of the process (never reused); its `lora_name`
  carries the sha256. Versions are keyed by (tenant, name, sha256): two tenants may upload the
  same bytes, and revoking one must not touch the other. The disk cache shares the bytes and
  counts who uses them (`DiskCache.release`), and residency is reported per key.
- Load before evict: the newcomer is fetched, verified and validated before anyone is evicted; a
  failed load never reaches the engine (DESIGN invariant 3).
- Single flight: one fetch and one engine load per cold version, however many requests wait;
  the load runs in its own task, so a waiter that cancels does not cancel it (invariant 4).
- Engine slots are shared fairly (invariant 11). A request *holds* its version from the moment
  it asks for it until it ends. A tenant's requests hold at most `TenantConfig.max_engine_slots`
  distinct unpinned versions at once (and never more than the unpinned capacity minus one), so
  one tenant can never hold every slot; the excess waits in its tenant's queue. A load waits for
  a free slot, or for an idle version to evict, in one queue served in arrival order. Both waits
  end after `slot_wait_s` with RESOURCE_EXHAUSTED, and neither holds anything revocation needs:
  there is no engine lock; slots are counted (`_occupied`) and reserved before any await.
- Pins are ours (never evicted by our LRU), not vLLM's: see engine/vllm_engine.py for why. A pin
  is reserved in the same step as the cap checks (at most capacity - 1 in all, and the owner
  tenant's `max_pins`), before the version is loaded, so concurrent pins cannot overshoot.
- Manifests are cached in memory (LRU, `manifest_cache_size`) and re-read with a conditional GET
  every `poll_interval_s`, so alias moves, shares and revocations made by other replicas apply
  within that bound, and warm adapters keep serving while the store is down. A manifest whose
  versions are in use, loading, resident or pinned is never evicted (its revocation must stay
  visible); any other is simply read again on its next use.
- Revocation blocks before it unloads: by version key, and for a whole adapter by (tenant, name)
  as well, so that loads in progress and versions this replica never saw are refused too. A load
  checks the blocks after each step and after the engine added it (then it takes it out again).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import Counter, OrderedDict
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
from lora_gateway.tenancy import TenantConfig

log = logging.getLogger(__name__)

#: Names remembered as missing (bounded: made-up names cannot grow memory without limit).
ABSENT_MAX = 10_000
#: Default of `Settings.engine_slot_wait_s`: how long a request waits for an engine slot (its
#: tenant's share, then a free or evictable slot) before RESOURCE_EXHAUSTED.
SLOT_WAIT_S = 30.0
#: Default of `Settings.manifest_cache_size`.
MANIFEST_CACHE_SIZE = 1024
#: Threads for manifest reads. Their own pool: a slow or dead store (and requests naming many
#: distinct adapters) then queues here instead of filling asyncio's default executor, which the
#: warm path needs (disk checks, validation).
STORE_THREADS = 4

T = TypeVar("T")


VersionKey = tuple[str, str, str]
NameKey = tuple[str, str]


def key_of(version: AdapterVersion) -> VersionKey:
    return (version.tenant, version.name, version.sha)


def owner_of(key: VersionKey) -> str:
    """The disk cache's owner label of a version key: who uses the bytes."""
    return f"{key[0]}/{key[1]}"


@dataclass
class Resident:
    version: AdapterVersion
    loaded: LoadedAdapter
    #: The tenant whose request used it last (loads evict their own tenant's idle ones first).
    last_tenant: str = ""


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
    manifest_evictions: int = 0
    #: Loads that queued for an engine slot; requests that queued for their tenant's share.
    slot_waits: int = 0
    tenant_slot_waits: int = 0
    load_seconds: dict[str, list[float]] = field(default_factory=dict)

    def observe(self, phase: str, seconds: float) -> None:
        self.load_seconds.setdefault(phase, []).append(seconds)


@dataclass(frozen=True)
class ResidencyEntry:
    version: AdapterVersion
    tier: str  # "engine" | "disk" | "store"
    pinned: bool
    lora_int_id: int


class FifoGate:
    """Waiters served in arrival order: only the first in line may take what `ready` reports.

    Whoever frees something calls `wake()` (the first waiter re-checks); `wake_all()` makes
    every waiter re-run its `check` (e.g. after a revocation). Single event loop, no locks.
    """

    def __init__(self) -> None:
        self._queue: OrderedDict[int, asyncio.Future[None]] = OrderedDict()
        self._tickets = itertools.count()

    def __len__(self) -> int:
        return len(self._queue)

    async def wait(
        self,
        ready: Callable[[], bool],
        check: Callable[[], None],
        deadline: float,
        bypass: Callable[[], bool] | None = None,
    ) -> bool:
        """True once `ready()` holds while this waiter is first in line (at once if nobody
        waits); False at `deadline` (loop time). `check()` raises to give up; `bypass()` true
        lets a waiter through whatever its place (it needs nothing new)."""
        check()
        if bypass is not None and bypass():
            return True
        if not self._queue and ready():
            return True
        loop = asyncio.get_running_loop()
        ticket = next(self._tickets)
        try:
            while True:
                future: asyncio.Future[None] = loop.create_future()
                self._queue[ticket] = future  # a ticket keeps its place when it waits again
                if (bypass is not None and bypass()) or (
                    next(iter(self._queue)) == ticket and ready()
                ):
                    return True
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                await asyncio.wait([future], timeout=remaining)
                check()
        finally:
            del self._queue[ticket]
            self.wake()

    def wake(self) -> None:
        for future in self._queue.values():
            if not future.done():
                future.set_result(None)
            return

    def wake_all(self) -> None:
        for future in self._queue.values():
            if not future.done():
                future.set_result(None)


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
        manifest_cache_size: int = MANIFEST_CACHE_SIZE,
        slot_wait_s: float = SLOT_WAIT_S,
    ) -> None:
        self.engine = engine
        self.store = store
        self.cache = cache
        self.spec = spec
        self.limits = limits
        self.capacity = engine.max_cpu_loras
        self.poll_interval_s = poll_interval_s
        self.manifest_cache_size = manifest_cache_size
        self.slot_wait_s = slot_wait_s
        self.stats = ResidencyStats()
        self.metrics = metrics
        self._resident: OrderedDict[VersionKey, Resident] = OrderedDict()  # LRU first
        self._loading: dict[VersionKey, asyncio.Task[None]] = {}
        #: Engine adds in progress (revocation lets one finish before it deletes the files).
        self._adding: dict[VersionKey, asyncio.Future[None]] = {}
        self._ids: dict[VersionKey, int] = {}
        # --- slots: who holds what (see the module docstring) ---
        #: Requests between `use()` entry and exit, per version (their manifest stays cached).
        self._wanted: Counter[VersionKey] = Counter()
        #: Requests holding each version (waiting for its load, or running on it), per tenant.
        self._holds: dict[VersionKey, Counter[str]] = {}
        #: Slots reserved by loads (or taken by revocation unloads) not yet counted in _resident.
        self._reserved_slots = 0
        self._pinned: set[VersionKey] = set()
        self._slot_gate = FifoGate()
        self._tenant_gates: dict[str, FifoGate] = {}
        # --- revocation ---
        self._blocked: set[VersionKey] = set()
        #: Blocked by the runtime canary: the reason, for FAILED_PRECONDITION.
        self._quarantined: dict[VersionKey, str] = {}
        #: Whole adapters revoked: every version is refused, known to this replica or not.
        self._blocked_names: set[NameKey] = set()
        #: Bumped when a name is blocked: a manifest read that began before is not trusted.
        self._epochs: dict[NameKey, int] = {}
        self._unloads: set[asyncio.Task[int]] = set()
        # --- manifests ---
        self._manifests: OrderedDict[NameKey, Manifest] = OrderedDict()  # LRU first
        #: Cached manifests a write on this replica made stale: read again on next use.
        self._stale: set[NameKey] = set()
        #: (tenant, name) → when the store last said it does not exist.
        self._absent: OrderedDict[NameKey, float] = OrderedDict()
        self._manifest_fetches: dict[NameKey, tuple[asyncio.Task[Manifest], int]] = {}
        #: tenant → (when read, its share index): see `shares_of`.
        self._shares: dict[str, tuple[float, frozenset[tuple[str, str]]]] = {}
        self._share_fetches: dict[str, asyncio.Task[frozenset[tuple[str, str]]]] = {}
        self._share_generation: dict[str, int] = {}
        #: Called after a version was added to the engine for the first time since the engine
        #: started (the runtime canary's hook): a reload after an eviction puts the same bytes
        #: back, which the canary has seen compute already, so a tenant churning through its
        #: adapters does not make every reload cost everyone a canary check.
        self.on_loaded: Callable[[AdapterVersion, LoadedAdapter], None] | None = None
        self._handed_to_canary: set[VersionKey] = set()
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

    # --- manifests --------------------------------------------------------------------------
    async def manifest(self, tenant: str, name: str) -> Manifest:
        """The cached manifest, fetched once (single flight) when absent.

        Misses are cached too, for one poll interval: a name that does not exist is then
        answered as fast as one that exists but is not the caller's (no timing oracle on
        another tenant's adapters, DESIGN invariant 6), and a flood of made-up names costs the
        store one read per name per interval. An upload on this replica marks the entry stale;
        one on another replica shows within the interval, like every other change.
        """
        key = (tenant, name)
        cached = self._manifests.get(key)
        if cached is not None and key not in self._stale:
            self._manifests.move_to_end(key)
            return cached
        missed = self._absent.get(key)
        if missed is not None and time.monotonic() - missed < self.poll_interval_s:
            raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        for _ in range(3):
            epoch = self._epochs.get(key, 0)
            fetch = self._manifest_fetches.get(key)
            if fetch is None or fetch[1] != epoch:
                self.stats.manifest_fetches += 1
                task = asyncio.create_task(self._read_store(self.store.get_manifest, tenant, name))
                fetch = (task, epoch)
                self._manifest_fetches[key] = fetch
                task.add_done_callback(functools.partial(self._fetched, key))
            try:
                manifest = await asyncio.shield(fetch[0])
            except AdapterNotFound:
                if self._epochs.get(key, 0) != epoch:
                    continue
                self._absent[key] = time.monotonic()
                self._absent.move_to_end(key)
                while len(self._absent) > ABSENT_MAX:
                    self._absent.popitem(last=False)
                raise
            if self._epochs.get(key, 0) != epoch:
                continue  # the adapter was revoked while we read: this copy may predate it
            self._absent.pop(key, None)
            gone = self._take(manifest, fresh=True)
            if gone:
                self._unload_soon(gone)
            return manifest
        raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)

    def _fetched(self, key: NameKey, task: asyncio.Task[Manifest]) -> None:
        current = self._manifest_fetches.get(key)
        if current is not None and current[0] is task:
            del self._manifest_fetches[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    def _take(self, manifest: Manifest, *, fresh: bool) -> list[VersionKey]:
        """Cache `manifest` (most recently used) and block what it revoked that this replica
        knows. Returns the keys newly blocked, for the caller to unload.

        `fresh`: read from the store after the last block of its name. Only such a read lifts a
        whole-adapter block (the name was uploaded again); its revoked versions stay blocked.
        """
        name = (manifest.tenant, manifest.name)
        self._manifests[name] = manifest
        self._manifests.move_to_end(name)
        self._stale.discard(name)
        if fresh and manifest.status == "active":
            self._blocked_names.discard(name)
        revoked = set(manifest.revoked)
        gone = [
            key
            for key in self._known(name)
            if key[2] in revoked and (key not in self._blocked or key in self._resident)
        ]
        self._trim_manifests()
        if gone:
            self.block(gone)
        return gone

    def _trim_manifests(self) -> None:
        """Evict least recently used manifests beyond `manifest_cache_size`, never one whose
        versions this replica holds in any way (it must stay polled)."""
        if len(self._manifests) <= self.manifest_cache_size:
            return
        protected = {key[:2] for key in self._all_known()}
        for name in list(self._manifests):
            if len(self._manifests) <= self.manifest_cache_size:
                break
            if name in protected:
                continue
            del self._manifests[name]
            self._stale.discard(name)
            self.stats.manifest_evictions += 1

    def remember(self, manifest: Manifest) -> None:
        """Replace the cached manifest after a write made on this replica."""
        gone = self._take(manifest, fresh=False)
        if gone:
            self._unload_soon(gone)

    def forget(self, tenant: str, name: str) -> None:
        """A write on this replica changed the adapter: read its manifest again on next use
        (it stays polled meanwhile)."""
        if (tenant, name) in self._manifests:
            self._stale.add((tenant, name))
        self._absent.pop((tenant, name), None)

    def cached_manifests(self) -> int:
        """How many manifests are cached (and polled)."""
        return len(self._manifests)

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
        if self.is_blocked(key_of(version)):
            reason = self._quarantined.get(key_of(version))
            if reason is not None:  # blocked by the canary, before its manifest says so
                raise errors.FailedPrecondition(
                    f"adapter version {version.version_id} of {version.name!r} is quarantined: "
                    f"{reason}; it is not served"
                )
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
    async def use(
        self, version: AdapterVersion, tenant: TenantConfig | None = None
    ) -> AsyncIterator[LoadedAdapter]:
        """Hold `version` loaded in the engine for the duration of a request of `tenant` (whose
        `max_engine_slots` applies; None: no per-tenant cap, e.g. operators' warm set)."""
        key = key_of(version)
        holder = tenant.name if tenant is not None else ""
        self._wanted[key] += 1
        try:
            await self._hold(key, holder, tenant)
            try:
                resident = await self._acquire(version, holder)
                yield resident.loaded
            finally:
                self._unhold(key, holder)
        finally:
            self._wanted[key] -= 1
            if self._wanted[key] <= 0:
                del self._wanted[key]

    # --- slots ------------------------------------------------------------------------------
    def _check(self, key: VersionKey) -> None:
        if self.is_blocked(key):
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)

    def _holding(self, key: VersionKey, holder: str) -> bool:
        holds = self._holds.get(key)
        return holds is not None and holds[holder] > 0

    def tenant_slots(self, tenant: str) -> int:
        """Distinct unpinned versions the tenant's requests hold (waiting or running)."""
        return sum(
            1 for key, holds in self._holds.items() if holds[tenant] > 0 and key not in self._pinned
        )

    def slot_limit(self, tenant: TenantConfig) -> int:
        """The tenant's cap: its `max_engine_slots`, and never all the unpinned slots."""
        return min(tenant.max_engine_slots, max(1, self.capacity - len(self._pinned) - 1))

    async def _hold(self, key: VersionKey, holder: str, tenant: TenantConfig | None) -> None:
        self._check(key)

        def free_of_charge() -> bool:  # already held by this tenant, or pinned: no new slot
            return self._holding(key, holder) or key in self._pinned

        if tenant is not None and not free_of_charge():
            if self.tenant_slots(holder) >= self.slot_limit(tenant):
                self.stats.tenant_slot_waits += 1
            gate = self._tenant_gates.setdefault(holder, FifoGate())
            loop = asyncio.get_running_loop()
            try:
                ok = await gate.wait(
                    ready=lambda: self.tenant_slots(holder) < self.slot_limit(tenant),
                    check=lambda: self._check(key),
                    deadline=loop.time() + self.slot_wait_s,
                    bypass=free_of_charge,
                )
            finally:
                if not gate and self._tenant_gates.get(holder) is gate:
                    del self._tenant_gates[holder]
            if not ok:
                raise errors.ResourceExhausted(
                    f"tenant {holder} holds {self.tenant_slots(holder)} engine adapter slots "
                    f"(limit {self.slot_limit(tenant)}) and none freed within "
                    f"{self.slot_wait_s:g}s; try again"
                )
        self._holds.setdefault(key, Counter())[holder] += 1

    def _unhold(self, key: VersionKey, holder: str) -> None:
        holds = self._holds.get(key)
        if holds is None:
            return
        holds[holder] -= 1
        if holds[holder] <= 0:
            del holds[holder]
        if not holds:
            del self._holds[key]
        self._changed()

    def _changed(self) -> None:
        """Something may have freed: the first waiter of each queue re-checks."""
        self._slot_gate.wake()
        for gate in self._tenant_gates.values():
            gate.wake()

    def _occupied(self) -> int:
        return len(self._resident) + self._reserved_slots

    def _victim(self, tenant: str) -> VersionKey | None:
        """An idle, unpinned resident version to evict for a load of `tenant`: its own least
        recently used one first, else the least recently used of all."""
        first = None
        for key, resident in self._resident.items():
            if key in self._holds or key in self._pinned:
                continue
            if resident.last_tenant == tenant:
                return key
            if first is None:
                first = key
        return first

    async def _reserve_slot(self, key: VersionKey, tenant: str) -> None:
        """Take an engine slot for `key`'s load: a free one, or one freed by evicting an idle
        version. Waits in arrival order, holding nothing; a revocation ends the wait."""
        loop = asyncio.get_running_loop()

        def ready() -> bool:
            return self._occupied() < self.capacity or self._victim(tenant) is not None

        if len(self._slot_gate) or not ready():
            self.stats.slot_waits += 1
        ok = await self._slot_gate.wait(
            ready, lambda: self._check(key), loop.time() + self.slot_wait_s
        )
        if not ok:
            raise errors.ResourceExhausted(
                f"all {self.capacity} engine adapter slots are busy; try again"
            )
        self._reserved_slots += 1  # counted before any await: nobody else can take it
        if self._occupied() <= self.capacity:
            return
        victim = self._victim(tenant)
        assert victim is not None  # ready() said so, and nothing ran since
        resident = self._resident.pop(victim)
        try:
            await self.engine.remove_adapter(resident.loaded.lora_int_id)
        except BaseException:
            self._reserved_slots -= 1
            self._changed()
            raise
        self.stats.evictions += 1
        if self.metrics is not None:
            self.metrics.evicted("engine")

    async def _acquire(self, version: AdapterVersion, holder: str) -> Resident:
        key = key_of(version)
        for _ in range(3):
            self._check(key)
            resident = self._resident.get(key)
            if resident is not None:
                resident.last_tenant = holder
                self._resident.move_to_end(key)
                self._tier("engine", hit=True)
                return resident
            task = self._loading.get(key)
            if task is None:
                self._tier("engine", hit=False)
                task = asyncio.create_task(self._load(version, holder))
                self._loading[key] = task
                task.add_done_callback(functools.partial(self._loaded, key))
            await asyncio.shield(task)
        raise errors.ResourceExhausted("adapter was evicted repeatedly; the engine is overloaded")

    def _loaded(self, key: VersionKey, task: asyncio.Task[None]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    def lora_id(self, key: VersionKey) -> int:
        """The version's engine id: assigned once, never reused in this process."""
        if key not in self._ids:
            self._ids[key] = next_lora_id()
        return self._ids[key]

    async def _load(self, version: AdapterVersion, tenant: str) -> None:
        key = key_of(version)
        try:
            await self._load_steps(version, tenant)
        except errors.NotFound:
            raise
        except Exception:
            if self.is_blocked(key):  # revoked meanwhile (its files may be gone): not found
                raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT) from None
            raise

    async def _load_steps(self, version: AdapterVersion, tenant: str) -> None:
        key, sha = key_of(version), version.sha
        if key[:2] not in self._manifests:
            # Its manifest must be cached (and so polled) while the version is in the engine.
            try:
                manifest = await self.manifest(version.tenant, version.name)
            except AdapterNotFound:
                raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT) from None
            if sha not in manifest.versions:
                raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        was_on_disk = self.cache.contains(sha)
        started = time.perf_counter()
        path = await self.cache.ensure(version, owner=owner_of(key))
        fetched = time.perf_counter()
        self._tier("disk", hit=was_on_disk)
        self._phase("fetch", fetched - started)  # the cache verifies sha256 as part of it
        self.cache.pin(sha)
        try:
            self._check(key)
            files = {name: path / name for name in (f.filename for f in version.files)}
            await asyncio.to_thread(validate_adapter, files, self.spec, self.limits)
            validated = time.perf_counter()
            self._phase("validate", validated - fetched)
            loaded = LoadedAdapter(
                lora_int_id=self.lora_id(key),
                lora_name=f"{version.tenant}/{version.name}@sha256:{sha}",
                path=path,
            )
            await self._reserve_slot(key, tenant)
            try:
                self._check(key)
                await self._add(key, loaded)
                if self.is_blocked(key):
                    # Revoked while the engine loaded it: take it out again, never serve it.
                    await self.engine.remove_adapter(loaded.lora_int_id)
                    raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
                self._resident[key] = Resident(version, loaded, tenant)
                if self.on_loaded is not None and key not in self._handed_to_canary:
                    self._handed_to_canary.add(key)
                    self.on_loaded(version, loaded)
            finally:
                self._reserved_slots -= 1
                self._changed()
            self.stats.engine_loads += 1
            self._phase("engine_add", time.perf_counter() - validated)
            self._resident_changed()
        finally:
            self.cache.unpin(sha)

    async def _add(self, key: VersionKey, loaded: LoadedAdapter) -> None:
        """`engine.add_adapter`, with the add visible to revocation (which must not delete the
        files while the engine reads them)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._adding[key] = done
        try:
            await self.engine.add_adapter(loaded)
        finally:
            del self._adding[key]
            done.set_result(None)

    # --- operator actions -------------------------------------------------------------------
    async def prefetch(
        self, version: AdapterVersion, tenant: TenantConfig | None = None
    ) -> ResidencyEntry:
        async with self.use(version, tenant):
            pass
        return self.entry(version)

    def pins(self, tenant: str | None = None) -> int:
        """Pinned versions (of one owner tenant, or all), including pins still loading."""
        return sum(1 for key in self._pinned if tenant is None or key[0] == tenant)

    async def pin(
        self, version: AdapterVersion, tenant: TenantConfig | None = None
    ) -> ResidencyEntry:
        """Keep `version` in the engine until unpinned. The pin is reserved (and both caps
        checked) before anything is awaited. `tenant`: the owner's config, whose `max_pins`
        applies (None: operators and the configured warm set)."""
        key = key_of(version)
        self._check(key)
        reserved = False
        if key not in self._pinned:
            if len(self._pinned) >= self.capacity - 1:
                raise errors.ResourceExhausted(
                    f"at most {self.capacity - 1} adapters can be pinned (one slot stays free)"
                )
            if tenant is not None and self.pins(version.tenant) >= tenant.max_pins:
                raise errors.ResourceExhausted(
                    f"tenant {tenant.name} may pin at most {tenant.max_pins} adapter version(s)"
                )
            self._pinned.add(key)
            self.cache.pin(version.sha)
            reserved = True
            self._changed()
        try:
            async with self.use(version, tenant):
                pass
        except BaseException:
            if reserved and key in self._pinned:
                self._pinned.discard(key)
                self.cache.unpin(version.sha)
                self._changed()
            raise
        return self.entry(version)

    async def unpin(self, version: AdapterVersion) -> ResidencyEntry:
        key = key_of(version)
        if key in self._pinned:
            self._pinned.discard(key)
            self.cache.unpin(version.sha)
            self._changed()
        return self.entry(version)

    def entry(self, version: AdapterVersion) -> ResidencyEntry:
        """Where this tenant's version is, on this replica. "disk" only if this key itself was
        fetched here: identical bytes cached for another tenant do not count."""
        key = key_of(version)
        pinned = key in self._pinned
        resident = self._resident.get(key)
        if resident is not None:
            return ResidencyEntry(version, "engine", pinned, resident.loaded.lora_int_id)
        tier = "disk" if self.cache.contains(version.sha, owner=owner_of(key)) else "store"
        return ResidencyEntry(version, tier, pinned, 0)

    def resident_versions(self) -> list[AdapterVersion]:
        return [r.version for r in self._resident.values()]

    # --- revocation -------------------------------------------------------------------------
    def block(self, keys: Iterable[VersionKey], *, quarantined: str | None = None) -> None:
        """From now on, requests for these versions are answered NOT_FOUND on this replica, or
        FAILED_PRECONDITION with the reason when the canary `quarantined` them (its manifest
        write may still be on its way)."""
        keys = list(keys)
        self._blocked.update(keys)
        if quarantined is not None:
            self._quarantined.update(dict.fromkeys(keys, quarantined))
        self._wake_all()

    def block_name(self, tenant: str, name: str) -> list[VersionKey]:
        """The whole adapter is revoked: refuse every version of it from now on, including
        loads in progress and versions this replica never saw. Returns the versions this
        replica holds in any way (blocked too), for the caller to unload."""
        key = (tenant, name)
        self._blocked_names.add(key)
        self._epochs[key] = self._epochs.get(key, 0) + 1
        self._manifests.pop(key, None)
        self._stale.discard(key)
        known = self._known(key)
        self.block(known)
        return known

    def _known(self, name: NameKey) -> list[VersionKey]:
        return [key for key in self._all_known() if key[:2] == name]

    def _all_known(self) -> set[VersionKey]:
        return {*self._resident, *self._loading, *self._pinned, *self._wanted}

    def _wake_all(self) -> None:
        self._slot_gate.wake_all()
        for gate in self._tenant_gates.values():
            gate.wake_all()

    def is_resident(self, key: VersionKey) -> bool:
        return key in self._resident

    def is_blocked(self, key: VersionKey) -> bool:
        return key in self._blocked or key[:2] in self._blocked_names

    async def unload(self, keys: Iterable[VersionKey]) -> int:
        """Abort in-flight requests, remove from the engine, release the disk cache entry.

        The versions must be blocked first. A load in progress is not waited for (it may wait
        for a slot): it sees the block at its next step and never serves. Only an engine add in
        progress is let finish before the files go. Returns the number of requests aborted.
        """
        keys = list(dict.fromkeys(keys))
        aborted = 0
        for key in keys:
            if key in self._pinned:
                self._pinned.discard(key)
                self.cache.unpin(key[2])
            resident = self._resident.pop(key, None)
            if resident is None:
                continue
            self._reserved_slots += 1  # the engine holds it until removed: keep it counted
            try:
                aborted += await self.engine.remove_adapter(resident.loaded.lora_int_id)
            finally:
                self._reserved_slots -= 1
                self._changed()
            self.stats.revoked_unloads += 1
        for key in keys:
            adding = self._adding.get(key)
            if adding is not None:
                await asyncio.shield(adding)
            await self.cache.release(key[2], owner_of(key))
        self._changed()
        self._resident_changed()
        return aborted

    def _unload_soon(self, keys: list[VersionKey]) -> None:
        """Unload blocked versions in the background (found by a read on a request's path)."""
        task = asyncio.create_task(self.unload(keys))
        self._unloads.add(task)
        task.add_done_callback(self._unloaded)

    def _unloaded(self, task: asyncio.Task[int]) -> None:
        self._unloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("unloading revoked versions failed", exc_info=task.exception())

    async def forget_engine(self) -> list[AdapterVersion]:
        """The engine was restarted and holds nothing: forget every resident version (no
        `remove_lora`). Returns the versions that were pinned, to pin again (their pins are
        released here, so that pinning them again counts them once)."""
        pinned = [r.version for key, r in self._resident.items() if key in self._pinned]
        for version in pinned:
            self._pinned.discard(key_of(version))
            self.cache.unpin(version.sha)
        self._resident.clear()
        self._handed_to_canary.clear()  # a new engine: every version is new to it
        self._changed()
        self._resident_changed()
        return pinned

    async def close(self) -> None:
        """Unload every version this residency put in the engine (for a shared engine)."""
        try:
            while self._resident:
                _, resident = self._resident.popitem()
                await self.engine.remove_adapter(resident.loaded.lora_int_id)
        finally:
            self._store_pool.shutdown(wait=False, cancel_futures=True)

    async def apply_manifest(self, manifest: Manifest) -> int:
        """Take a newer manifest (from this replica or the poller); unload what it revoked.

        Only the versions it lists as revoked go: one it does not list at all may be newer
        than this copy (uploaded since), never revoked.
        """
        gone = self._take(manifest, fresh=False)
        if not gone:
            return 0
        return await self.unload(gone)

    async def revoke_name(self, tenant: str, name: str) -> int:
        """The whole adapter is gone from the store: nothing of it may serve any more."""
        return await self.unload(self.block_name(tenant, name))

    async def poll_once(self) -> int:
        """Re-read every cached manifest (conditional GET); returns how many changed."""
        changed = 0
        for (tenant, name), cached in list(self._manifests.items()):
            epoch = self._epochs.get((tenant, name), 0)
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
                await self.revoke_name(tenant, name)
                changed += 1
                continue
            except StoreError as exc:
                self.poll_failures += 1
                log.warning("manifest poll failed for %s/%s: %s", tenant, name, type(exc).__name__)
                continue
            if newer is not None and self._epochs.get((tenant, name), 0) == epoch:
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
