"""Manifests in memory: a bounded LRU read once per name (single flight), the share indexes, and
the poller that follows the store's change feed so other replicas' changes apply here.

- Manifests are cached in memory (LRU, `manifest_cache_size`). Every `poll_interval_s` the
  poller lists the change feed and re-reads (conditional GET) the cached manifests it names, so
  alias moves, shares and revocations made by other replicas apply within that bound at a
  constant cost per interval, and warm adapters keep serving while the store is down. A
  manifest whose versions are in use, loading, resident or pinned is never evicted (its
  revocation must stay visible); any other is simply read again on its next use.
- Misses are cached for one poll interval, bounded by `ABSENT_MAX` names.
- A manifest taken into the cache blocks the versions it lists as revoked that this replica
  holds; the owner of those versions (`Holder`, i.e. `Residency`) unloads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from adapter_store import AdapterNotFound, AdapterStore, Manifest, StoreError
from adapter_store.singleflight import SingleFlight
from lora_gateway import errors
from lora_gateway.metrics import Metrics
from lora_gateway.residency.keys import NameKey, VersionKey
from lora_gateway.residency.pins import Blocks

log = logging.getLogger(__name__)

#: Names remembered as missing (bounded: made-up names cannot grow memory without limit).
ABSENT_MAX = 10_000
#: Default of `Settings.manifest_cache_size`.
MANIFEST_CACHE_SIZE = 1024
#: Threads for manifest reads. Their own pool: a slow or dead store (and requests naming many
#: distinct adapters) then queues here instead of filling asyncio's default executor, which the
#: warm path needs (disk checks, validation).
STORE_THREADS = 4

T = TypeVar("T")

Shares = frozenset[tuple[str, str]]


class Holder(Protocol):
    """What the manifest cache needs of whoever holds the versions (`Residency`)."""

    def known(self) -> set[VersionKey]:
        """Every version key this replica holds in any way (in use, loading, resident, pinned)."""

    def is_resident(self, key: VersionKey) -> bool: ...

    def block(self, keys: list[VersionKey]) -> None:
        """Refuse these versions from now on."""

    def unload_soon(self, keys: list[VersionKey]) -> None:
        """Unload blocked versions in the background."""


class ManifestCache:
    """The manifests (and share indexes) of the adapters this replica serves."""

    def __init__(
        self,
        store: AdapterStore,
        blocks: Blocks,
        holder: Holder,
        metrics: Metrics,
        *,
        poll_interval_s: float = 2.0,
        size: int = MANIFEST_CACHE_SIZE,
    ) -> None:
        self.store = store
        self.blocks = blocks
        self.holder = holder
        self.metrics = metrics
        self.poll_interval_s = poll_interval_s
        self.size = size
        self.cached: OrderedDict[NameKey, Manifest] = OrderedDict()  # LRU first
        #: Cached manifests a write on this replica made stale: read again on next use.
        self._stale: set[NameKey] = set()
        #: (tenant, name) → when the store last said it does not exist.
        self._absent: OrderedDict[NameKey, float] = OrderedDict()
        #: Keyed by (name, epoch): a read begun before the name was blocked is not joined.
        self._fetches: SingleFlight[tuple[NameKey, int], Manifest] = SingleFlight()
        #: tenant → (when read, its share index): see `shares_of`.
        self._shares: dict[str, tuple[float, Shares]] = {}
        self._share_fetches: SingleFlight[str, Shares] = SingleFlight()
        self._share_generation: dict[str, int] = {}
        #: The poller's round-robin resync order over the cached names (`next_to_resync`).
        self.rotation: deque[NameKey] = deque()
        self._pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="residency-store")

    async def read_store(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking store read in the residency's own bounded pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- manifests ----------------------------------------------------------------------------
    async def manifest(self, tenant: str, name: str) -> Manifest:
        """The cached manifest, fetched once (single flight) when absent.

        Misses are cached too, for one poll interval: a name that does not exist is then
        answered as fast as one that exists but is not the caller's (no timing oracle on
        another tenant's adapters, DESIGN invariant 6), and a flood of made-up names costs the
        store one read per name per interval. An upload on this replica marks the entry stale;
        one on another replica shows within the interval, like every other change.
        """
        key = (tenant, name)
        cached = self.cached.get(key)
        if cached is not None and key not in self._stale:
            self.cached.move_to_end(key)
            return cached
        missed = self._absent.get(key)
        if missed is not None and time.monotonic() - missed < self.poll_interval_s:
            raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        for _ in range(3):
            epoch = self.blocks.epoch(key)
            if (key, epoch) not in self._fetches:
                self.metrics.manifest_read()
            try:
                manifest = await self._fetches.do(
                    (key, epoch),
                    functools.partial(self.read_store, self.store.get_manifest, tenant, name),
                )
            except AdapterNotFound:
                if self.blocks.epoch(key) != epoch:
                    continue
                self._absent[key] = time.monotonic()
                self._absent.move_to_end(key)
                while len(self._absent) > ABSENT_MAX:
                    self._absent.popitem(last=False)
                raise
            if self.blocks.epoch(key) != epoch:
                continue  # the adapter was revoked while we read: this copy may predate it
            self._absent.pop(key, None)
            gone = self.take(manifest, fresh=True)
            if gone:
                self.holder.unload_soon(gone)
            return manifest
        raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)

    def take(self, manifest: Manifest, *, fresh: bool) -> list[VersionKey]:
        """Cache `manifest` (most recently used) and block what it revoked that this replica
        knows. Returns the keys newly blocked, for the caller to unload.

        `fresh`: read from the store after the last block of its name. Only such a read lifts a
        whole-adapter block (the name was uploaded again); its revoked versions stay blocked.
        """
        name = (manifest.tenant, manifest.name)
        if name not in self.cached:
            self._rotate_in(name)
        self.cached[name] = manifest
        self.cached.move_to_end(name)
        self._stale.discard(name)
        if fresh and manifest.status == "active":
            self.blocks.names.discard(name)
        revoked = set(manifest.revoked)
        gone = [  # only when it revokes something: known() is every version held (O(n))
            key
            for key in (self.holder.known() if revoked else ())
            if key[:2] == name
            and key[2] in revoked
            and (key not in self.blocks.keys or self.holder.is_resident(key))
        ]
        self._trim()
        if gone:
            self.holder.block(gone)
        return gone

    def _rotate_in(self, name: NameKey) -> None:
        """Put a newly cached name at the end of the resync rotation. Names evicted since are
        skipped when their turn comes; the rotation is compacted when they are as many as the
        cached ones, so it stays within twice the cache."""
        self.rotation.append(name)
        if len(self.rotation) > 2 * len(self.cached) + 16:
            live = dict.fromkeys(key for key in self.rotation if key in self.cached)
            self.rotation = deque(live)
            self.rotation.append(name)

    def next_to_resync(self, count: int) -> list[NameKey]:
        """The next `count` cached names of the rotation (each cached name once per turn of
        it), moved to its end: O(count) however many are cached."""
        picked: list[NameKey] = []
        seen: set[NameKey] = set()
        for _ in range(len(self.rotation)):
            if len(picked) >= count:
                break
            name = self.rotation.popleft()
            if name not in self.cached or name in seen:
                continue  # evicted (or a second entry of a name cached again): dropped
            seen.add(name)
            self.rotation.append(name)
            picked.append(name)
        return picked

    def _trim(self) -> None:
        """Evict least recently used manifests beyond `size`, never one whose versions this
        replica holds in any way (it must stay polled)."""
        if len(self.cached) <= self.size:
            return
        protected = {key[:2] for key in self.holder.known()}
        for name in list(self.cached):
            if len(self.cached) <= self.size:
                break
            if name in protected:
                continue
            del self.cached[name]
            self._stale.discard(name)
            self.metrics.manifest_evicted()

    def unmiss(self, name: NameKey) -> None:
        """The store wrote `name`'s manifest: forget that it was missing (an upload on another
        replica is then found on its first request here, not one poll interval later)."""
        self._absent.pop(name, None)

    def drop(self, name: NameKey) -> None:
        """The whole adapter was revoked: its manifest is no longer cached (nor polled)."""
        self.cached.pop(name, None)
        self._stale.discard(name)

    def forget(self, tenant: str, name: str) -> None:
        """A write on this replica changed the adapter: read its manifest again on next use
        (it stays polled meanwhile)."""
        if (tenant, name) in self.cached:
            self._stale.add((tenant, name))
        self._absent.pop((tenant, name), None)

    # --- share indexes ------------------------------------------------------------------------
    async def shares_of(self, tenant: str) -> Shares:
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
        task = self._share_fetches.start(tenant, functools.partial(self._read_shares, tenant))
        if cached is not None:
            return cached[1]
        return await asyncio.shield(task)

    async def _read_shares(self, tenant: str) -> Shares:
        generation = self._share_generation.get(tenant, 0)
        try:
            hints = await self.read_store(self.store.share_hints, tenant)
        except StoreError:
            cached = self._shares.get(tenant)
            if cached is None:
                raise
            log.warning("share index of %s not refreshed: the store failed", tenant)
            self._shares[tenant] = (time.monotonic(), cached[1])
            return cached[1]
        except Exception as exc:
            if tenant in self._shares:
                log.warning("share index of %s not refreshed: %s", tenant, type(exc).__name__)
            raise
        if self._share_generation.get(tenant, 0) == generation:  # not forgotten meanwhile
            self._shares[tenant] = (time.monotonic(), hints)
        return hints

    def forget_shares(self, tenant: str) -> None:
        """Drop the cached share index of `tenant` (after a share or unshare made here); a read
        already under way is not used: the next request reads the index afresh."""
        self._shares.pop(tenant, None)
        self._share_fetches.forget(tenant)
        self._share_generation[tenant] = self._share_generation.get(tenant, 0) + 1


class ManifestPoller:
    """Applies other replicas' manifest writes here, every `poll_interval_s`, at a cost that
    does not grow with the number of manifests.

    Each poll:
    1. lists the change feed (adapter_store.changes) from its position: one listing names every
       adapter whose manifest was written since (one more per 1,000 events);
    2. re-reads (conditional GET) the cached manifests the new events name, and hands what
       changed to `apply` (a newer manifest) or `revoke_name` (the adapter is gone), before
       anything else;
    3. then re-reads `resync_per_poll` more cached manifests, round robin: the bounded resync that
       catches an event that was never written (a writer that failed between its manifest and
       its event). Every cached manifest is re-read once per ceil(cached / resync_per_poll)
       polls.
    So a poll costs 1 + (changed cached manifests) + `resync_per_poll` store requests, whether 10
    or 10,000 manifests are cached.

    The position: events are stamped with their writer's clock. A poll lists from its last
    complete listing's start minus `lookback_s`, so an event stamped up to `lookback_s` early
    (clock skew between replicas, a slow PUT) is still seen; events already handled are
    remembered by key for that window. A replica that could not list the feed resumes from its
    position when the store is back (a partition converges) unless that is more than
    `retention_s - lookback_s` ago: events so old may have been deleted, so it re-reads every
    cached manifest instead (a full resync). Every replica deletes events older than
    `retention_s` about once per `retention_s / 60`.
    """

    #: Re-reads of cached manifests in flight at once (the manifest pool has STORE_THREADS).
    CONCURRENCY = 8

    def __init__(
        self,
        manifests: ManifestCache,
        apply: Callable[[Manifest], Awaitable[int]],
        revoke_name: Callable[[str, str], Awaitable[int]],
        metrics: Metrics,
        *,
        resync_per_poll: int = 16,
        lookback_s: float = 30.0,
        retention_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manifests = manifests
        self.apply = apply
        self.revoke_name = revoke_name
        self.metrics = metrics
        self.resync_per_poll = resync_per_poll
        self.lookback_s = lookback_s
        self.retention_s = retention_s
        self._clock = clock
        #: Manifests (or whole polls) that failed in the current poll; set by `poll_once`.
        self.poll_failures = 0
        #: time.monotonic() of the last poll that read the feed to its end and re-read what it
        #: named (the start of `run` before the first one): what the server's staleness check
        #: reads.
        self.last_complete_poll: float | None = None
        #: Store requests the last poll made (listings and manifest reads).
        self.last_poll_requests = 0
        started = self._now_s()
        #: Wall-clock start (s) of the last poll that listed the feed to its end.
        self._listed_at = started
        #: Where the current listing goes on (a poll that stopped after MAX_PAGES pages).
        self._position = ""
        #: Event keys already handled → their stamp (µs): pruned past the look-back window.
        self._seen: dict[str, int] = {}
        self._expired_at = started
        self._resync_all = False

    #: Listings one poll makes at most (a backlog of more events carries on at the next poll).
    MAX_PAGES = 20

    def _now_s(self) -> float:
        return self._clock()

    async def poll_once(self) -> int:
        """One poll (see the class docstring); returns how many cached manifests changed."""
        self.last_poll_requests = 0
        started = self._now_s()
        if started - self._listed_at > self.retention_s - self.lookback_s:
            # Events this old may have expired: what happened meanwhile cannot be listed.
            self._resync_all = True
            self._listed_at = started
            self._position = ""
        named = await self._read_feed(started)
        if self._resync_all:
            rest = [key for key in self.manifests.cached if key not in named]
        else:
            rest = self._resync_slice(exclude=named)
        # What the feed names first, alone: the propagation bound is then two store round
        # trips (the listing, the re-read), not the listing plus the resync's batches.
        changed = await self._reread(named)
        changed += await self._reread(rest)
        if self._resync_all and not self.poll_failures:
            log.info("change feed: full resync of %d cached manifests done", len(named) + len(rest))
            self._resync_all = False
        if started - self._expired_at > self.retention_s / 60:
            self._expired_at = started
            await self._expire(started)
        return changed

    async def _read_feed(self, started: float) -> set[NameKey]:
        """The cached names the feed's new events name (names not cached are only un-missed:
        their next use reads them anyway)."""
        manifests = self.manifests
        since_us = int((self._listed_at - self.lookback_s) * 1_000_000)
        names: set[NameKey] = set()
        for _ in range(self.MAX_PAGES):
            self.last_poll_requests += 1
            try:
                page = await manifests.read_store(
                    functools.partial(manifests.store.changes, position=self._position), since_us
                )
            except StoreError as exc:
                self.poll_failures += 1
                log.warning("change feed not read: %s", type(exc).__name__)
                return names
            for change in page.changes:
                if change.key in self._seen:
                    continue
                self._seen[change.key] = change.stamp_us
                name = (change.tenant, change.name)
                manifests.unmiss(name)
                if name in manifests.cached:
                    names.add(name)
            if not page.more:
                self._position = ""
                self._listed_at = started
                floor_us = int((started - self.lookback_s) * 1_000_000)
                self._seen = {k: v for k, v in self._seen.items() if v >= floor_us}
                return names
            self._position = page.position
        self.poll_failures += 1  # a backlog: the next poll goes on from `_position`
        return names

    def _resync_slice(self, exclude: set[NameKey]) -> list[NameKey]:
        """The next `resync_per_poll` cached names, round robin (`ManifestCache.rotation`)."""
        if self.resync_per_poll <= 0:
            return []
        picked = self.manifests.next_to_resync(self.resync_per_poll)
        return [name for name in picked if name not in exclude]

    async def _reread(self, names: set[NameKey] | list[NameKey]) -> int:
        """Re-read `names` (conditional GET), at most CONCURRENCY at once; apply what changed."""
        gate = asyncio.Semaphore(self.CONCURRENCY)
        results = await asyncio.gather(*(self._reread_one(name, gate) for name in names))
        return sum(results)

    async def _reread_one(self, key: NameKey, gate: asyncio.Semaphore) -> int:
        manifests, store = self.manifests, self.manifests.store
        tenant, name = key
        cached = manifests.cached.get(key)
        if cached is None:
            return 0  # evicted meanwhile: its next use reads it afresh
        epoch = manifests.blocks.epoch(key)
        async with gate:
            self.last_poll_requests += 1
            try:
                if cached.etag is None:
                    newer: Manifest | None = await manifests.read_store(
                        store.get_manifest, tenant, name
                    )
                else:
                    newer = await manifests.read_store(
                        store.get_manifest_if_changed, tenant, name, cached.etag
                    )
            except AdapterNotFound:
                # The whole adapter is gone from the store: nothing of it may serve any more.
                await self.revoke_name(tenant, name)
                return 1
            except StoreError as exc:
                self.poll_failures += 1
                log.warning("manifest poll failed for %s/%s: %s", tenant, name, type(exc).__name__)
                return 0
        if newer is not None and manifests.blocks.epoch(key) == epoch:
            await self.apply(newer)
            return 1
        return 0

    async def _expire(self, started: float) -> None:
        store = self.manifests.store
        before_us = int((started - self.retention_s) * 1_000_000)
        try:
            deleted = await self.manifests.read_store(store.expire_changes, before_us)
        except StoreError as exc:
            log.warning("change feed: expired events not deleted: %s", type(exc).__name__)
            return
        if deleted:
            log.info("change feed: %d expired events deleted", deleted)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval_s` until `stop` is set. Nothing ends the loop but `stop`
        (or cancellation): any error is logged and counted (metric
        lora_gateway_manifest_poll_errors_total), and a poll without failures records
        `last_complete_poll` (lora_gateway_manifest_poll_last_complete_timestamp_seconds).
        The interval runs from one poll's start to the next one's, so a slow store does not
        stretch the propagation bound by a whole interval more."""
        self.last_complete_poll = time.monotonic()
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.manifests.poll_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            if stop.is_set():
                return
            next_at = max(loop.time(), next_at) + self.manifests.poll_interval_s
            self.poll_failures = 0
            began = time.perf_counter()
            try:
                await self.poll_once()
            except Exception:
                self.poll_failures += 1
                log.exception("manifest poll failed; polling continues")
            self.metrics.poll_requests(self.last_poll_requests, len(self.manifests.cached))
            self.metrics.poll_took(time.perf_counter() - began)
            if self.poll_failures:
                self.metrics.poll_failed(self.poll_failures)
                continue
            self.last_complete_poll = time.monotonic()
            self.metrics.poll_completed()
