"""Per-tenant storage usage and quotas: stored bytes (every live version) and adapters (names).

How usage is counted, and why this way: one small object per tenant,
`tenants/<tenant>/usage.json`, updated with conditional writes (If-Match its etag, If-None-Match
when creating) like manifests, so concurrent uploads on any number of replicas serialise on it
and none is lost. An upload costs one read and one conditional write of it, whatever the number
of adapters; scanning the tenant's manifests on every upload would cost a LIST and a GET per
adapter and still race (two uploads both see room, both publish).

- A publish *charges* the usage before its manifest is written, and is refused when the charge
  would exceed the quota: two concurrent uploads can never both take the last bytes.
- A failed publish refunds its charge. A revocation refunds the revoked versions (and the name,
  for a whole adapter) once the manifest says revoked.
- A crash between the charge and the manifest (or between a revocation and its refund) leaves
  usage too high, never too low: a tenant may lose some headroom, never exceed its quota.
  `Registry.recount_usage` recomputes it from the manifests (a bounded scan of that tenant's
  adapters only), and a missing usage object is initialised the same way, once.

`Quota` and `Usage` are the values; `UsageLedger` keeps the usage objects (the registry calls it
around each publish and revocation).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

from adapter_store.backend import BlobBackend
from adapter_store.conditional import update
from adapter_store.errors import BlobNotFound, IntegrityError, QuotaExceeded, StoreError
from adapter_store.keys import usage_key
from adapter_store.model import Manifest
from adapter_store.spool import format_bytes

__all__ = ["Quota", "Usage", "UsageLedger"]

log = logging.getLogger(__name__)

#: Conditional writes of a usage object: every upload of a tenant contends on one object.
_RETRIES = 25
_MAX_BACKOFF_S = 0.2


@dataclass(frozen=True)
class Quota:
    """A tenant's limits on what it stores."""

    max_stored_bytes: int
    max_adapters: int


@dataclass(frozen=True)
class Usage:
    """What a tenant stores: bytes of every live version, and live adapters (names)."""

    tenant: str
    stored_bytes: int = 0
    adapters: int = 0
    etag: str | None = None

    def plus(self, nbytes: int, adapters: int) -> Usage:
        return Usage(
            self.tenant,
            max(0, self.stored_bytes + nbytes),
            max(0, self.adapters + adapters),
            self.etag,
        )

    def check(self, quota: Quota, nbytes: int, adapters: int, what: str) -> None:
        """Raise QuotaExceeded if adding `nbytes` and `adapters` would pass the quota."""
        if adapters > 0 and self.adapters + adapters > quota.max_adapters:
            raise QuotaExceeded(
                f"adapter quota of tenant {self.tenant} reached: {self.adapters} of "
                f"{quota.max_adapters} adapters stored; revoke one before adding {what}"
            )
        if nbytes > 0 and self.stored_bytes + nbytes > quota.max_stored_bytes:
            raise QuotaExceeded(
                f"storage quota of tenant {self.tenant} exceeded: "
                f"{format_bytes(self.stored_bytes)} of {format_bytes(quota.max_stored_bytes)} "
                f"stored, and {what} needs {format_bytes(nbytes)} more"
            )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "schema": 1,
                "tenant": self.tenant,
                "stored_bytes": self.stored_bytes,
                "adapters": self.adapters,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, etag: str | None) -> Usage:
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise IntegrityError("stored usage object is not valid JSON") from None
        if not isinstance(raw, dict):
            raise IntegrityError("stored usage object must be a JSON object")
        tenant, stored, adapters = raw.get("tenant"), raw.get("stored_bytes"), raw.get("adapters")
        if not (isinstance(tenant, str) and _count(stored) and _count(adapters)):
            raise IntegrityError("stored usage object has missing or invalid fields")
        return cls(tenant, stored, adapters, etag)


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class UsageLedger:
    """Each tenant's usage object, `tenants/<tenant>/usage.json`, kept with conditional writes.

    `live_adapters(tenant)` lists the tenant's live manifests: what a missing usage object, or
    a recount, is computed from.
    """

    def __init__(
        self, backend: BlobBackend, live_adapters: Callable[[str], list[Manifest]]
    ) -> None:
        self._backend = backend
        self._live_adapters = live_adapters

    def usage(self, tenant: str) -> Usage:
        """The tenant's stored bytes and adapters. Before the tenant's first publish with a
        quota there is no usage object: then counted from its manifests (and not stored, so a
        refused upload stores nothing)."""
        stored = self._read(tenant, create=False)
        return stored if stored is not None else self._count(tenant)

    def recount(self, tenant: str) -> Usage:
        """Recompute the tenant's usage from its manifests and store it (a repair, e.g. after a
        crash between a charge and its manifest); a bounded scan of that tenant only."""
        counted = self._count(tenant)
        stored = self._update(tenant, lambda: self._read(tenant, create=False), lambda _: counted)
        assert stored is not None  # `counted` is always written
        return stored

    def change(
        self,
        tenant: str,
        nbytes: int,
        adapters: int,
        quota: Quota | None,
        what: str,
        *,
        create: bool = False,
    ) -> bool:
        """Add to the tenant's usage with a conditional write, refusing (QuotaExceeded) what
        `quota` cannot take; False when there is no usage object and `create` is false (usage
        is not kept for this tenant yet: its first reader counts it from the manifests)."""

        def add(current: Usage | None) -> Usage | None:
            if current is None:
                return None
            if quota is not None:
                current.check(quota, nbytes, adapters, what)
            return current.plus(nbytes, adapters) if nbytes or adapters else current

        return self._update(tenant, lambda: self._read(tenant, create=create), add) is not None

    def refund(self, tenant: str, nbytes: int, adapters: int) -> None:
        """Give bytes and names back (best effort: a failure leaves usage too high, not low)."""
        try:
            self.change(tenant, -nbytes, -adapters, None, "")
        except StoreError as exc:
            log.warning("could not refund the usage of tenant %s: %s", tenant, type(exc).__name__)

    def _count(self, tenant: str) -> Usage:
        live = self._live_adapters(tenant)
        return Usage(
            tenant,
            sum(v.total_bytes for m in live for v in m.versions.values()),
            len(live),
        )

    def _read(self, tenant: str, *, create: bool) -> Usage | None:
        """The stored usage object; when there is none, None, or with `create` one counted
        from the manifests and created (If-None-Match: a concurrent creator's wins)."""

        def stored() -> Usage | None:
            try:
                data, etag = self._backend.get(usage_key(tenant))
            except BlobNotFound:
                return None
            usage = Usage.from_json(data, etag)
            if usage.tenant != tenant:
                raise IntegrityError(f"stored usage object of {tenant!r} names another tenant")
            return usage

        if not create:
            return stored()
        return self._update(
            tenant, stored, lambda found: found if found is not None else self._count(tenant)
        )

    def _update(
        self,
        tenant: str,
        read: Callable[[], Usage | None],
        change: Callable[[Usage | None], Usage | None],
    ) -> Usage | None:
        return update(
            self._backend,
            usage_key(tenant),
            read,
            change,
            retries=_RETRIES,
            max_backoff_s=_MAX_BACKOFF_S,
            what=f"the usage of tenant {tenant!r}",
        )
