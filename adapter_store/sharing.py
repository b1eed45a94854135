"""Sharing: grants in the manifest (the truth), and each grantee's share index (the hints).

A grant is a tenant in the owner's manifest `shared_with`. Each grant also has a marker in the
grantee's share index, `tenants/<grantee>/shared/<owner>/<name>` (`keys.share_key`), so that a
tenant finds what is shared with it without reading anyone else's data. A marker is only a
hint: it counts once the owner's manifest confirms it (`Manifest.usable_by`, i.e. `can_use`).

The writes are ordered so that an interruption only ever leaves a marker that confirms nothing
(harmless): `share` writes the marker before the manifest (and once more after it), `unshare`
and a whole revoke remove it after the manifest. `ShareIndex.repair` reconciles both ways.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from adapter_store.backend import BlobBackend
from adapter_store.errors import IntegrityError, StoreError
from adapter_store.keys import share_key, share_of, shared_prefix
from adapter_store.manifests import Manifests, live
from adapter_store.model import Manifest, Page, check_name
from adapter_store.pages import MAX_PAGE, all_pages, list_page

__all__ = ["ShareIndex", "ShareRepair"]

log = logging.getLogger(__name__)

#: The body of a share marker (the key says everything; the body is for people reading a bucket).
_MARKER = b'{"format": 1, "kind": "share-marker"}\n'


@dataclass
class ShareRepair:
    """What `Registry.repair_share_index` found and did."""

    adapters: int = 0
    grants: int = 0
    added: int = 0
    removed: int = 0


class ShareIndex:
    """Grants and share markers over one backend's manifests."""

    def __init__(self, backend: BlobBackend, manifests: Manifests) -> None:
        self._backend = backend
        self._manifests = manifests

    def share(self, tenant: str, name: str, grantee: str) -> Manifest:
        """Let `grantee` use `name`: marker, then manifest, then the marker once more.

        Order of writes: (1) the marker in the grantee's index, (2) the manifest (the truth),
        (3) the marker again. A crash after (1) leaves a marker the manifest does not confirm:
        harmless, and removed by `repair`. (3) covers an unshare of the same grant running
        concurrently, which may delete the marker between (1) and (2). Sharing again rewrites
        the marker: it repairs one grant.
        """
        check_name(grantee, "tenant")
        # Missing or revoked: nothing is written.
        manifest = live(self._manifests.read(tenant, name), name)
        if grantee == tenant:
            return manifest
        marker = share_key(grantee, tenant, name)
        self._backend.put(marker, _MARKER)

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            shared = tuple(sorted({*manifest.shared_with, grantee}))
            return _with_grants(manifest, shared)

        manifest = self._manifests.update(tenant, name, change)
        self._backend.put(marker, _MARKER)
        return manifest

    def unshare(self, tenant: str, name: str, grantee: str) -> Manifest:
        """Stop sharing: the manifest first (from then on nothing confirms the grant), then the
        marker (a crash in between leaves a harmless, unconfirmed marker)."""
        check_name(grantee, "tenant")

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            shared = tuple(t for t in manifest.shared_with if t != grantee)
            return _with_grants(manifest, shared)

        manifest = self._manifests.update(tenant, name, change)
        if grantee != tenant:
            self._settle(grantee, tenant, name)
        return manifest

    def forget(self, owner: str, name: str, grantees: Iterable[str]) -> None:
        """Remove the markers of grants a whole revoke ended (its manifest no longer confirms
        them); a marker left by a failure here is harmless (and removed by `repair`)."""
        for grantee in grantees:
            try:
                self._backend.delete(share_key(grantee, owner, name))
            except StoreError:
                log.warning("could not remove a share marker of a revoked adapter of %s", owner)

    def hints(self, tenant: str) -> frozenset[tuple[str, str]]:
        """(owner, name) of every marker in `tenant`'s share index: hints, not yet confirmed.

        What the gateway checks before it reads anything of another tenant: a name absent here
        is not shared with `tenant`, whether or not it exists (DESIGN invariant 6).
        """
        prefix = shared_prefix(tenant)
        return frozenset(
            all_pages(
                lambda after: list_page(
                    self._backend,
                    prefix,
                    lambda key: share_of(key, prefix),
                    after=after,
                    limit=MAX_PAGE,
                )
            )
        )

    def page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]:
        """Other tenants' live adapters shared with `tenant`, from `tenant`'s share index.

        One listing of the index (at most `limit` markers) and one manifest read per marker;
        each marker is only a hint, confirmed against the owner's manifest (the truth) with
        `can_use`. Nothing outside the index is read, so the cost does not grow with the bucket.
        """
        prefix = shared_prefix(tenant)

        def confirmed(key: str) -> Manifest | None:
            grant = share_of(key, prefix)
            if grant is None:
                return None
            try:
                manifest = self._manifests.read(*grant)
            except IntegrityError:
                log.warning("share index of %s: a shared manifest is unreadable", tenant)
                return None
            return manifest if manifest is not None and manifest.usable_by(tenant) else None

        return list_page(self._backend, prefix, confirmed, after=after, limit=limit)

    def repair(
        self, tenants: Iterable[str], adapters_of: Callable[[str], list[Manifest]]
    ) -> ShareRepair:
        """Make the share index of every tenant in `tenants` agree with the manifests (the
        truth) that `adapters_of(owner)` lists. See `Registry.repair_share_index`."""
        report = ShareRepair()
        tenants = list(tenants)
        markers = {(grantee, *hint) for grantee in tenants for hint in self.hints(grantee)}
        for owner in tenants:
            for manifest in adapters_of(owner):
                report.adapters += 1
                for grantee in manifest.shared_with:
                    if grantee == owner:
                        continue
                    report.grants += 1
                    if (grantee, owner, manifest.name) not in markers:
                        self._backend.put(share_key(grantee, owner, manifest.name), _MARKER)
                        report.added += 1
        for grantee, owner, name in sorted(markers):
            if not self._settle(grantee, owner, name):
                report.removed += 1
        return report

    def _grants(self, owner: str, name: str, grantee: str) -> bool:
        manifest = self._manifests.read(owner, name)
        return manifest is not None and owner != grantee and manifest.usable_by(grantee)

    def _settle(self, grantee: str, owner: str, name: str) -> bool:
        """Make one marker agree with the manifest; True if the grant stands.

        Deleting is followed by a second look at the manifest: a share that committed while
        this ran gets its marker back, so a grant never ends up without one.
        """
        key = share_key(grantee, owner, name)
        if self._grants(owner, name, grantee):
            self._backend.put(key, _MARKER)
            return True
        self._backend.delete(key)
        if self._grants(owner, name, grantee):
            self._backend.put(key, _MARKER)
            return True
        return False


def _with_grants(manifest: Manifest, shared: tuple[str, ...]) -> Manifest:
    """`manifest` with these grants (itself when they are the same: nothing is written)."""
    return manifest if shared == manifest.shared_with else replace(manifest, shared_with=shared)
