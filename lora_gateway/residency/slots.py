"""Engine slots: the resident LRU, who holds what, per-tenant shares, and the wait for a slot.

- Capacity is the engine's `max_cpu_loras`; beyond it an idle, unpinned version is removed
  (`remove_lora`), segmented LRU: a version used once since it was loaded is on probation, one
  used again is protected. The victim is the loading tenant's own least recently used version
  on probation, else its own protected one, else another tenant's on probation, else the least
  recently used of all. So a burst of one-off requests for cold adapters only churns the
  probation segment: an adapter hot by request rate stays resident through it (before: plain
  LRU flushed it after `max_cpu_loras` cold ones). GPU slots (`max_loras`) are left to vLLM's
  scheduler.
- With `host_budget_bytes` (Settings.host_lora_budget_bytes) the host tier is also bounded in
  bytes, by each version's real size (its files), and at least `smallest_adapter_bytes` (rank
  1 on every layer: `host_bytes`): a load evicts (same order) until both the count and the
  bytes fit; a version larger than the whole budget is refused at once. With `max_cpu_loras`
  unset the count is the budget over that smallest size (`Settings.engine_cpu_loras`), so the
  bytes bind first. A tenant's share is then in bytes too: the versions its requests hold
  weigh at most `TenantConfig.max_host_bytes` (default half the budget), though one version is
  always allowed, so that a tenant of large adapters cannot hold the whole budget.
- Engine slots are shared fairly (invariant 11). A request *holds* its version from the moment
  it asks for it until it ends. A tenant's requests hold at most `TenantConfig.max_engine_slots`
  distinct unpinned versions at once (and never more than the unpinned capacity minus one), so
  one tenant can never hold every slot; the excess waits in its tenant's queue. A load waits for
  a free slot, or for an idle version to evict, in one queue served in arrival order. Both waits
  end after `slot_wait_s` with RESOURCE_EXHAUSTED, and neither holds anything revocation needs:
  there is no engine lock; slots are counted (`occupied`) and reserved before any await.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from adapter_store import AdapterVersion, DiskCache
from adapter_store.model import ADAPTER_FILES
from adapter_store.sized import SizedOrderedDict
from lora_gateway import errors
from lora_gateway.engine.base import Engine, LoadedAdapter
from lora_gateway.metrics import Metrics
from lora_gateway.residency.keys import VersionKey
from lora_gateway.residency.pins import Blocks, Pins
from lora_gateway.tenancy import TenantConfig

#: Default of `Settings.engine_slot_wait_s`: how long a request waits for an engine slot (its
#: tenant's share, then a free or evictable slot) before RESOURCE_EXHAUSTED.
SLOT_WAIT_S = 30.0


@dataclass
class Resident:
    version: AdapterVersion
    loaded: LoadedAdapter
    #: The tenant whose request used it last (loads evict their own tenant's idle ones first).
    last_tenant: str = ""
    #: Bytes of its weights (what vLLM's CPU LoRA cache holds for it).
    nbytes: int = 0
    #: Requests that found it resident since it was loaded (the one that loaded it, and any that
    #: joined that load, find it so right after): 2 or more is the protected segment.
    uses: int = 0

    @property
    def protected(self) -> bool:
        return self.uses >= 2


def _nbytes(resident: Resident) -> int:
    return resident.nbytes


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


class Slots:
    """The engine's adapter slots: resident versions (LRU first), holds, reservations, waits."""

    def __init__(
        self,
        engine: Engine,
        cache: DiskCache,
        pins: Pins,
        blocks: Blocks,
        metrics: Metrics,
        *,
        slot_wait_s: float = SLOT_WAIT_S,
        host_budget_bytes: int = 0,
        smallest_adapter_bytes: int = 0,
    ) -> None:
        self.engine = engine
        self.cache = cache
        self.capacity = engine.max_cpu_loras
        self.pins = pins
        self.blocks = blocks
        self.metrics = metrics
        self.slot_wait_s = slot_wait_s
        #: LRU first; `.total` is their bytes.
        self.resident: SizedOrderedDict[VersionKey, Resident] = SizedOrderedDict(_nbytes)
        #: Requests between `Residency.use()` entry and exit, per version (their manifest stays
        #: cached).
        self.wanted: Counter[VersionKey] = Counter()
        #: Requests holding each version (waiting for its load, or running on it), per tenant.
        self.holds: dict[VersionKey, Counter[str]] = {}
        #: What each held version weighs in the host tier (`host_bytes`).
        self._held_bytes: dict[VersionKey, int] = {}
        #: Slots reserved by loads (or taken by revocation unloads) not yet counted in resident.
        self.reserved = 0
        #: Bytes the host tier may hold (0: no byte bound), and bytes reserved like `reserved`.
        self.host_budget_bytes = host_budget_bytes
        self.reserved_bytes = 0
        #: What a version counts as at least, with a byte budget (`host_bytes`).
        self.smallest_adapter_bytes = smallest_adapter_bytes
        self._slot_gate = FifoGate()
        self._tenant_gates: dict[str, FifoGate] = {}

    # --- holds: a tenant's share --------------------------------------------------------------
    def _holding(self, key: VersionKey, holder: str) -> bool:
        holds = self.holds.get(key)
        return holds is not None and holds[holder] > 0

    def tenant_slots(self, tenant: str) -> int:
        """Distinct unpinned versions the tenant's requests hold (waiting or running)."""
        return sum(
            1 for key, holds in self.holds.items() if holds[tenant] > 0 and key not in self.pins
        )

    def tenant_bytes(self, tenant: str) -> int:
        """What the distinct unpinned versions the tenant's requests hold weigh (host tier)."""
        return sum(
            self._held_bytes.get(key, 0)
            for key, holds in self.holds.items()
            if holds[tenant] > 0 and key not in self.pins
        )

    def slot_limit(self, tenant: TenantConfig) -> int:
        """The tenant's cap: its `max_engine_slots`, and never all the unpinned slots."""
        return min(tenant.max_engine_slots, max(1, self.capacity - len(self.pins) - 1))

    def _share_allows(self, holder: str, tenant: TenantConfig, nbytes: int) -> bool:
        """Whether one more distinct version (of `nbytes`) fits the tenant's share: its slot
        count, and, with a host byte budget, its bytes (one version is always allowed)."""
        slots = self.tenant_slots(holder)
        if slots >= self.slot_limit(tenant):
            return False
        return (
            not self.host_budget_bytes
            or slots == 0
            or self.tenant_bytes(holder) + nbytes <= tenant.max_host_bytes
        )

    async def hold(
        self, key: VersionKey, holder: str, tenant: TenantConfig | None, nbytes: int = 0
    ) -> None:
        """Count a request of `holder` on `key` (a version of `nbytes` in the host tier), once
        the tenant's share allows it (waits)."""
        self.blocks.check(key)

        def free_of_charge() -> bool:  # already held by this tenant, or pinned: no new slot
            return self._holding(key, holder) or key in self.pins

        if tenant is not None and not free_of_charge():
            if not self._share_allows(holder, tenant, nbytes):
                self.metrics.slot_waited("tenant")
            gate = self._tenant_gates.setdefault(holder, FifoGate())
            loop = asyncio.get_running_loop()
            try:
                ok = await gate.wait(
                    ready=lambda: self._share_allows(holder, tenant, nbytes),
                    check=lambda: self.blocks.check(key),
                    deadline=loop.time() + self.slot_wait_s,
                    bypass=free_of_charge,
                )
            finally:
                if not gate and self._tenant_gates.get(holder) is gate:
                    del self._tenant_gates[holder]
            if not ok:
                raise errors.ResourceExhausted(self._share_refusal(holder, tenant))
        self.holds.setdefault(key, Counter())[holder] += 1
        self._held_bytes[key] = nbytes

    def _share_refusal(self, holder: str, tenant: TenantConfig) -> str:
        slots = self.tenant_slots(holder)
        if slots >= self.slot_limit(tenant):
            held = f"{slots} engine adapter slots (limit {self.slot_limit(tenant)})"
        else:
            held = (
                f"{self.tenant_bytes(holder)} bytes of the host tier "
                f"(limit {tenant.max_host_bytes})"
            )
        return (
            f"tenant {holder} holds {held} and none freed within {self.slot_wait_s:g}s; try again"
        )

    def unhold(self, key: VersionKey, holder: str) -> None:
        holds = self.holds.get(key)
        if holds is None:
            return
        holds[holder] -= 1
        if holds[holder] <= 0:
            del holds[holder]
        if not holds:
            del self.holds[key]
            self._held_bytes.pop(key, None)
        self.changed()

    # --- waking -------------------------------------------------------------------------------
    def changed(self) -> None:
        """Something may have freed: the first waiter of each queue re-checks."""
        self._slot_gate.wake()
        for gate in self._tenant_gates.values():
            gate.wake()

    def wake_all(self) -> None:
        """Every waiter re-checks (after a revocation: blocked ones give up)."""
        self._slot_gate.wake_all()
        for gate in self._tenant_gates.values():
            gate.wake_all()

    # --- engine slots -------------------------------------------------------------------------
    def host_bytes(self, version: AdapterVersion) -> int:
        """What `version` weighs in the host tier: its files' real size, and, with a byte
        budget, at least the smallest adapter that changes every layer of the base
        (`BaseModelSpec.smallest_full_adapter_bytes`), so that a `max_cpu_loras` derived from
        the budget (the budget over that size) never binds before the bytes do."""
        nbytes = sum(f.size for f in version.files if f.filename in ADAPTER_FILES)
        return max(nbytes, self.smallest_adapter_bytes) if self.host_budget_bytes else nbytes

    def occupied(self) -> int:
        return len(self.resident) + self.reserved

    def occupied_bytes(self) -> int:
        return self.resident.total + self.reserved_bytes

    def _fits(self, count: int, nbytes: int) -> bool:
        return count <= self.capacity and (
            not self.host_budget_bytes or nbytes <= self.host_budget_bytes
        )

    def _victims(self, tenant: str, nbytes: int) -> list[VersionKey] | None:
        """The idle versions to evict (in `_victim`'s order) so that one more version of
        `nbytes` fits; None when evicting every idle one would not make it fit."""
        count, used = self.occupied() + 1, self.occupied_bytes() + nbytes
        if self._fits(count, used):
            return []
        idle = [k for k in self.resident if k not in self.holds and k not in self.pins]
        picked: list[VersionKey] = []
        while idle:
            victim = self._victim(tenant, among=idle)
            assert victim is not None
            idle.remove(victim)
            picked.append(victim)
            count, used = count - 1, used - self.resident[victim].nbytes
            if self._fits(count, used):
                return picked
        return None

    def _victim(self, tenant: str, among: list[VersionKey] | None = None) -> VersionKey | None:
        """An idle, unpinned resident version to evict for a load of `tenant`, least recently
        used first within each rank: its own on probation, its own protected, another tenant's
        on probation, anyone's. `among`: only those (idle ones, in LRU order)."""
        best: tuple[int, VersionKey] | None = None
        for key in self.resident if among is None else among:
            resident = self.resident[key]
            if key in self.holds or key in self.pins:
                continue
            rank = (0 if resident.last_tenant == tenant else 2) + (1 if resident.protected else 0)
            if rank == 0:
                return key
            if best is None or rank < best[0]:
                best = (rank, key)
        return None if best is None else best[1]

    async def reserve(self, key: VersionKey, tenant: str, nbytes: int = 0) -> None:
        """Take an engine slot (and `nbytes` of the host budget) for `key`'s load: free ones,
        or ones freed by evicting idle versions. Waits in arrival order, holding nothing; a
        revocation ends the wait. The caller gives them back with `unreserve(nbytes)` once
        the load is resident (or failed)."""
        if self.host_budget_bytes and nbytes > self.host_budget_bytes:
            raise errors.ResourceExhausted(
                f"the adapter's weights ({nbytes} bytes) exceed the host tier's whole budget "
                f"(host_lora_budget_bytes={self.host_budget_bytes})"
            )
        loop = asyncio.get_running_loop()

        def ready() -> bool:
            return self._victims(tenant, nbytes) is not None

        if len(self._slot_gate) or not ready():
            self.metrics.slot_waited("engine")
        ok = await self._slot_gate.wait(
            ready, lambda: self.blocks.check(key), loop.time() + self.slot_wait_s
        )
        if not ok:
            raise errors.ResourceExhausted(
                f"all {self.capacity} engine adapter slots are busy; try again"
            )
        victims = self._victims(tenant, nbytes)
        assert victims is not None  # ready() said so, and nothing ran since
        # Counted (and the victims taken out) before any await: nobody else can take them.
        self.reserved += 1
        self.reserved_bytes += nbytes
        evicted = [self.resident.pop(victim) for victim in victims]
        if not evicted:
            return
        try:
            with self.metrics.time_load("evict"):
                for resident in evicted:
                    await self.engine.remove_adapter(resident.loaded.lora_int_id)
                    self.metrics.evicted("engine")
        except BaseException:
            self.unreserve(nbytes)
            raise

    def unreserve(self, nbytes: int = 0) -> None:
        self.reserved -= 1
        self.reserved_bytes -= nbytes
        self.changed()

    def report(self) -> None:
        """Publish how many versions the engine and the disk cache hold."""
        self.metrics.set_resident("engine", len(self.resident), self.resident.total)
        self.metrics.set_resident("disk", self.cache.entry_count, self.cache.used_bytes)
