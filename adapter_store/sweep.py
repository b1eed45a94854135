"""The orphan sweeper: delete version objects that no manifest names, and never an upload's.

A publish writes a version's objects first and its manifest last (`Registry.publish`); a crash
in between leaves `versions/<sha>/` objects that no manifest names. So does a revocation whose
purge was interrupted (the sha is in the manifest's `revoked`, not in its `versions`).
`sweep_orphans` finds and deletes them, one adapter at a time, in paged listings.

Why it never deletes what a concurrent upload is about to publish. An upload writes its
objects from the moment it starts, t_s, and publishes its manifest at t_p, with
t_p - t_s < D, the longest an upload takes (`upload_timeout_s` bounds the gateway's; the
caller's `min_age_s` must exceed it). For each page the sweeper, in this order:

1. reads the clock, `now` (before the listing);
2. lists the page's objects with their last-modified times `m` (the store's clock);
3. reads the adapter's manifest (after the listing, at time M);
4. keeps every object whose sha the manifest's `versions` names, and every object with
   `now - m <= min_age_s`; for each other one it asks the store again for its last-modified
   time and deletes it only if that too is older than `min_age_s`.

Take an object of an upload that the manifest read at M did not show: the upload had not
published by M, so it started after M - D, and its objects were written at m >= t_s > M - D
> now - D (now < M, read before the listing). Hence now - m < D <= min_age_s: step 4 keeps it.
An upload that published before M is in the manifest read at M (manifest reads are strongly
consistent: read-after-write on S3, MinIO, SeaweedFS and the local folder). Listing first and
reading the manifest second is what makes this hold; the other order would let an upload
publish between the manifest read and the listing, its objects unknown to the sweeper's
manifest and, if the upload was slow, older than a small `min_age_s`.

The second look in step 4 is for the one other writer of an old key: a re-upload of the same
content (the same sha, so the same keys) rewrites objects that an earlier, crashed upload left;
its fresh last-modified time keeps them. What is left is a window of one request (between that
second look and the delete) in which a re-upload of byte-identical orphaned content could lose
an object; `Registry.publish` checks its objects after writing the manifest, and writes a
missing one again, so it closes that too unless both land inside the same few milliseconds.

Clocks: `now` is this host's, `m` the store's. A store clock ahead of this host only makes
objects look younger (safe); one behind makes them look older by the skew, so `min_age_s`
must exceed D by more than any skew (the default of `lora-gateway store sweep` is a day).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from adapter_store.backend import BlobBackend
from adapter_store.errors import BlobNotFound, IntegrityError, InvalidAdapter
from adapter_store.keys import (
    TENANTS,
    adapters_prefix,
    child_name,
    version_file_of,
    versions_prefix,
)
from adapter_store.model import Manifest
from adapter_store.pages import MAX_PAGE

__all__ = ["SweepReport", "sweep_orphans"]

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep found: `orphans` are the keys deleted (or, dry run, that would be)."""

    adapters: int = 0
    objects: int = 0
    orphans: list[str] = field(default_factory=list)
    #: Orphans younger than `min_age_s`, kept (an upload may be about to publish them).
    young: int = 0
    dry_run: bool = False


def _folders(backend: BlobBackend, prefix: str) -> Iterator[str]:
    """The validated names of the folders under `prefix`, every page."""
    after = ""
    while True:
        keys, more = backend.list_page(prefix, start_after=after, limit=MAX_PAGE, folders=True)
        for key in keys:
            name = child_name(key, prefix)
            if name is not None:
                yield name
        if not more or not keys:
            return
        after = keys[-1]


def sweep_orphans(
    backend: BlobBackend,
    read_manifest: Callable[[str, str], Manifest | None],
    *,
    tenant: str | None = None,
    min_age_s: float,
    dry_run: bool = False,
    page_size: int = MAX_PAGE,
    clock: Callable[[], float] = time.time,
) -> SweepReport:
    """Delete the version objects of `tenant`'s adapters (None: every tenant's) that their
    manifest does not name and that are older than `min_age_s` (see the module docstring for
    why this never deletes an upload in progress). An adapter whose manifest cannot be read
    is skipped, never swept. With `dry_run` nothing is deleted."""
    if isinstance(min_age_s, bool) or not isinstance(min_age_s, int | float):
        raise InvalidAdapter("min_age_s must be a number of seconds")
    if not math.isfinite(min_age_s) or min_age_s <= 0:
        raise InvalidAdapter("min_age_s must be a finite number of seconds > 0")
    report = SweepReport(dry_run=dry_run)
    tenants = [tenant] if tenant is not None else list(_folders(backend, TENANTS))
    for owner in tenants:
        for name in _folders(backend, adapters_prefix(owner)):
            report.adapters += 1
            _sweep_adapter(
                backend, read_manifest, owner, name, min_age_s, dry_run, page_size, clock, report
            )
    return report


def _sweep_adapter(
    backend: BlobBackend,
    read_manifest: Callable[[str, str], Manifest | None],
    tenant: str,
    name: str,
    min_age_s: float,
    dry_run: bool,
    page_size: int,
    clock: Callable[[], float],
    report: SweepReport,
) -> None:
    prefix = versions_prefix(tenant, name)
    after = ""
    while True:
        now = clock()  # 1. before the listing
        stamped, more = backend.list_page_modified(prefix, start_after=after, limit=page_size)
        if not stamped:
            return
        after = stamped[-1][0]
        report.objects += len(stamped)
        try:
            manifest = read_manifest(tenant, name)  # 3. after the listing
        except IntegrityError:
            log.warning("sweep: skipped %s/%s, its manifest cannot be read", tenant, name)
            return
        named = set() if manifest is None else set(manifest.versions)
        for key, modified in stamped:
            parsed = version_file_of(key, prefix)
            if parsed is None or parsed[0] in named:
                continue
            if now - modified <= min_age_s:
                report.young += 1
                continue
            try:
                fresh = backend.modified(key)  # 4. a second look: rewritten since?
            except BlobNotFound:
                continue
            if clock() - fresh <= min_age_s:
                report.young += 1
                continue
            report.orphans.append(key)
            if not dry_run:
                backend.delete(key)
                log.info("sweep: deleted orphaned object %s", key)
        if not more:
            return
