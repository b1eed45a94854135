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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypeGuard

from adapter_store.errors import IntegrityError, QuotaExceeded
from adapter_store.spool import format_bytes

__all__ = ["Quota", "Usage"]


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
