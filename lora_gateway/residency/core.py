"""`Residency`: the one object the gateway asks where an adapter version is, and to hold it.

resolve → manifest (`manifests`) → hold a tenant's share of the slots (`slots`) → load once
(`loads`: disk cache → validate → engine) → serve; pins and revocation blocks in `pins`. A
version's own chat template (`chat_template`) comes from the disk cache with its files. This
module wires the parts together and carries the workflows that span them: a request's `use`,
pin / unpin / prefetch, and revocation (block → abort and unload → release the disk entry).
Every count is a Prometheus metric (`lora_gateway.metrics`); pass the server's `Metrics`, or
the residency keeps a registry of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from adapter_store import (
    AdapterNotFound,
    AdapterRef,
    AdapterStore,
    AdapterVersion,
    BaseModelSpec,
    DiskCache,
    Limits,
    Manifest,
)
from adapter_store.validate import check_chat_template
from lora_gateway import errors
from lora_gateway.engine.base import Engine, LoadedAdapter
from lora_gateway.metrics import Metrics
from lora_gateway.residency.keys import NameKey, ResidencyEntry, VersionKey, key_of, owner_of
from lora_gateway.residency.loads import Loads
from lora_gateway.residency.manifests import MANIFEST_CACHE_SIZE, ManifestCache, ManifestPoller
from lora_gateway.residency.pins import Blocks, Pins
from lora_gateway.residency.slots import SLOT_WAIT_S, Slots
from lora_gateway.tenancy import TenantConfig

log = logging.getLogger(__name__)

#: Adapter versions whose chat template text is kept in memory (each at most
#: `chat_template_max_bytes`).
TEMPLATE_CACHE_SIZE = 64


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
        host_budget_bytes: int = 0,
        resync_per_poll: int = 16,
        feed_lookback_s: float = 30.0,
        feed_retention_s: float = 3600.0,
    ) -> None:
        self.engine = engine
        self.store = store
        self.cache = cache
        self.spec = spec
        self.limits = limits
        self.capacity = engine.max_cpu_loras
        self.metrics = metrics if metrics is not None else Metrics(process_metrics=False)
        self.blocks = Blocks()
        self.pinned = Pins(cache, self.capacity)
        self.slots = Slots(
            engine,
            cache,
            self.pinned,
            self.blocks,
            self.metrics,
            slot_wait_s=slot_wait_s,
            host_budget_bytes=host_budget_bytes,
            smallest_adapter_bytes=spec.smallest_full_adapter_bytes(),
        )
        self.manifests = ManifestCache(
            store,
            self.blocks,
            self,
            self.metrics,
            poll_interval_s=poll_interval_s,
            size=manifest_cache_size,
        )
        self.loads = Loads(
            engine,
            cache,
            spec,
            limits,
            self.slots,
            self.blocks,
            self.metrics,
            has_manifest=self.manifests.cached.__contains__,
            manifest=self.manifests.manifest,
        )
        self.poller = ManifestPoller(
            self.manifests,
            self.apply_manifest,
            self.revoke_name,
            self.metrics,
            resync_per_poll=resync_per_poll,
            lookback_s=feed_lookback_s,
            retention_s=feed_retention_s,
        )
        self._unloads: set[asyncio.Task[int]] = set()
        #: Chat template texts by version (read from the disk cache, verified).
        self._templates: OrderedDict[VersionKey, str] = OrderedDict()

    # --- settings the tests and the server adjust --------------------------------------------
    @property
    def slot_wait_s(self) -> float:
        return self.slots.slot_wait_s

    @slot_wait_s.setter
    def slot_wait_s(self, value: float) -> None:
        self.slots.slot_wait_s = value

    @property
    def poll_interval_s(self) -> float:
        return self.manifests.poll_interval_s

    @property
    def manifest_cache_size(self) -> int:
        return self.manifests.size

    @manifest_cache_size.setter
    def manifest_cache_size(self, value: int) -> None:
        self.manifests.size = value

    @property
    def on_loaded(self) -> Callable[[AdapterVersion, LoadedAdapter], None] | None:
        """The runtime canary's hook: see `Loads.on_loaded`."""
        return self.loads.on_loaded

    @on_loaded.setter
    def on_loaded(self, hook: Callable[[AdapterVersion, LoadedAdapter], None] | None) -> None:
        self.loads.on_loaded = hook

    @property
    def last_complete_poll(self) -> float | None:
        """time.monotonic() of the last poll that read the change feed to its end."""
        return self.poller.last_complete_poll

    # --- manifests and shares -----------------------------------------------------------------
    async def manifest(self, tenant: str, name: str) -> Manifest:
        return await self.manifests.manifest(tenant, name)

    def remember(self, manifest: Manifest) -> None:
        """Replace the cached manifest after a write made on this replica."""
        gone = self.manifests.take(manifest, fresh=False)
        if gone:
            self.unload_soon(gone)

    def forget(self, tenant: str, name: str) -> None:
        """A write on this replica changed the adapter: read its manifest again on next use."""
        self.manifests.forget(tenant, name)

    def cached_manifests(self) -> int:
        """How many manifests are cached (and polled)."""
        return len(self.manifests.cached)

    async def shares_of(self, tenant: str) -> frozenset[tuple[str, str]]:
        return await self.manifests.shares_of(tenant)

    def forget_shares(self, tenant: str) -> None:
        self.manifests.forget_shares(tenant)

    async def resolve(
        self,
        caller: str,
        ref: AdapterRef,
        *,
        any_owner: bool = False,
        routing_key: str | None = None,
    ) -> AdapterVersion:
        """The version `ref` names for tenant `caller`; NotFound, with one text, otherwise.

        A tenant sees its own adapters and those shared with it (`any_owner`: operators), by
        the one sharing rule (`Manifest.usable_by`, i.e. `adapter_store.model.can_use`).
        "Not yours" is decided before anything that depends on whether the name exists: for
        another owner's name, visibility comes from the caller's own share index
        (`shares_of`), and the owner's manifest is read (and cached) only once the index
        names it. A name of another tenant that is not shared with the caller and a name that
        does not exist take the same path: same code, text and time (DESIGN invariant 6).

        A weighted alias (a canary) resolves to one of its versions, sticky per `routing_key`
        (`Manifest.resolve`; None: its primary version).
        """
        owner = ref.owner or caller
        try:
            foreign = owner != caller and not any_owner
            if foreign and (owner, ref.name) not in await self.manifests.shares_of(caller):
                raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)
            manifest = await self.manifests.manifest(owner, ref.name)
            if not manifest.usable_by(caller, operator=any_owner):
                raise AdapterNotFound(errors.ADAPTER_NOT_FOUND_TEXT)
            version = manifest.resolve(ref, caller=caller, routing_key=routing_key)
        except AdapterNotFound:
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT) from None
        if self.is_blocked(key_of(version)):
            reason = self.blocks.quarantined.get(key_of(version))
            if reason is not None:  # blocked by the canary, before its manifest says so
                raise errors.FailedPrecondition(
                    f"adapter version {version.version_id} of {version.name!r} is quarantined: "
                    f"{reason}; it is not served"
                )
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        return version

    # --- use ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(
        self, version: AdapterVersion, tenant: TenantConfig | None = None, *, request: bool = True
    ) -> AsyncIterator[LoadedAdapter]:
        """Hold `version` loaded in the engine for the duration of a request of `tenant` (whose
        `max_engine_slots` applies; None: no per-tenant cap, e.g. operators' warm set).
        `request=False` (prefetch, pin): not counted as a use by the eviction policy."""
        key = key_of(version)
        holder = tenant.name if tenant is not None else ""
        wanted = self.slots.wanted
        wanted[key] += 1
        try:
            await self.slots.hold(key, holder, tenant, self.slots.host_bytes(version))
            try:
                resident = await self.loads.acquire(version, holder, counted=request)
                yield resident.loaded
            finally:
                self.slots.unhold(key, holder)
        finally:
            wanted[key] -= 1
            if wanted[key] <= 0:
                del wanted[key]

    async def chat_template(self, version: AdapterVersion) -> str | None:
        """The text of `version`'s own chat template, None when it has none.

        Fetched with the version's files into the disk cache (verified there like them, under
        this version's owner), read and checked against its sha256 again, then kept in memory
        by version key: identical template bytes of another tenant are another entry. A
        revoked version is NOT_FOUND, as for `use`."""
        entry = version.chat_template
        if entry is None:
            return None
        key = key_of(version)
        self.blocks.check(key)
        text = self._templates.get(key)
        if text is not None:
            self._templates.move_to_end(key)
            return text
        path = await self.cache.ensure(version, owner=owner_of(key))
        self.cache.pin(version.sha)
        try:
            data = await asyncio.to_thread(_read_at_most, path / entry.filename, entry.size)
        except OSError:
            self.blocks.check(key)  # revoked meanwhile: its files went
            raise
        finally:
            self.cache.unpin(version.sha)
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            await self.cache.remove(version.sha)  # fetched again on the next use
            raise errors.DataLoss(
                f"the chat template of {version.version_id} does not match its sha256"
            )
        self.blocks.check(key)
        text = check_chat_template(data, self.limits)
        self._templates[key] = text
        while len(self._templates) > TEMPLATE_CACHE_SIZE:
            self._templates.popitem(last=False)
        return text

    def tenant_slots(self, tenant: str) -> int:
        """Distinct unpinned versions the tenant's requests hold (waiting or running)."""
        return self.slots.tenant_slots(tenant)

    def slot_limit(self, tenant: TenantConfig) -> int:
        return self.slots.slot_limit(tenant)

    def lora_id(self, key: VersionKey) -> int:
        """The version's engine id: assigned once, never reused in this process."""
        return self.loads.lora_id(key)

    # --- operator actions ---------------------------------------------------------------------
    async def prefetch(
        self, version: AdapterVersion, tenant: TenantConfig | None = None
    ) -> ResidencyEntry:
        async with self.use(version, tenant, request=False):
            pass
        return self.entry(version)

    def pins(self, tenant: str | None = None) -> int:
        """Pinned versions (of one owner tenant, or all), including pins still loading."""
        return self.pinned.count(tenant)

    async def pin(
        self, version: AdapterVersion, tenant: TenantConfig | None = None
    ) -> ResidencyEntry:
        """Keep `version` in the engine until unpinned. The pin is reserved (and both caps
        checked) before anything is awaited. `tenant`: the owner's config, whose `max_pins`
        applies (None: operators and the configured warm set)."""
        key = key_of(version)
        self.blocks.check(key)
        reserved = self.pinned.reserve(version, tenant)
        if reserved:
            self.slots.changed()
        try:
            async with self.use(version, tenant, request=False):
                pass
        except BaseException:
            if reserved and self.pinned.release(key):
                self.slots.changed()
            raise
        return self.entry(version)

    async def unpin(self, version: AdapterVersion) -> ResidencyEntry:
        if self.pinned.release(key_of(version)):
            self.slots.changed()
        return self.entry(version)

    def entry(self, version: AdapterVersion) -> ResidencyEntry:
        """Where this tenant's version is, on this replica. "disk" only if this key itself was
        fetched here: identical bytes cached for another tenant do not count."""
        key = key_of(version)
        pinned = key in self.pinned
        resident = self.slots.resident.get(key)
        if resident is not None:
            return ResidencyEntry(version, "engine", pinned, resident.loaded.lora_int_id)
        tier = "disk" if self.cache.contains(version.sha, owner=owner_of(key)) else "store"
        return ResidencyEntry(version, tier, pinned, 0)

    def resident_versions(self) -> list[AdapterVersion]:
        return [r.version for r in self.slots.resident.values()]

    def is_resident(self, key: VersionKey) -> bool:
        return key in self.slots.resident

    def known(self) -> set[VersionKey]:
        """Every version this replica holds in any way: resident, loading, pinned or in use."""
        slots = self.slots
        return {*slots.resident, *self.loads.loading.keys(), *self.pinned.pinned, *slots.wanted}

    # --- revocation ---------------------------------------------------------------------------
    def block(self, keys: Iterable[VersionKey], *, quarantined: str | None = None) -> None:
        """From now on, requests for these versions are answered NOT_FOUND on this replica, or
        FAILED_PRECONDITION with the reason when the canary `quarantined` them (its manifest
        write may still be on its way)."""
        keys = list(keys)
        self.blocks.keys.update(keys)
        if quarantined is not None:
            self.blocks.quarantined.update(dict.fromkeys(keys, quarantined))
        self.slots.wake_all()

    def block_name(self, tenant: str, name: str) -> list[VersionKey]:
        """The whole adapter is revoked: refuse every version of it from now on, including
        loads in progress and versions this replica never saw. Returns the versions this
        replica holds in any way (blocked too), for the caller to unload."""
        key: NameKey = (tenant, name)
        self.blocks.block_name(key)
        self.manifests.drop(key)
        known = [k for k in self.known() if k[:2] == key]
        self.block(known)
        return known

    def is_blocked(self, key: VersionKey) -> bool:
        return self.blocks.is_blocked(key)

    async def unload(self, keys: Iterable[VersionKey]) -> int:
        """Abort in-flight requests, remove from the engine, release the disk cache entry.

        The versions must be blocked first. A load in progress is not waited for (it may wait
        for a slot): it sees the block at its next step and never serves. Only an engine add in
        progress is let finish before the files go. Returns the number of requests aborted.
        """
        keys = list(dict.fromkeys(keys))
        slots = self.slots
        aborted = 0
        for key in keys:
            self.pinned.release(key)
            resident = slots.resident.pop(key, None)
            if resident is None:
                continue
            slots.reserved += 1  # the engine holds it until removed: keep it counted
            slots.reserved_bytes += resident.nbytes
            try:
                aborted += await self.engine.remove_adapter(resident.loaded.lora_int_id)
            finally:
                slots.unreserve(resident.nbytes)
            self.metrics.revoked_unload()
        for key in keys:
            self._templates.pop(key, None)
            await self.loads.settle_add(key)
            await self.cache.release(key[2], owner_of(key))
        slots.changed()
        slots.report()
        return aborted

    def unload_soon(self, keys: list[VersionKey]) -> None:
        """Unload blocked versions in the background (found by a read on a request's path)."""
        task = asyncio.create_task(self.unload(keys))
        self._unloads.add(task)
        task.add_done_callback(self._unloaded)

    def _unloaded(self, task: asyncio.Task[int]) -> None:
        self._unloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("unloading revoked versions failed", exc_info=task.exception())

    async def apply_manifest(self, manifest: Manifest) -> int:
        """Take a newer manifest (from this replica or the poller); unload what it revoked.

        Only the versions it lists as revoked go: one it does not list at all may be newer
        than this copy (uploaded since), never revoked.
        """
        gone = self.manifests.take(manifest, fresh=False)
        if not gone:
            return 0
        return await self.unload(gone)

    async def revoke_name(self, tenant: str, name: str) -> int:
        """The whole adapter is gone from the store: nothing of it may serve any more."""
        return await self.unload(self.block_name(tenant, name))

    # --- polling ------------------------------------------------------------------------------
    async def poll_once(self) -> int:
        """One poll of the change feed (`ManifestPoller.poll_once`); returns how many cached
        manifests changed."""
        return await self.poller.poll_once()

    async def run_poller(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval_s` until `stop` is set (see `ManifestPoller.run`)."""
        await self.poller.run(stop)

    # --- engine lifecycle ---------------------------------------------------------------------
    async def forget_engine(self) -> list[AdapterVersion]:
        """The engine was restarted and holds nothing: forget every resident version (no
        `remove_lora`). Returns the versions that were pinned, to pin again (their pins are
        released here, so that pinning them again counts them once)."""
        slots = self.slots
        pinned = [r.version for key, r in slots.resident.items() if key in self.pinned]
        for version in pinned:
            self.pinned.release(key_of(version))
        slots.resident.clear()
        self.loads.engine_restarted()
        slots.changed()
        slots.report()
        return pinned

    async def close(self) -> None:
        """Unload every version this residency put in the engine (for a shared engine)."""
        try:
            while self.slots.resident:
                _, resident = self.slots.resident.popitem()
                await self.engine.remove_adapter(resident.loaded.lora_int_id)
        finally:
            self.manifests.close()


def _read_at_most(path: Path, size: int) -> bytes:
    """The file's bytes, at most `size` + 1 of them (a longer file fails its check)."""
    with path.open("rb") as f:
        return f.read(size + 1)
