"""Pins (versions our LRU never evicts) and revocation blocks (versions that may not serve).

- Pins are ours, not vLLM's: see engine/vllm_engine.py for why. A pin is reserved in the same
  step as the cap checks (at most capacity - 1 in all, and the owner tenant's `max_pins`),
  before the version is loaded, so concurrent pins cannot overshoot. A pinned version's disk
  cache entry is pinned too.
- Revocation blocks before it unloads: by version key, and for a whole adapter by (tenant, name)
  as well, so that loads in progress and versions this replica never saw are refused too. Each
  whole-adapter block bumps the name's epoch: a manifest read that began before is not trusted.
  A version the runtime canary blocked keeps its reason: it is refused FAILED_PRECONDITION, not
  NOT_FOUND, while its "quarantined" manifest write is on its way.
"""

from __future__ import annotations

from adapter_store import AdapterVersion, DiskCache
from lora_gateway import errors
from lora_gateway.residency.keys import NameKey, VersionKey, key_of
from lora_gateway.tenancy import TenantConfig


class Pins:
    """The pinned version keys, their caps, and the disk cache pins that go with them."""

    def __init__(self, cache: DiskCache, capacity: int) -> None:
        self.cache = cache
        self.capacity = capacity
        self.pinned: set[VersionKey] = set()

    def __contains__(self, key: object) -> bool:
        return key in self.pinned

    def __len__(self) -> int:
        return len(self.pinned)

    def count(self, tenant: str | None = None) -> int:
        """Pinned versions (of one owner tenant, or all), including pins still loading."""
        return sum(1 for key in self.pinned if tenant is None or key[0] == tenant)

    def reserve(self, version: AdapterVersion, tenant: TenantConfig | None) -> bool:
        """Pin `version` if it is not pinned yet, after checking both caps (nothing awaited);
        True if this call added the pin. `tenant`: the owner's config, whose `max_pins` applies
        (None: operators and the configured warm set)."""
        key = key_of(version)
        if key in self.pinned:
            return False
        if len(self.pinned) >= self.capacity - 1:
            raise errors.ResourceExhausted(
                f"at most {self.capacity - 1} adapters can be pinned (one slot stays free)"
            )
        if tenant is not None and self.count(version.tenant) >= tenant.max_pins:
            raise errors.ResourceExhausted(
                f"tenant {tenant.name} may pin at most {tenant.max_pins} adapter version(s)"
            )
        self.pinned.add(key)
        self.cache.pin(version.sha)
        return True

    def release(self, key: VersionKey) -> bool:
        """Unpin `key` (and its disk cache entry); True if it was pinned."""
        if key not in self.pinned:
            return False
        self.pinned.discard(key)
        self.cache.unpin(key[2])
        return True


class Blocks:
    """What revocation took away on this replica: version keys, and whole adapters by name."""

    def __init__(self) -> None:
        self.keys: set[VersionKey] = set()
        #: Blocked by the runtime canary: the reason, for FAILED_PRECONDITION.
        self.quarantined: dict[VersionKey, str] = {}
        #: Whole adapters revoked: every version is refused, known to this replica or not.
        self.names: set[NameKey] = set()
        #: Bumped when a name is blocked: a manifest read that began before is not trusted.
        self._epochs: dict[NameKey, int] = {}

    def is_blocked(self, key: VersionKey) -> bool:
        return key in self.keys or key[:2] in self.names

    def check(self, key: VersionKey) -> None:
        """NotFound if `key` may not serve."""
        if self.is_blocked(key):
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)

    def epoch(self, name: NameKey) -> int:
        return self._epochs.get(name, 0)

    def block_name(self, name: NameKey) -> None:
        self.names.add(name)
        self._epochs[name] = self._epochs.get(name, 0) + 1
