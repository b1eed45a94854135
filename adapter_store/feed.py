"""The change feed: one small event object per manifest write, listed in time order.

Every manifest write (adapter_store.manifests) appends an empty object
`events/<stamp>-<nonce>-<tenant>/<name>` (adapter_store.keys) once its conditional put has
succeeded. A replica that caches manifests lists the feed with StartAfter at its position
instead of re-reading every cached manifest: one listing per poll interval names every adapter
changed since, however many manifests exist (`ChangeFeed.read`). The reader's side (position,
look-back for clock skew, resync, partition) is lora_gateway.residency.manifests.ManifestPoller.

It works on any backend with ordered listings: S3 (AWS, MinIO, SeaweedFS) and the local folder.
Events are kept `retention_s` and then removed by whoever calls `expire` (every replica, rarely:
deleting an event twice is harmless).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapter_store.backend import BlobBackend
from adapter_store.errors import StoreError
from adapter_store.keys import EVENTS, event_key, event_of, events_from

__all__ = ["Change", "ChangeFeed", "ChangePage"]

log = logging.getLogger(__name__)

#: The most events one listing returns (S3's own page size).
PAGE = 1000


@dataclass(frozen=True)
class Change:
    """One manifest write: when (the writer's clock, µs since the epoch) and which adapter."""

    key: str
    stamp_us: int
    tenant: str
    name: str


@dataclass(frozen=True)
class ChangePage:
    """One listing of the feed: its events, the position to continue from, and whether more
    follow."""

    changes: list[Change]
    position: str
    more: bool


def now_us(clock: Callable[[], float] = time.time) -> int:
    return int(clock() * 1_000_000)


class ChangeFeed:
    """Appends and lists the events of one backend."""

    def __init__(self, backend: BlobBackend, *, clock: Callable[[], float] = time.time) -> None:
        self._backend = backend
        self._clock = clock

    def append(self, tenant: str, name: str) -> None:
        """Record that `tenant`/`name`'s manifest was just written (one PUT)."""
        self._backend.put(event_key(now_us(self._clock), secrets.token_hex(4), tenant, name), b"")

    def read(self, since_us: int, *, position: str = "", limit: int = PAGE) -> ChangePage:
        """Events stamped `since_us` or later, after `position` (a `ChangePage.position` of an
        earlier page of the same read; "" to start): one listing."""
        start = position or events_from(since_us)
        keys, more = self._backend.list_page(EVENTS, start_after=start, limit=limit)
        changes = []
        for key in keys:
            parsed = event_of(key)
            if parsed is not None:
                changes.append(Change(key, *parsed))
        return ChangePage(changes, keys[-1] if keys else start, more)

    def expire(self, before_us: int, *, limit: int = PAGE) -> int:
        """Delete up to `limit` of the oldest events stamped before `before_us` (one listing
        and one DELETE each); returns how many were deleted."""
        keys, _ = self._backend.list_page(EVENTS, limit=limit)
        deleted = 0
        for key in keys:
            parsed = event_of(key)
            if parsed is None or parsed[0] >= before_us:
                continue
            try:
                self._backend.delete(key)
            except StoreError as exc:
                log.warning("change feed: an expired event was not deleted: %s", exc)
                continue
            deleted += 1
        return deleted
