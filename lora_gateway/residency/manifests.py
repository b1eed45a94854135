"""Manifests in memory: a bounded LRU read once per name (single flight), the share indexes, and
the poller that re-reads them so other replicas' changes apply here.

- Manifests are cached in memory (LRU, `manifest_cache_size`) and re-read with a conditional GET
  every `poll_interval_s`, so alias moves, shares and revocations made by other replicas apply
  within that bound, and warm adapters keep serving while the store is down. A manifest whose
  versions are in use, loading, resident or pinned is never evicted (its revocation must stay
  visible); any other is simply read again on its next use.
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
from collections import OrderedDict
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
        self.cached[name] = manifest
        self.cached.move_to_end(name)
        self._stale.discard(name)
        if fresh and manifest.status == "active":
            self.blocks.names.discard(name)
        revoked = set(manifest.revoked)
        gone = [
            key
            for key in self.holder.known()
            if key[:2] == name
            and key[2] in revoked
            and (key not in self.blocks.keys or self.holder.is_resident(key))
        ]
        self._trim()
        if gone:
            self.holder.block(gone)
        return gone

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
    """Re-reads every cached manifest each `poll_interval_s` (conditional GET) and hands what
    changed to `apply` (a newer manifest) or `revoke_name` (the adapter is gone)."""

    def __init__(
        self,
        manifests: ManifestCache,
        apply: Callable[[Manifest], Awaitable[int]],
        revoke_name: Callable[[str, str], Awaitable[int]],
        metrics: Metrics,
    ) -> None:
        self.manifests = manifests
        self.apply = apply
        self.revoke_name = revoke_name
        self.metrics = metrics
        #: Manifests (or whole polls) that failed in the current poll; set by `poll_once`.
        self.poll_failures = 0
        #: time.monotonic() of the last poll that re-read every cached manifest (the start of
        #: `run` before the first one): what the server's staleness check reads.
        self.last_complete_poll: float | None = None

    async def poll_once(self) -> int:
        """Re-read every cached manifest (conditional GET); returns how many changed."""
        changed = 0
        manifests, store = self.manifests, self.manifests.store
        for (tenant, name), cached in list(manifests.cached.items()):
            epoch = manifests.blocks.epoch((tenant, name))
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
                changed += 1
                continue
            except StoreError as exc:
                self.poll_failures += 1
                log.warning("manifest poll failed for %s/%s: %s", tenant, name, type(exc).__name__)
                continue
            if newer is not None and manifests.blocks.epoch((tenant, name)) == epoch:
                changed += 1
                await self.apply(newer)
        return changed

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval_s` until `stop` is set. Nothing ends the loop but `stop`
        (or cancellation): any error is logged and counted (metric
        lora_gateway_manifest_poll_errors_total), and a poll without failures records
        `last_complete_poll` (lora_gateway_manifest_poll_last_complete_timestamp_seconds)."""
        self.last_complete_poll = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.manifests.poll_interval_s)
            if stop.is_set():
                return
            self.poll_failures = 0
            try:
                await self.poll_once()
            except Exception:
                self.poll_failures += 1
                log.exception("manifest poll failed; polling continues")
            if self.poll_failures:
                self.metrics.poll_failed(self.poll_failures)
                continue
            self.last_complete_poll = time.monotonic()
            self.metrics.poll_completed()
