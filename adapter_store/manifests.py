"""Manifests: one JSON object per adapter (`keys.manifest_key`), read and written conditionally.

Every write also appends an event to the change feed (adapter_store.changes), after the put, so
that other replicas learn of it with one listing, and then updates the manifest's copy in the
listing index (adapter_store.index).

The manifest is the truth about an adapter: its versions, aliases, grants and status. Every
change is a read (with its etag) → modify → conditional put (adapter_store.conditional), so
concurrent writers on any number of replicas never lose an update. A manifest with status
"revoked" is kept as a tombstone; `live` is the check every read path applies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from adapter_store.backend import BlobBackend
from adapter_store.changes import ChangeFeed
from adapter_store.conditional import update
from adapter_store.errors import BlobNotFound, Conflict, StoreError
from adapter_store.index import ListingIndex
from adapter_store.keys import manifest_key
from adapter_store.model import Manifest, not_found

__all__ = ["Manifests", "is_live", "live"]

log = logging.getLogger(__name__)

#: At most this many lost races before a manifest update raises Conflict.
DEFAULT_RETRIES = 10
_MAX_BACKOFF_S = 0.1


def is_live(manifest: Manifest | None) -> bool:
    """Whether a manifest counts as one of its tenant's adapters."""
    return manifest is not None and manifest.status == "active"


def live(manifest: Manifest | None, what: str) -> Manifest:
    """`manifest` if it is live, else the one NOT_FOUND error for `what`."""
    if manifest is None or manifest.status != "active":
        raise not_found(what)
    return manifest


class Manifests:
    """The manifests of one backend."""

    def __init__(self, backend: BlobBackend, *, max_retries: int = DEFAULT_RETRIES) -> None:
        self._backend = backend
        self._max_retries = max_retries
        self.feed = ChangeFeed(backend)
        self.index = ListingIndex(backend, self.read)

    def read(self, tenant: str, name: str) -> Manifest | None:
        """The stored manifest (revoked ones included), with its etag; None if there is none."""
        try:
            data, etag = self._backend.get(manifest_key(tenant, name))
        except BlobNotFound:
            return None
        return Manifest.from_json(data, etag)

    def read_if_changed(self, tenant: str, name: str, etag: str) -> Manifest | None:
        """None when the stored manifest still has `etag` (a conditional GET); NOT_FOUND when
        there is none."""
        try:
            found = self._backend.get_if_changed(manifest_key(tenant, name), etag)
        except BlobNotFound:
            raise not_found(name) from None
        return None if found is None else Manifest.from_json(*found)

    def update(
        self, tenant: str, name: str, change: Callable[[Manifest | None], Manifest]
    ) -> Manifest:
        """Apply `change` to the current manifest (None: there is none yet) and store the
        result conditionally, retrying lost races; `change` returning its argument writes
        nothing.

        A write is announced by a pending marker of the listing index and followed by its
        change-feed event, then by its copy in the index, which removes the marker
        (adapter_store.index). If the append fails, the write stands (it is the truth) and the
        error is logged: other replicas then see the change at their resync pass instead
        (lora_gateway.residency.manifests), not within one poll interval. If the copy fails,
        the index is withdrawn (listings read the manifests) and the error is logged.
        """
        given: list[Manifest | None] = []
        changing = False

        def tracked(current: Manifest | None) -> Manifest:
            nonlocal changing
            given.append(current)
            changing = True
            made = change(current)
            changing = False
            return made

        marker = self.index.begin(tenant, name)
        try:
            updated = update(
                self._backend,
                manifest_key(tenant, name),
                lambda: self.read(tenant, name),
                tracked,
                retries=self._max_retries,
                max_backoff_s=_MAX_BACKOFF_S,
                what=f"adapter {name!r}",
            )
        except BaseException as exc:
            # Refused by `change`, or every put lost its race: nothing was written. Any other
            # error may have come after the put took effect: the marker stays.
            if changing or isinstance(exc, Conflict):
                self.index.abandon(marker)
            raise
        # Written, unless a no-op returned what was read (or an absent manifest stayed absent).
        written = updated is not None and bool(given) and updated is not given[-1]
        if not written:
            self.index.abandon(marker)
        if updated is None:  # `change` kept an absent manifest absent
            raise not_found(name)
        if written:
            try:
                self.feed.append(tenant, name)
            except StoreError as exc:
                log.error(
                    "change feed: the event of %s/%s was not written (%s); other replicas "
                    "see the change at their next resync pass",
                    tenant,
                    name,
                    exc,
                )
            self.index.note(tenant, name, marker, created=given[-1] is None)
        return updated
