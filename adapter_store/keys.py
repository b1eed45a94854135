"""The object layout: every key the store reads or writes, and the parse of every key it lists.

Keys are relative to the backend's root folder or bucket prefix::

    tenants/<tenant>/adapters/<name>/manifest.json
    tenants/<tenant>/adapters/<name>/versions/<sha256>/adapter_config.json
    tenants/<tenant>/adapters/<name>/versions/<sha256>/adapter_model.safetensors
    tenants/<tenant>/adapters/<name>/versions/<sha256>/chat_template.jinja   (optional)
    tenants/<tenant>/adapters/<name>/evaluation-sets/<sha256>.json  (an evaluation set: its
                                                          canonical JSON, named by its sha256)
    tenants/<tenant>/usage.json                          (storage usage: adapter_store.quota)
    tenants/<tenant>/index/<shard>.json                  (listing index: adapter_store.index;
                                                          <shard> 2 hex digits of the name's sha256)
    tenants/<tenant>/index/ready                         (the listing index is complete)
    tenants/<tenant>/index/pending/<name>/<stamp>-<nonce>  (a manifest write whose copy is not
                                                          made yet: adapter_store.index)
    tenants/<grantee>/shared/<owner>/<name>              (share index: one marker per grant)
    events/<stamp>-<nonce>-<tenant>/<name>               (change feed: one per manifest write)

`<stamp>` is the writer's clock in microseconds since the epoch, 16 digits, so that events list
in time order; `<nonce>` is 8 random hex digits (two writers in one microsecond).

`<tenant>`, `<owner>`, `<grantee>` and `<name>` pass `check_name` (letters, digits, '.', '_',
'-'; no '..'), `<sha256>` passes `check_sha` (64 lowercase hex digits: the version's content
address) and the file names are the constants of `VERSION_FILES` (`ADAPTER_FILES` and the
optional `OPTIONAL_FILES`), never a string from a request: each builder below checks
its arguments, so no other string ever reaches a key (InvalidAdapter otherwise). This module is
the only place that spells the layout.

The parsers go the other way, for listings: they return the validated names a listed key holds,
or None (logged) for a key outside the layout, which is then skipped.
"""

from __future__ import annotations

import logging
import re

from adapter_store.errors import InvalidAdapter
from adapter_store.model import VERSION_FILES, check_name, check_sha

__all__ = [
    "EVENTS",
    "TENANTS",
    "adapter_prefix",
    "adapters_prefix",
    "child_name",
    "evaluation_set_key",
    "evaluation_sets_prefix",
    "event_key",
    "event_of",
    "events_from",
    "index_pending_key",
    "index_pending_of",
    "index_prefix",
    "index_ready_key",
    "index_shard_key",
    "index_shard_of",
    "manifest_key",
    "object_key",
    "share_key",
    "share_of",
    "shared_prefix",
    "usage_key",
    "version_file_of",
    "version_prefix",
    "versions_prefix",
]

log = logging.getLogger(__name__)

#: The folder every tenant's objects live under (listed, one level, by `Registry.tenant_page`).
TENANTS = "tenants/"
#: The change feed's folder (adapter_store.changes).
EVENTS = "events/"
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_PENDING_RE = re.compile(r"pending/([^/]+)/([0-9]{16})-[0-9a-f]{8}")
_EVENT_RE = re.compile(r"^events/([0-9]{16})-([0-9a-f]{8})-([^/]+)/([^/]+)$")


def _tenant(tenant: str) -> str:
    return TENANTS + check_name(tenant, "tenant") + "/"


def adapters_prefix(tenant: str) -> str:
    """The folder of `tenant`'s adapters (one sub-folder per adapter name)."""
    return _tenant(tenant) + "adapters/"


def adapter_prefix(tenant: str, name: str) -> str:
    """The folder of one adapter: its manifest and its versions."""
    return adapters_prefix(tenant) + check_name(name, "adapter name") + "/"


def manifest_key(tenant: str, name: str) -> str:
    return adapter_prefix(tenant, name) + "manifest.json"


def versions_prefix(tenant: str, name: str) -> str:
    """The folder of every version of one adapter (one sub-folder per sha256)."""
    return adapter_prefix(tenant, name) + "versions/"


def version_prefix(tenant: str, name: str, sha: str) -> str:
    """The folder of one version's files (content-addressed by its sha256)."""
    return versions_prefix(tenant, name) + f"{check_sha(sha)}/"


def version_file_of(key: str, prefix: str) -> tuple[str, str] | None:
    """(sha256, file name) of a version object `<prefix><sha256>/<file>` (`prefix` from
    `versions_prefix`), both validated; None (logged) for any other key."""
    sha, sep, filename = key[len(prefix) :].partition("/")
    if key.startswith(prefix) and sep and filename in VERSION_FILES:
        try:
            return check_sha(sha), filename
        except InvalidAdapter:
            pass
    log.warning("the store holds a key outside its layout under %s", prefix)
    return None


def object_key(tenant: str, name: str, sha: str, filename: str) -> str:
    """One file of a version: `filename` is one of `VERSION_FILES`, nothing else."""
    if filename not in VERSION_FILES:
        raise InvalidAdapter(f"unsupported file {str(filename)[:80]!r}")
    return version_prefix(tenant, name, sha) + filename


def evaluation_sets_prefix(tenant: str, name: str) -> str:
    """The folder of one adapter's evaluation sets."""
    return adapter_prefix(tenant, name) + "evaluation-sets/"


def evaluation_set_key(tenant: str, name: str, sha: str) -> str:
    """An evaluation set of one adapter (adapter_store.evaluations): named by the sha256 of
    its bytes, never by a user string."""
    return evaluation_sets_prefix(tenant, name) + f"{check_sha(sha)}.json"


def usage_key(tenant: str) -> str:
    """The tenant's storage usage object (adapter_store.quota)."""
    return _tenant(tenant) + "usage.json"


def index_prefix(tenant: str) -> str:
    """The folder of the tenant's listing index (adapter_store.index)."""
    return _tenant(tenant) + "index/"


def index_shard_key(tenant: str, shard: str) -> str:
    """One shard of the listing index: `shard` is 2 lowercase hex digits."""
    if not _SHARD_RE.fullmatch(shard):
        raise InvalidAdapter("invalid listing index shard")
    return index_prefix(tenant) + f"{shard}.json"


def index_ready_key(tenant: str) -> str:
    """The marker that the tenant's listing index is complete."""
    return index_prefix(tenant) + "ready"


def index_pending_key(tenant: str, name: str, stamp_us: int, nonce: str) -> str:
    """The marker of one manifest write of `name` whose listing-index copy is not made yet."""
    if not 0 <= stamp_us < 10**16 or not re.fullmatch(r"[0-9a-f]{8}", nonce):
        raise InvalidAdapter("invalid listing index marker")
    return (
        index_prefix(tenant) + f"pending/{check_name(name, 'adapter name')}/{stamp_us:016d}-{nonce}"
    )


def index_pending_of(key: str, prefix: str) -> tuple[str, int] | None:
    """(name, stamp_us) of a pending marker `<prefix>pending/<name>/<stamp>-<nonce>`; None for
    any other key (logged when it is under `pending/` but outside the layout)."""
    rest = key[len(prefix) :]
    if not (key.startswith(prefix) and rest.startswith("pending/")):
        return None
    match = _PENDING_RE.fullmatch(rest)
    if match is not None:
        try:
            return check_name(match.group(1), "adapter name"), int(match.group(2))
        except InvalidAdapter:
            pass
    log.warning("the store holds a key outside its layout under %s", prefix)
    return None


def index_shard_of(key: str, prefix: str) -> str | None:
    """The shard (2 hex digits) of a key `<prefix><shard>.json` (`prefix` from
    `index_prefix`); None for the ready and pending markers, and None (logged) for any other
    key."""
    rest = key[len(prefix) :]
    if key.startswith(prefix):
        if rest == "ready" or rest.startswith("pending/"):
            return None
        shard = rest.removesuffix(".json")
        if rest.endswith(".json") and _SHARD_RE.fullmatch(shard):
            return shard
    log.warning("the store holds a key outside its layout under %s", prefix)
    return None


def shared_prefix(grantee: str) -> str:
    """The grantee's share index: one marker per grant, `<owner>/<name>`."""
    return _tenant(grantee) + "shared/"


def share_key(grantee: str, owner: str, name: str) -> str:
    """The marker of one grant, in the grantee's share index."""
    return (
        shared_prefix(grantee) + f"{check_name(owner, 'tenant')}/{check_name(name, 'adapter name')}"
    )


def child_name(key: str, prefix: str) -> str | None:
    """The validated name of the folder `key` (`<prefix><name>/`, as a folder-level listing
    returns it); None for anything outside the layout."""
    rest = key[len(prefix) :]
    if not (key.startswith(prefix) and rest.endswith("/")):
        return None  # an object beside the folders, not one of them
    try:
        return check_name(rest[:-1], "name")
    except InvalidAdapter:
        log.warning("the store holds a key outside its layout under %s", prefix)
        return None


def share_of(key: str, prefix: str) -> tuple[str, str] | None:
    """(owner, name) of a marker key `<prefix><owner>/<name>`, both validated; None for
    anything else."""
    owner, sep, name = key[len(prefix) :].partition("/")
    if key.startswith(prefix) and sep and "/" not in name:
        try:
            return check_name(owner, "tenant"), check_name(name, "adapter name")
        except InvalidAdapter:
            pass
    log.warning("the store holds a key outside its layout under %s", prefix)
    return None


def event_key(stamp_us: int, nonce: str, tenant: str, name: str) -> str:
    """The change-feed event of one manifest write: `stamp_us` the writer's clock (µs)."""
    if not 0 <= stamp_us < 10**16 or not re.fullmatch(r"[0-9a-f]{8}", nonce):
        raise InvalidAdapter("invalid change-feed event")
    return (
        f"{EVENTS}{stamp_us:016d}-{nonce}-{check_name(tenant, 'tenant')}/"
        f"{check_name(name, 'adapter name')}"
    )


def events_from(stamp_us: int) -> str:
    """The listing position (StartAfter) before every event stamped `stamp_us` or later."""
    return f"{EVENTS}{max(0, min(stamp_us, 10**16 - 1)):016d}"


def event_of(key: str) -> tuple[int, str, str] | None:
    """(stamp_us, tenant, name) of an event key, names validated; None (logged) for any other
    key under `EVENTS`."""
    match = _EVENT_RE.fullmatch(key)
    if match is not None:
        try:
            tenant = check_name(match.group(3), "tenant")
            name = check_name(match.group(4), "adapter name")
        except InvalidAdapter:
            pass
        else:
            return int(match.group(1)), tenant, name
    log.warning("the store holds a key outside its layout under %s", EVENTS)
    return None
