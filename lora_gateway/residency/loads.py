"""The cold-load path: disk cache → validate → engine slot → `add_lora`, once per version.

- A version gets one `lora_int_id` for the life of the process (never reused); its `lora_name`
  carries the sha256 (DESIGN invariant 2). The disk cache shares identical bytes between tenants
  and counts who uses them (owner "tenant/name").
- Load before evict: the newcomer is fetched, verified and validated before anyone is evicted; a
  failed load never reaches the engine (DESIGN invariant 3).
- Single flight: one fetch and one engine load per cold version, however many requests wait;
  the load runs in its own task, so a waiter that cancels does not cancel it (invariant 4).
- Validation runs once per sha256 (`VALIDATED_MAX` remembered): a reload after an eviction,
  or another tenant's upload of the same bytes, puts a copy the disk cache has verified
  (sha256 at download, size on every hit) and that passed validation back without re-reading
  it.
- A load checks the revocation blocks after each step and after the engine added it (then it
  takes it out again); an engine add in progress is visible to revocation (`settle_add`), which
  must not delete the files while the engine reads them.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from adapter_store import (
    AdapterNotFound,
    AdapterVersion,
    BaseModelSpec,
    DiskCache,
    Limits,
    Manifest,
)
from adapter_store.model import ADAPTER_FILES
from adapter_store.singleflight import SingleFlight
from adapter_store.validate import validate_adapter
from lora_gateway import errors
from lora_gateway.engine.base import Engine, LoadedAdapter, next_lora_id
from lora_gateway.metrics import Metrics
from lora_gateway.residency.keys import NameKey, VersionKey, key_of, owner_of
from lora_gateway.residency.pins import Blocks
from lora_gateway.residency.slots import Resident, Slots

#: sha256s remembered as validated (least recently loaded forgotten beyond it).
VALIDATED_MAX = 65_536


class Loads:
    """Cold loads of versions into the engine, one in flight per version."""

    def __init__(
        self,
        engine: Engine,
        cache: DiskCache,
        spec: BaseModelSpec,
        limits: Limits,
        slots: Slots,
        blocks: Blocks,
        metrics: Metrics,
        *,
        has_manifest: Callable[[NameKey], bool],
        manifest: Callable[[str, str], Awaitable[Manifest]],
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.spec = spec
        self.limits = limits
        self.slots = slots
        self.blocks = blocks
        self.metrics = metrics
        self._has_manifest = has_manifest
        self._manifest = manifest
        self.loading: SingleFlight[VersionKey, None] = SingleFlight()
        #: Engine adds in progress (revocation lets one finish before it deletes the files).
        self._adding: dict[VersionKey, asyncio.Future[None]] = {}
        self._ids: dict[VersionKey, int] = {}
        #: Called after a version was added to the engine for the first time since the engine
        #: started (the runtime canary's hook): a reload after an eviction puts the same bytes
        #: back, which the canary has seen compute already, so a tenant churning through its
        #: adapters does not make every reload cost everyone a canary check.
        self.on_loaded: Callable[[AdapterVersion, LoadedAdapter], None] | None = None
        self._handed_to_canary: set[VersionKey] = set()
        #: sha256s whose files passed `validate_adapter` (against this spec and limits).
        self._validated: OrderedDict[str, None] = OrderedDict()

    def lora_id(self, key: VersionKey) -> int:
        """The version's engine id: assigned once, never reused in this process."""
        if key not in self._ids:
            self._ids[key] = next_lora_id()
        return self._ids[key]

    def engine_restarted(self) -> None:
        """A new engine: every version is new to it (the canary sees each again)."""
        self._handed_to_canary.clear()

    async def acquire(
        self, version: AdapterVersion, holder: str, *, counted: bool = True
    ) -> Resident:
        """The version, resident in the engine: at once if it is, else after the (shared) load.
        `counted`: a request's use, which the eviction policy counts (not a prefetch or pin)."""
        key = key_of(version)
        slots = self.slots
        for _ in range(3):
            self.blocks.check(key)
            resident = slots.resident.get(key)
            if resident is not None:
                resident.last_tenant = holder
                resident.uses += counted
                slots.resident.move_to_end(key)
                self.metrics.cache_hit("engine")
                return resident
            if key not in self.loading:
                self.metrics.cache_miss("engine")
            await self.loading.do(key, functools.partial(self._load, version, holder))
        raise errors.ResourceExhausted("adapter was evicted repeatedly; the engine is overloaded")

    async def settle_add(self, key: VersionKey) -> None:
        """Wait for an engine add of `key` in progress, if any."""
        adding = self._adding.get(key)
        if adding is not None:
            await asyncio.shield(adding)

    async def _load(self, version: AdapterVersion, tenant: str) -> None:
        key = key_of(version)
        try:
            await self._load_steps(version, tenant)
        except errors.NotFound:
            raise
        except Exception:
            if self.blocks.is_blocked(key):  # revoked meanwhile (its files may be gone)
                raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT) from None
            raise

    async def _load_steps(self, version: AdapterVersion, tenant: str) -> None:
        key, sha = key_of(version), version.sha
        if not self._has_manifest(key[:2]):
            # Its manifest must be cached (and so polled) while the version is in the engine.
            try:
                manifest = await self._manifest(version.tenant, version.name)
            except AdapterNotFound:
                raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT) from None
            if sha not in manifest.versions:
                raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        was_on_disk = self.cache.contains(sha)
        started = time.perf_counter()
        path = await self.cache.ensure(version, owner=owner_of(key))
        fetched = time.perf_counter()
        (self.metrics.cache_hit if was_on_disk else self.metrics.cache_miss)("disk")
        # The cache verifies sha256 as part of the fetch.
        self.metrics.load_phase("fetch", fetched - started)
        self.cache.pin(sha)
        try:
            self.blocks.check(key)
            # What the engine reads; a chat template is checked where it is read (its text).
            if sha in self._validated:
                self._validated.move_to_end(sha)
            else:
                files = {
                    f.filename: path / f.filename
                    for f in version.files
                    if f.filename in ADAPTER_FILES
                }
                await asyncio.to_thread(validate_adapter, files, self.spec, self.limits)
                self._validated[sha] = None
                while len(self._validated) > VALIDATED_MAX:
                    self._validated.popitem(last=False)
            validated = time.perf_counter()
            self.metrics.load_phase("validate", validated - fetched)
            loaded = LoadedAdapter(
                lora_int_id=self.lora_id(key),
                lora_name=f"{version.tenant}/{version.name}@sha256:{sha}",
                path=path,
            )
            nbytes = self.slots.host_bytes(version)
            await self.slots.reserve(key, tenant, nbytes)
            reserved = time.perf_counter()  # the slot wait and the evictions are behind
            try:
                self.blocks.check(key)
                await self._add(key, loaded)
                if self.blocks.is_blocked(key):
                    # Revoked while the engine loaded it: take it out again, never serve it.
                    await self.engine.remove_adapter(loaded.lora_int_id)
                    raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
                self.slots.resident[key] = Resident(version, loaded, tenant, nbytes)
                if self.on_loaded is not None and key not in self._handed_to_canary:
                    self._handed_to_canary.add(key)
                    self.on_loaded(version, loaded)
            finally:
                self.slots.unreserve(nbytes)
            self.metrics.engine_loaded()
            self.metrics.load_phase("engine_add", time.perf_counter() - reserved)
            self.slots.report()
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
