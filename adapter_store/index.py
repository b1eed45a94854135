"""The listing index: a copy of every adapter's manifest in 256 shard objects per tenant, so that
a page of adapters costs one listing and a few shard reads, not one manifest read per adapter.

Layout (adapter_store.keys): `tenants/<tenant>/index/<shard>.json`, where `<shard>` is the first
two hex digits of the sha256 of the adapter's name, and `tenants/<tenant>/index/ready` once the
index holds every adapter of the tenant. Listings use the index only while `ready` exists;
otherwise they read one manifest per adapter (the manifests are the truth, and always right).

The writer of a manifest keeps its copy. Before the manifest write it puts a pending marker,
`tenants/<tenant>/index/pending/<name>/<stamp>-<nonce>` (`begin`); after the write and its
change-feed event it updates the copy and then deletes its marker (`note`). The update reads the
shard (with its etag), reads the manifest again and puts the shard If-Match. Reading the manifest
*after* the shard is what keeps a copy from going backwards under concurrent writers: a shard
put succeeds only if nothing was put since its read, so the manifest it copies was read after
every earlier put, and is at least as new as any manifest whose writer has put before. A listing
reads the manifest itself for every name with a pending marker, so a writer killed between its
manifest write and its copy (found by `tests/faults/test_durability.py`'s kill -9 soak) never
leaves a listing behind the manifests.

What else can make the index wrong, and what then happens:
- a shard update that fails (the store failing, too many lost races) withdraws the index: the
  `ready` marker is deleted, listings go back to the manifests, and the error says to run
  `lora-gateway store rebuild-index`;
- a replica of a version without the index (a rolling upgrade) writes manifests without
  copies or markers: rebuild once the upgrade is done.
`rebuild` re-copies every manifest of a tenant (the same read-shard, read-manifest, put loop, so
it is safe while gateways write), removes pending markers older than `STALE_MARKER_S` and then
marks the index ready. The write that creates a tenant's first adapter marks a new tenant's
index ready itself.

Pages list shards in order, and a shard's adapters by name. A position is `@<shard>/<name>`
(after that adapter): '@' is never in a name, so a position says which listing issued it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from adapter_store.backend import BlobBackend
from adapter_store.changes import now_us
from adapter_store.conditional import update
from adapter_store.errors import BlobNotFound, IntegrityError, InvalidAdapter, StoreError
from adapter_store.keys import (
    adapters_prefix,
    child_name,
    index_pending_key,
    index_pending_of,
    index_prefix,
    index_ready_key,
    index_shard_key,
    index_shard_of,
)
from adapter_store.model import Manifest, Page, check_name
from adapter_store.pages import MAX_PAGE, READERS, all_pages, list_page, page_limit, read_at_once

__all__ = ["INDEXED", "IndexReport", "ListingIndex", "shard_of"]

log = logging.getLogger(__name__)

#: The first character of an index listing's positions (never in a name: `check_name`).
INDEXED = "@"
#: Lost races before a shard update gives up (like a manifest's).
_RETRIES = 10
_MAX_BACKOFF_S = 0.1
#: Keys under a tenant's index folder: 256 shards, the ready marker and any pending ones, in
#: one listing as long as few writers died mid-write.
_LISTING = 1000
#: `rebuild` removes pending markers older than this: no manifest write takes that long.
STALE_MARKER_S = 600.0


def shard_of(name: str) -> str:
    """The shard of an adapter name: the first 2 hex digits of its sha256."""
    return hashlib.sha256(name.encode()).hexdigest()[:2]


@dataclass(frozen=True)
class Shard:
    """One shard: adapter name → its manifest's etag and parsed JSON."""

    entries: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    etag: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": 1,
                "entries": {
                    name: {"etag": etag, "manifest": manifest}
                    for name, (etag, manifest) in sorted(self.entries.items())
                },
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, etag: str, shard: str) -> Shard:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise IntegrityError(f"listing index shard {shard} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != 1:
            raise IntegrityError(f"listing index shard {shard} has an unknown format")
        raw = obj.get("entries")
        if not isinstance(raw, dict):
            raise IntegrityError(f"listing index shard {shard} has no entries")
        entries = {}
        for name, entry in raw.items():
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("etag"), str)
                or not isinstance(entry.get("manifest"), dict)
            ):
                raise IntegrityError(f"listing index shard {shard} has a malformed entry")
            entries[name] = (entry["etag"], entry["manifest"])
        return cls(entries, etag)


@dataclass
class IndexReport:
    """What `ListingIndex.rebuild` did."""

    tenant: str
    adapters: int = 0
    shards_written: int = 0
    markers_removed: int = 0


class ListingIndex:
    """The listing index of one backend (see the module docstring)."""

    def __init__(
        self,
        backend: BlobBackend,
        read_manifest: Callable[[str, str], Manifest | None],
    ) -> None:
        self._backend = backend
        self._read_manifest = read_manifest
        #: Tenants seen with more than one adapter: their creations need not look again.
        self._populated: set[str] = set()

    # --- writes -------------------------------------------------------------------------------
    def begin(self, tenant: str, name: str) -> str | None:
        """Before a manifest write: its pending marker (listings read `name`'s manifest itself
        while one exists); the marker's key, None if it could not be written (then the index
        is withdrawn, logged)."""
        key = index_pending_key(tenant, name, now_us(), secrets.token_hex(4))
        try:
            self._backend.put(key, b"")
        except StoreError as exc:
            self._withdraw(tenant, exc)
            return None
        return key

    def abandon(self, marker: str | None) -> None:
        """The write `marker` announced wrote nothing: remove the marker (a failure only
        leaves one more manifest read per listing of its shard until a rebuild)."""
        if marker is None:
            return
        try:
            self._backend.delete(marker)
        except StoreError as exc:
            log.warning("listing index: a pending marker was not removed (%s)", exc)

    def note(self, tenant: str, name: str, marker: str | None, *, created: bool) -> None:
        """After a manifest write: bring `name`'s copy up to date with the stored manifest,
        then remove the write's pending `marker`. `created`: the write created the manifest (a
        new tenant's first adapter then marks the index ready). Never raises: a failure
        withdraws the index and keeps the marker (logged)."""
        try:
            self._update(tenant, shard_of(name), [name])
            if created and self._is_only_adapter(tenant, name):
                self._backend.put(index_ready_key(tenant), b"")
        except StoreError as exc:
            self._withdraw(tenant, exc)
            return
        self.abandon(marker)

    def _is_only_adapter(self, tenant: str, name: str) -> bool:
        """Whether `name` is the tenant's only adapter (one listing, once per tenant seen with
        more: a tenant's adapters are never deleted, only revoked)."""
        if tenant in self._populated:
            return False
        prefix = adapters_prefix(tenant)
        keys, _ = self._backend.list_page(prefix, limit=2, folders=True)
        if len(keys) > 1:
            self._populated.add(tenant)
        return [child_name(key, prefix) for key in keys] == [name]

    def _withdraw(self, tenant: str, exc: Exception) -> None:
        log.error(
            "listing index of tenant %s: a copy was not updated (%s); listings read the "
            "manifests until `lora-gateway store rebuild-index` is run",
            tenant,
            exc,
        )
        try:
            self._backend.delete(index_ready_key(tenant))
        except StoreError as again:
            log.error(
                "listing index of tenant %s: the index could not be withdrawn either (%s); its "
                "listings may miss the last change until `lora-gateway store rebuild-index`",
                tenant,
                again,
            )

    def _update(
        self, tenant: str, shard: str, names: Iterable[str], *, with_held: bool = False
    ) -> bool:
        """Re-copy the manifests of `names` (`with_held`: and of every adapter the shard
        holds) into `shard`: read the shard, then the manifests, then put it If-Match. Whether
        anything was written."""
        key = index_shard_key(tenant, shard)
        names = set(names)
        written = False

        def change(current: Shard | None) -> Shard | None:
            nonlocal written
            entries = dict(current.entries) if current is not None else {}
            wanted = sorted(names | set(entries)) if with_held else sorted(names)
            found = read_at_once(lambda n: self._copy_of(tenant, n), wanted)
            for name, manifest in zip(wanted, found, strict=True):
                if manifest is None:
                    entries.pop(name, None)
                else:
                    entries[name] = (manifest.etag or "", json.loads(manifest.to_json()))
            written = entries != (current.entries if current is not None else {})
            return Shard(entries) if written else current

        update(
            self._backend,
            key,
            lambda: self._read_shard(tenant, shard, tolerate_corrupt=True),
            change,
            retries=_RETRIES,
            max_backoff_s=_MAX_BACKOFF_S,
            what=f"listing index shard {shard} of tenant {tenant!r}",
        )
        return written

    def _copy_of(self, tenant: str, name: str) -> Manifest | None:
        """The stored manifest to copy; None (no copy) when there is none or it is corrupt
        (then every listing of the manifests fails on it, and the index leaves it out)."""
        try:
            return self._read_manifest(tenant, name)
        except IntegrityError as exc:
            log.warning(
                "listing index of tenant %s: a corrupt manifest is left out (%s)", tenant, exc
            )
            return None

    def rebuild(self, tenant: str, *, stale_after_s: float = STALE_MARKER_S) -> IndexReport:
        """Copy every manifest of `tenant` into its shards, drop copies of manifests that no
        longer exist, then mark the index ready. Reads every manifest of the tenant: an
        operator's task (`lora-gateway store rebuild-index`), safe while gateways write.
        Pending markers older than `stale_after_s` are removed (their writers are gone)."""
        prefix = adapters_prefix(tenant)
        names = all_pages(
            lambda after: list_page(
                self._backend,
                prefix,
                lambda key: child_name(key, prefix),
                after=after,
                limit=MAX_PAGE,
                folders=True,
            )
        )
        report = IndexReport(tenant, adapters=len(names))
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(shard_of(name), []).append(name)
        began_us = now_us()
        listing = self._listing(tenant)
        for shard in sorted(set(by_shard) | set(listing.shards)):
            if self._update(tenant, shard, by_shard.get(shard, []), with_held=True):
                report.shards_written += 1
        # Markers of writers that are long gone (killed, or their store call failed in
        # doubt): the copies above were read after their manifest writes.
        for key, _, stamp_us in listing.markers:
            if stamp_us < began_us - int(stale_after_s * 1e6):
                self.abandon(key)
                report.markers_removed += 1
        self._backend.put(index_ready_key(tenant), b"")
        return report

    # --- reads --------------------------------------------------------------------------------
    def page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest] | None:
        """Live adapters after the position `after` (`@<shard>/<name>`, or "" to start), at
        most `limit` examined; None when the index is not ready and `after` is "" (a listing
        begun on the index finishes on it). One listing plus one read per shard visited."""
        limit = page_limit(limit)
        start_shard, start_name = _position(after)
        listing = self._listing(tenant)
        if not after and not listing.ready:
            return None
        pending: dict[str, set[str]] = {}
        for _, name, _ in listing.markers:
            pending.setdefault(shard_of(name), set()).add(name)
        shards = sorted(s for s in {*listing.shards, *pending} if s >= start_shard)
        items: list[Manifest] = []
        examined = 0
        last = ""
        read = 0
        while shards:
            # Read as many shards at once as the rest of the page needs, judged by the entries
            # of those read so far (one to begin with), at most READERS.
            wanted = 1 if read == 0 else -(-(limit - examined) * read // max(1, examined)) + 1
            batch, shards = shards[: min(READERS, wanted)], shards[min(READERS, wanted) :]
            read += len(batch)
            found = read_at_once(
                lambda shard: self._read_shard(tenant, shard, tolerate_corrupt=False), batch
            )
            for shard, current in zip(batch, found, strict=True):
                entries = current.entries if current is not None else {}
                flagged = pending.get(shard, set())
                names = sorted({*entries, *flagged})
                if shard == start_shard:
                    names = [name for name in names if name > start_name]
                # A name with a pending marker: its manifest may be newer than its copy (a
                # writer killed between the two), so it is read itself.
                fresh = [name for name in names if name in flagged]
                found_fresh = read_at_once(lambda n: self._copy_of(tenant, n), fresh)
                direct = dict(zip(fresh, found_fresh, strict=True))
                for name in names:
                    if examined == limit:
                        return Page(items, last, examined)
                    examined += 1
                    last = f"{INDEXED}{shard}/{name}"
                    if name in direct:
                        manifest = direct[name]
                    else:
                        manifest = _manifest_of(tenant, shard, name, *entries[name])
                    if manifest is not None and manifest.status == "active":
                        items.append(manifest)
        return Page(items, None, examined)

    def _listing(self, tenant: str) -> _Listing:
        """Everything under the tenant's index folder: one listing (more only when pending
        markers pile up beyond it)."""
        prefix = index_prefix(tenant)
        listing = _Listing()
        after = ""
        while True:
            keys, more = self._backend.list_page(prefix, start_after=after, limit=_LISTING)
            for key in keys:
                if key == index_ready_key(tenant):
                    listing.ready = True
                elif (marked := index_pending_of(key, prefix)) is not None:
                    listing.markers.append((key, *marked))
                elif (shard := index_shard_of(key, prefix)) is not None:
                    listing.shards.append(shard)
            if not more or not keys:
                return listing
            after = keys[-1]

    def _read_shard(self, tenant: str, shard: str, *, tolerate_corrupt: bool) -> Shard | None:
        try:
            data, etag = self._backend.get(index_shard_key(tenant, shard))
        except BlobNotFound:
            return None
        try:
            return Shard.from_json(data, etag, shard)
        except IntegrityError:
            if not tolerate_corrupt:
                raise
            log.warning("listing index of tenant %s: shard %s is corrupt; rewritten", tenant, shard)
            return Shard({}, etag)


@dataclass
class _Listing:
    """What a tenant's index folder holds."""

    ready: bool = False
    shards: list[str] = field(default_factory=list)
    #: (key, adapter name, stamp µs) of each pending marker.
    markers: list[tuple[str, str, int]] = field(default_factory=list)


def _position(after: str) -> tuple[str, str]:
    """(shard, name) of an index position; ("", "") for the start."""
    if not after:
        return "", ""
    shard, sep, name = after.removeprefix(INDEXED).partition("/")
    try:
        valid = after.startswith(INDEXED) and sep and shard_of(check_name(name, "name")) == shard
    except InvalidAdapter:
        valid = False
    if not valid:
        raise InvalidAdapter("invalid listing position")
    return shard, name


def _manifest_of(
    tenant: str, shard: str, name: str, etag: str, obj: dict[str, Any]
) -> Manifest | None:
    """The copy of `name`'s manifest, checked to be that adapter's; None (logged) otherwise."""
    try:
        manifest = Manifest.from_obj(obj, etag or None)
        if (
            check_name(name, "adapter name") != manifest.name
            or manifest.tenant != tenant
            or shard_of(name) != shard
        ):
            raise IntegrityError("a copy of another adapter's manifest")
    except (IntegrityError, InvalidAdapter) as exc:
        log.warning(
            "listing index of tenant %s, shard %s: an entry is skipped (%s)", tenant, shard, exc
        )
        return None
    return manifest
