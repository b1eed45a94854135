"""The adapter registry: one implementation of `AdapterStore` over a tiny blob interface.

`Registry` holds all the logic (validation, versions, aliases, sharing, revocation, composition);
a `BlobBackend` only stores bytes under keys: `LocalBackend` (a folder) and `S3Backend` (S3,
MinIO) implement it with the same semantics, so both behave the same.

Key layout (keys are relative to the backend's root folder or bucket prefix)::

    <prefix>/tenants/<tenant>/adapters/<name>/manifest.json
    <prefix>/tenants/<tenant>/adapters/<name>/versions/<sha256>/adapter_config.json
    <prefix>/tenants/<tenant>/adapters/<name>/versions/<sha256>/adapter_model.safetensors
    <prefix>/tenants/<grantee>/shared/<owner>/<name>        (share index: one marker per grant)

`<tenant>` and `<name>` pass `check_name` (letters, digits, '.', '_', '-'; no '..'), `<sha256>`
is 64 lowercase hex digits (the version's content address) and the file names are the two
constants: no other string ever reaches a key.

Manifest writes are read (with its etag) -> modify -> conditional put (If-Match the etag, or
If-None-Match "*" when creating); a lost race re-reads and retries, a bounded number of times
with jitter, then raises Conflict. So two concurrent writers never lose an update.

Publishing is atomic: a version's objects are written first and the manifest is updated last;
if anything fails the objects written are deleted and nothing becomes visible.

Sharing: the manifest's `shared_with` is the truth; the grantee's share index (a small marker
per grant) is a hint that lets a tenant find what is shared with it without reading anyone
else's data, and every hint is confirmed against the owner's manifest by `can_use` before it
counts. `share` writes the marker before the manifest, `unshare` and a whole revoke remove it
after, so an interruption only ever leaves a marker that confirms nothing (harmless);
`repair_share_index` reconciles both ways. Listings are paged: one backend listing per page.

Uploads and compositions spool into `Spool` (one folder, one byte budget: `adapter_store.spool`),
reserving what the header declares before any byte is written. With a `Quota`, a publish charges
the tenant's usage object first (`tenants/<tenant>/usage.json`, conditional writes:
`adapter_store.quota` explains the choice) and is refused beyond the quota.

Compositions are bounded before anything is fetched (number of parts, sum of ranks, stored bytes
of the parts, from the manifests), and computed one module at a time
(`adapter_store.compose.write_composition`), so their memory is bounded by one module's
tensors plus the validation of the result (the same as an upload of that size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, TypeVar

from adapter_store.compose import (
    Array,
    ModuleKey,
    plan_composition,
    tensor_name,
    write_composition,
)
from adapter_store.errors import (
    AdapterNotFound,
    BlobNotFound,
    CapacityExceeded,
    Conflict,
    IntegrityError,
    InvalidAdapter,
    PreconditionFailed,
    Quarantined,
    StoreError,
)
from adapter_store.model import (
    ADAPTER_FILES,
    CONFIG_FILE,
    DEFAULT_ALIAS,
    WEIGHTS_FILE,
    AdapterRef,
    AdapterVersion,
    BaseModelSpec,
    FileEntry,
    Limits,
    Manifest,
    Page,
    check_name,
    check_sha,
    not_found,
    utc_now,
    version_sha,
)
from adapter_store.quota import Quota, Usage
from adapter_store.spool import Spool, SpoolSpace, format_bytes
from adapter_store.validate import (
    load_tensors,
    parse_config,
    read_safetensors_header,
    validate_adapter,
)

__all__ = [
    "MAX_PAGE",
    "AdapterStore",
    "BlobBackend",
    "Registry",
    "ShareRepair",
    "Upload",
    "sha256_file",
]

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_T = TypeVar("_T")
#: Keys of a listing (an alias: inside the backend classes, `list` is their method).
Keys = list[str]


class BlobBackend(Protocol):
    """Bytes under keys. Keys are '/'-separated and built by `Registry` only.

    Errors: BlobNotFound (no such key), PreconditionFailed (a conditional put lost),
    StoreUnavailable (unreachable / timed out); never a third-party exception.
    """

    def get(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and etag."""
        ...

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        """Like `get`, but None when the object's etag still equals `etag`."""
        ...

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        """Store `data`; with if_match only over that etag, with if_none_match only if absent."""
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Store a local file (multipart where the backend has it)."""
        ...

    def download_file(self, key: str, dest: Path) -> None:
        """Write the object to `dest` (which the caller then verifies)."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (which ends with '/'), recursively."""
        ...

    def list_page(
        self, prefix: str, *, start_after: str = "", limit: int = 1000, folders: bool = False
    ) -> tuple[Keys, bool]:
        """Up to `limit` keys under `prefix` greater than `start_after`, in byte order, and
        whether more follow: one request to the store.

        With `folders`, only the level under `prefix`: its keys, and each sub-folder once, as
        `<prefix><child>/` (a `start_after` of that form skips the whole sub-folder).
        """
        ...


class AdapterStore(Protocol):
    """What the gateway codes against. Methods are synchronous: run them in a thread."""

    spec: BaseModelSpec
    limits: Limits
    spool: Spool

    def begin_upload(
        self,
        tenant: str,
        name: str,
        declared: Sequence[FileEntry],
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
    ) -> Upload: ...

    def upload_dir(
        self,
        tenant: str,
        name: str,
        path: Path,
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
    ) -> AdapterVersion: ...

    def usage(self, tenant: str) -> Usage: ...

    def get_manifest(self, tenant: str, name: str) -> Manifest: ...

    def get_manifest_if_changed(self, tenant: str, name: str, etag: str) -> Manifest | None: ...

    def list_adapters(self, tenant: str) -> list[Manifest]: ...

    def list_tenants(self) -> list[str]: ...

    def list_shared_with(self, tenant: str) -> list[Manifest]: ...

    def adapter_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]: ...

    def shared_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]: ...

    def tenant_page(self, *, after: str = "", limit: int = 100) -> Page[str]: ...

    def share_hints(self, tenant: str) -> frozenset[tuple[str, str]]: ...

    def resolve(self, tenant: str, ref: AdapterRef) -> AdapterVersion: ...

    def set_alias(
        self, tenant: str, name: str, alias: str, target: str, expected: str | None = None
    ) -> Manifest: ...

    def remove_alias(self, tenant: str, name: str, alias: str) -> Manifest: ...

    def share(self, tenant: str, name: str, grantee: str) -> Manifest: ...

    def unshare(self, tenant: str, name: str, grantee: str) -> Manifest: ...

    def revoke(
        self, tenant: str, name: str, version: str | None = None, *, delete_objects: bool = True
    ) -> list[str]: ...

    def purge(self, tenant: str, name: str, shas: Iterable[str]) -> None: ...

    def quarantine(self, tenant: str, name: str, sha: str, reason: str) -> Manifest: ...

    def compose(
        self,
        tenant: str,
        name: str,
        parts: Sequence[tuple[AdapterRef, float]],
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
    ) -> AdapterVersion: ...

    def fetch_file(self, version: AdapterVersion, filename: str, dest: Path) -> None: ...


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read through one reused 256 KiB buffer."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _adapter_prefix(tenant: str, name: str) -> str:
    return f"tenants/{check_name(tenant, 'tenant')}/adapters/{check_name(name, 'adapter name')}/"


def _manifest_key(tenant: str, name: str) -> str:
    return _adapter_prefix(tenant, name) + "manifest.json"


def _usage_key(tenant: str) -> str:
    return f"tenants/{check_name(tenant, 'tenant')}/usage.json"


def _version_prefix(tenant: str, name: str, sha: str) -> str:
    return _adapter_prefix(tenant, name) + f"versions/{check_sha(sha)}/"


def _object_key(tenant: str, name: str, sha: str, filename: str) -> str:
    if filename not in ADAPTER_FILES:
        raise InvalidAdapter(f"unsupported file {filename[:80]!r}")
    return _version_prefix(tenant, name, sha) + filename


def _shared_prefix(grantee: str) -> str:
    return f"tenants/{check_name(grantee, 'tenant')}/shared/"


def _share_key(grantee: str, owner: str, name: str) -> str:
    """The marker of one grant, in the grantee's share index."""
    return (
        _shared_prefix(grantee)
        + f"{check_name(owner, 'tenant')}/{check_name(name, 'adapter name')}"
    )


#: The body of a share marker (the key says everything; the body is for people reading a bucket).
_MARKER = b'{"format": 1, "kind": "share-marker"}\n'
#: The largest page a listing returns.
MAX_PAGE = 1000


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidAdapter(f"page size must be 1..{MAX_PAGE}")
    return limit


def _start(prefix: str, after: str) -> str:
    """The backend's start position for a listing position `after` (a key relative to
    `prefix`, as returned in `Page.next_after`); only compared with keys, never a path."""
    if (
        not isinstance(after, str)
        or len(after) > 300
        or not (after.isascii() and after.isprintable())
    ):
        raise InvalidAdapter("invalid listing position")
    return prefix + after if after else ""


def _next(keys: list[str], prefix: str, more: bool) -> str | None:
    return keys[-1][len(prefix) :] if more and keys else None


def _child(key: str, prefix: str, *, folder: bool) -> str | None:
    """The validated name one level under `prefix`; None for anything outside the layout."""
    rest = key[len(prefix) :]
    if folder:
        if not rest.endswith("/"):
            return None
        rest = rest[:-1]
    try:
        return check_name(rest, "name")
    except InvalidAdapter:
        log.warning("the store holds a key outside its layout under %s", prefix)
        return None


def _share_of(key: str, prefix: str) -> tuple[str, str] | None:
    """(owner, name) of a marker key, both validated; None for anything else."""
    owner, sep, name = key[len(prefix) :].partition("/")
    try:
        if sep and "/" not in name:
            return check_name(owner, "tenant"), check_name(name, "adapter name")
    except InvalidAdapter:
        pass
    log.warning("the store holds a key outside its layout under %s", prefix)
    return None


def _all_pages(page: Callable[[str], Page[_T]]) -> list[_T]:
    items: list[_T] = []
    after = ""
    while True:
        current = page(after)
        items.extend(current.items)
        if current.next_after is None:
            return items
        after = current.next_after


@dataclass
class ShareRepair:
    """What `Registry.repair_share_index` found and did."""

    adapters: int = 0
    grants: int = 0
    added: int = 0
    removed: int = 0


@dataclass
class _Incoming:
    declared: FileEntry
    path: Path
    written: int = 0
    sha256: str | None = None


class Upload:
    """An upload in progress: `write` chunks file by file in the declared order, then `commit`.

    Bytes are spooled to a private folder of the spool (whose budget already holds the declared
    sizes), hashed and counted as they arrive; any error aborts the upload and gives the space
    back. Use it as a context manager to abort on an exception.
    """

    def __init__(
        self,
        registry: Registry,
        tenant: str,
        name: str,
        declared: Sequence[FileEntry],
        *,
        created_by: str,
        aliases: Sequence[str],
        description: str,
        spool: Path,
        space: SpoolSpace | None = None,
        quota: Quota | None = None,
    ) -> None:
        self._registry = registry
        self._space = space
        self._quota = quota
        self._tenant = tenant
        self._name = name
        self._created_by = created_by
        self._aliases = tuple(aliases)
        self._description = description
        self._spool = spool
        self._files = [_Incoming(entry, spool / entry.filename) for entry in declared]
        self._index = 0
        self._handle: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._closed = False

    def __enter__(self) -> Upload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, filename: str, chunk: bytes) -> None:
        if self._closed:
            raise InvalidAdapter("the upload is already committed or aborted")
        try:
            current = self._advance_to(filename)
            if current.written + len(chunk) > current.declared.size:
                raise InvalidAdapter(
                    f"{filename} is larger than its declared size of {current.declared.size} bytes"
                )
            if self._handle is None:
                self._handle = current.path.open("wb")
            self._handle.write(chunk)
            self._digest.update(chunk)
            current.written += len(chunk)
        except BaseException:
            self.abort()
            raise

    def _advance_to(self, filename: str) -> _Incoming:
        current = self._files[self._index]
        if filename == current.declared.filename:
            return current
        position = self._index + 1
        if (
            position < len(self._files)
            and self._files[position].declared.filename == filename
            and current.written == current.declared.size
        ):
            self._finish_current()
            self._index = position
            return self._files[position]
        raise InvalidAdapter(
            f"unexpected chunk for {filename[:80]!r}: files must be sent one after the other in "
            f"the declared order, and {current.declared.filename} has "
            f"{current.written} of {current.declared.size} bytes"
        )

    def _finish_current(self) -> None:
        current = self._files[self._index]
        if self._handle is None:
            current.path.touch()
        else:
            self._handle.flush()
            self._handle.close()
            self._handle = None
        current.sha256 = self._digest.hexdigest()
        self._digest = hashlib.sha256()

    def commit(self) -> AdapterVersion:
        """Verify, validate and publish; the new version becomes `latest` (and `aliases`)."""
        if self._closed:
            raise InvalidAdapter("the upload is already committed or aborted")
        try:
            self._finish_current()
            for incoming in self._files[self._index + 1 :]:
                incoming.path.touch()
                incoming.sha256 = hashlib.sha256(b"").hexdigest()
            for incoming in self._files:
                entry = incoming.declared
                if incoming.written != entry.size:
                    raise InvalidAdapter(
                        f"upload incomplete: {entry.filename} has {incoming.written} of "
                        f"{entry.size} declared bytes"
                    )
                if incoming.sha256 != entry.sha256:
                    raise InvalidAdapter(
                        f"sha256 mismatch for {entry.filename}: declared {entry.sha256}, "
                        f"received {incoming.sha256}"
                    )
            return self._registry._publish(
                self._tenant,
                self._name,
                self._spool,
                created_by=self._created_by,
                aliases=self._aliases,
                description=self._description,
                space=self._space,
                quota=self._quota,
            )
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop everything received; nothing was published. Safe to call more than once."""
        self._closed = True
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        shutil.rmtree(self._spool, ignore_errors=True)
        if self._space is not None:
            self._space.release()


class Registry:
    """`AdapterStore` over a `BlobBackend`, for one deployment's base model."""

    def __init__(
        self,
        backend: BlobBackend,
        spec: BaseModelSpec,
        limits: Limits | None = None,
        *,
        spool_dir: Path | None = None,
        spool: Spool | None = None,
        max_retries: int = 10,
    ) -> None:
        self.backend = backend
        self.spec = spec
        self.limits = limits or Limits()
        #: Where uploads and compositions spool, and their byte budget (none by default).
        self.spool = spool if spool is not None else Spool(spool_dir)
        self._max_retries = max_retries

    # --- uploads ------------------------------------------------------------------------------

    def begin_upload(
        self,
        tenant: str,
        name: str,
        declared: Sequence[FileEntry],
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
    ) -> Upload:
        """Check the header and reserve what it declares, before any byte is received.

        Refused here (nothing spooled): a bad name or file list, a declared size above the cap
        (CapacityExceeded), the tenant's quota (QuotaExceeded, with `quota`), a full spool
        (SpoolFull). The quota is charged for good at `commit`."""
        check_name(tenant, "tenant")
        check_name(name, "adapter name")
        aliases = tuple(check_name(alias, "alias") for alias in aliases)
        self._check_text(created_by, description)
        entries = self._check_declared(declared)
        declared_bytes = sum(entry.size for entry in entries)
        if quota is not None:
            self._check_quota(tenant, name, declared_bytes, quota, "this upload")
        space = self.spool.reserve(declared_bytes, "this upload")
        try:
            spool = self.spool.folder("upload-")
        except BaseException:
            space.release()
            raise
        return Upload(
            self,
            tenant,
            name,
            entries,
            created_by=created_by,
            aliases=aliases,
            description=description,
            spool=spool,
            space=space,
            quota=quota,
        )

    def _check_quota(self, tenant: str, name: str, nbytes: int, quota: Quota, what: str) -> None:
        """Refuse early (before spooling) what the quota cannot take; `_publish` charges."""
        manifest = self._read(tenant, name)
        new_name = manifest is None or manifest.status != "active"
        self.usage(tenant).check(quota, nbytes, 1 if new_name else 0, what)

    def _check_text(self, created_by: object, description: object) -> None:
        if not isinstance(created_by, str) or len(created_by) > 256:
            raise InvalidAdapter("created_by must be a string of at most 256 characters")
        if not isinstance(description, str) or len(description) > self.limits.max_description_chars:
            raise InvalidAdapter(
                f"description must be a string of at most {self.limits.max_description_chars} "
                "characters"
            )

    def _check_declared(self, declared: Sequence[FileEntry]) -> list[FileEntry]:
        by_name: dict[str, FileEntry] = {}
        for entry in declared:
            if entry.filename not in ADAPTER_FILES:
                raise InvalidAdapter(
                    f"unsupported file {str(entry.filename)[:80]!r}: an adapter is exactly "
                    f"{CONFIG_FILE} and {WEIGHTS_FILE} (.bin, .pt and other pickle formats are "
                    "never loaded)"
                )
            if entry.filename in by_name:
                raise InvalidAdapter(f"file {entry.filename} is declared twice")
            if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
                raise InvalidAdapter(f"file {entry.filename} declares an invalid size")
            cap = (
                self.limits.max_config_bytes
                if entry.filename == CONFIG_FILE
                else self.limits.max_file_bytes
            )
            if entry.size > cap:
                raise CapacityExceeded(
                    f"file {entry.filename} declares {entry.size} bytes, above the cap of {cap}"
                )
            check_sha(entry.sha256, f"sha256 of {entry.filename}")
            by_name[entry.filename] = replace(entry, sha256=check_sha(entry.sha256))
        for filename in ADAPTER_FILES:
            if filename not in by_name:
                raise InvalidAdapter(f"missing file {filename}")
        return [by_name[filename] for filename in ADAPTER_FILES]

    def upload_dir(
        self,
        tenant: str,
        name: str,
        path: Path,
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
    ) -> AdapterVersion:
        """Upload a local PEFT adapter folder (a README.md in it is ignored)."""
        files = sorted(p for p in Path(path).iterdir() if p.name != "README.md")
        for file in files:
            if file.is_symlink() or not file.is_file():
                raise InvalidAdapter(f"{file.name[:80]!r} is not a regular file")
        declared = [FileEntry(f.name, f.stat().st_size, sha256_file(f)) for f in files]
        with self.begin_upload(
            tenant,
            name,
            declared,
            created_by=created_by,
            aliases=aliases,
            description=description,
            quota=quota,
        ) as upload:
            for filename in ADAPTER_FILES:
                with (Path(path) / filename).open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        upload.write(filename, chunk)
            return upload.commit()

    def _publish(
        self,
        tenant: str,
        name: str,
        folder: Path,
        *,
        created_by: str,
        aliases: Sequence[str],
        description: str,
        composed_from: tuple[tuple[str, float], ...] = (),
        space: SpoolSpace | None = None,
        quota: Quota | None = None,
    ) -> AdapterVersion:
        """Validate the two files in `folder`, store them, then add the version.

        With `quota`, the tenant's usage is charged before anything is stored (QuotaExceeded
        beyond it) and refunded if the publish fails or added nothing new."""
        paths = {filename: folder / filename for filename in ADAPTER_FILES}
        validated = validate_adapter(paths, self.spec, self.limits)
        for filename, data in validated.rewritten.items():
            if space is not None:
                space.grow(len(data) - paths[filename].stat().st_size, "rewriting this adapter")
            paths[filename].write_bytes(data)
        files = tuple(
            FileEntry(filename, path.stat().st_size, sha256_file(path))
            for filename, path in paths.items()
        )
        sha = version_sha(files)
        version = AdapterVersion(
            tenant=tenant,
            name=name,
            sha=sha,
            files=files,
            rank=validated.rank,
            alpha=validated.alpha,
            target_modules=validated.target_modules,
            base_model=validated.base_model,
            dtype=validated.dtype,
            created_at=utc_now(),
            created_by=created_by,
            use_rslora=validated.use_rslora,
            description=description,
            composed_from=composed_from,
        )
        existing = self._read(tenant, name)
        # What this publish adds, charged before anything is stored (and refused beyond the
        # quota); corrected to what it really added once the manifest is written.
        charged = [0, 0]
        if existing is None or sha not in existing.versions:
            charged = [version.total_bytes, 0 if _is_live(existing) else 1]
        counted = self._change_usage(
            tenant, charged[0], charged[1], quota, "this adapter", create=quota is not None
        )
        added = [0, 0]
        written: list[str] = []
        try:
            if existing is None or sha not in existing.versions:
                for entry in files:
                    key = _object_key(tenant, name, sha, entry.filename)
                    written.append(key)
                    self.backend.put_file(key, paths[entry.filename])

            def add(current: Manifest | None) -> Manifest:
                base = current or Manifest(tenant=tenant, name=name)
                if sha in base.revoked:
                    raise Conflict(
                        f"this exact content was revoked as {version.version_id} of {name!r} "
                        "and cannot be published again"
                    )
                known = base.versions.get(sha)
                if known is not None and known.status == "quarantined":
                    raise Quarantined(
                        f"this exact content is quarantined as {version.version_id} of {name!r}"
                        f" ({known.quarantine_reason}) and cannot be published again"
                    )
                added[:] = [
                    0 if sha in base.versions else version.total_bytes,
                    0 if _is_live(current) else 1,
                ]
                versions = dict(base.versions)
                versions.setdefault(sha, version)
                new_aliases = dict(base.aliases)
                for alias in (DEFAULT_ALIAS, *aliases):
                    new_aliases[alias] = sha
                return replace(base, status="active", versions=versions, aliases=new_aliases)

            published = self._update(tenant, name, add).versions[sha]
        except BaseException:
            self._clean_up(tenant, name, sha, written)
            if counted and any(charged):
                self._refund(tenant, charged[0], charged[1])
            raise
        if counted and added != charged:
            # A concurrent writer published the same bytes or created the name meanwhile: make
            # the usage say what this publish really added.
            self._change_usage(tenant, added[0] - charged[0], added[1] - charged[1], None, "")
        return published

    def _clean_up(self, tenant: str, name: str, sha: str, keys: Iterable[str]) -> None:
        """Delete objects of a failed publish unless a manifest now refers to them."""
        try:
            current = self._read(tenant, name)
            if current is not None and sha in current.versions:
                return
            for key in keys:
                self.backend.delete(key)
        except StoreError:
            log.warning("could not clean up objects of a failed upload under %s", tenant)

    # --- usage and quotas (adapter_store.quota) ------------------------------------------------

    def usage(self, tenant: str) -> Usage:
        """The tenant's stored bytes and adapters. Before the tenant's first publish with a
        quota there is no usage object: then counted from its manifests (and not stored, so a
        refused upload stores nothing)."""
        stored = self._read_usage(tenant, create=False)
        return stored if stored is not None else self._count_usage(tenant)

    def recount_usage(self, tenant: str) -> Usage:
        """Recompute the tenant's usage from its manifests and store it (a repair, e.g. after a
        crash between a charge and its manifest); a bounded scan of that tenant only."""
        counted = self._count_usage(tenant)
        for attempt in range(_USAGE_RETRIES):
            current = self._read_usage(tenant, create=False)
            try:
                etag = self.backend.put(
                    _usage_key(tenant),
                    counted.to_json(),
                    if_match=current.etag if current is not None else None,
                    if_none_match=current is None,
                )
                return replace(counted, etag=etag)
            except (PreconditionFailed, BlobNotFound):
                _backoff(attempt)
        raise Conflict(f"too many concurrent updates of the usage of tenant {tenant!r}; try again")

    def _count_usage(self, tenant: str) -> Usage:
        live = self.list_adapters(tenant)
        return Usage(
            tenant,
            sum(v.total_bytes for m in live for v in m.versions.values()),
            len(live),
        )

    def _read_usage(self, tenant: str, *, create: bool) -> Usage | None:
        key = _usage_key(tenant)
        for attempt in range(_USAGE_RETRIES):
            try:
                data, etag = self.backend.get(key)
            except BlobNotFound:
                if not create:
                    return None
                counted = self._count_usage(tenant)
                try:
                    etag = self.backend.put(key, counted.to_json(), if_none_match=True)
                except PreconditionFailed:
                    _backoff(attempt)
                    continue  # created meanwhile by another writer: read that one
                return replace(counted, etag=etag)
            usage = Usage.from_json(data, etag)
            if usage.tenant != tenant:
                raise IntegrityError(f"stored usage object of {tenant!r} names another tenant")
            return usage
        raise Conflict(f"too many concurrent updates of the usage of tenant {tenant!r}; try again")

    def _change_usage(
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
        key = _usage_key(tenant)
        for attempt in range(_USAGE_RETRIES):
            current = self._read_usage(tenant, create=create)
            if current is None:
                return False
            if quota is not None:
                current.check(quota, nbytes, adapters, what)
            if nbytes == 0 and adapters == 0:
                return True
            try:
                self.backend.put(
                    key, current.plus(nbytes, adapters).to_json(), if_match=current.etag
                )
                return True
            except (PreconditionFailed, BlobNotFound):
                _backoff(attempt)
        raise Conflict(f"too many concurrent updates of the usage of tenant {tenant!r}; try again")

    def _refund(self, tenant: str, nbytes: int, adapters: int) -> None:
        """Give bytes and names back (best effort: a failure leaves usage too high, not low)."""
        try:
            self._change_usage(tenant, -nbytes, -adapters, None, "")
        except StoreError as exc:
            log.warning("could not refund the usage of tenant %s: %s", tenant, type(exc).__name__)

    # --- manifests ----------------------------------------------------------------------------

    def _read(self, tenant: str, name: str) -> Manifest | None:
        try:
            data, etag = self.backend.get(_manifest_key(tenant, name))
        except BlobNotFound:
            return None
        return Manifest.from_json(data, etag)

    def _live(self, manifest: Manifest | None, what: str) -> Manifest:
        if manifest is None or manifest.status != "active":
            raise not_found(what)
        return manifest

    def _update(
        self, tenant: str, name: str, change: Callable[[Manifest | None], Manifest]
    ) -> Manifest:
        """Read-modify-write the manifest with a conditional put, retrying lost races."""
        key = _manifest_key(tenant, name)
        for attempt in range(self._max_retries):
            current = self._read(tenant, name)
            new = change(current)
            if new is current:
                return current
            try:
                if current is None:
                    etag = self.backend.put(key, new.to_json(), if_none_match=True)
                else:
                    etag = self.backend.put(key, new.to_json(), if_match=current.etag)
                return replace(new, etag=etag)
            except (PreconditionFailed, BlobNotFound):
                time.sleep(random.uniform(0, min(0.1, 0.002 * 2**attempt)))  # noqa: S311
        raise Conflict(f"too many concurrent updates of adapter {name!r}; try again")

    def get_manifest(self, tenant: str, name: str) -> Manifest:
        return self._live(self._read(tenant, name), name)

    def get_manifest_if_changed(self, tenant: str, name: str, etag: str) -> Manifest | None:
        """None when the stored manifest still has `etag` (a conditional GET)."""
        try:
            found = self.backend.get_if_changed(_manifest_key(tenant, name), etag)
        except BlobNotFound:
            raise not_found(name) from None
        if found is None:
            return None
        return self._live(Manifest.from_json(*found), name)

    # --- listings: one backend listing per page, never a scan of the bucket ------------------

    def adapter_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]:
        """Live adapters of `tenant` named after the position `after`, in name order.

        One folder-level listing of at most `limit` names, and one manifest read per name: a
        page costs at most 1 + `limit` store calls, however many adapters or versions exist.
        `next_after` is the position to continue from (None at the end); a page may hold fewer
        than `limit` items (revoked adapters are skipped) and still have a next one.
        """
        prefix = f"tenants/{check_name(tenant, 'tenant')}/adapters/"
        keys, more = self.backend.list_page(
            prefix, start_after=_start(prefix, after), limit=_limit(limit), folders=True
        )
        manifests: list[Manifest] = []
        for key in keys:
            name = _child(key, prefix, folder=True)
            if name is None:
                continue
            manifest = self._read(tenant, name)
            if manifest is not None and manifest.status == "active":
                manifests.append(manifest)
        return Page(manifests, _next(keys, prefix, more), len(keys))

    def tenant_page(self, *, after: str = "", limit: int = 100) -> Page[str]:
        """Tenants with anything stored (adapters or shares), in name order: one listing."""
        prefix = "tenants/"
        keys, more = self.backend.list_page(
            prefix, start_after=_start(prefix, after), limit=_limit(limit), folders=True
        )
        tenants = [t for t in (_child(k, prefix, folder=True) for k in keys) if t is not None]
        return Page(tenants, _next(keys, prefix, more), len(keys))

    def shared_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]:
        """Other tenants' live adapters shared with `tenant`, from `tenant`'s share index.

        One listing of the index (`tenants/<tenant>/shared/<owner>/<name>`, at most `limit`
        markers) and one manifest read per marker; each marker is only a hint, confirmed
        against the owner's manifest (the truth) with `can_use`. Nothing outside the index is
        read, so the cost does not grow with the bucket.
        """
        prefix = _shared_prefix(tenant)
        keys, more = self.backend.list_page(
            prefix, start_after=_start(prefix, after), limit=_limit(limit)
        )
        manifests: list[Manifest] = []
        for key in keys:
            grant = _share_of(key, prefix)
            if grant is None:
                continue
            try:
                manifest = self._read(*grant)
            except IntegrityError:
                log.warning("share index of %s: a shared manifest is unreadable", tenant)
                continue
            if manifest is not None and manifest.usable_by(tenant):
                manifests.append(manifest)
        return Page(manifests, _next(keys, prefix, more), len(keys))

    def share_hints(self, tenant: str) -> frozenset[tuple[str, str]]:
        """(owner, name) of every marker in `tenant`'s share index: hints, not yet confirmed.

        What the gateway checks before it reads anything of another tenant: a name absent here
        is not shared with `tenant`, whether or not it exists (DESIGN invariant 6).
        """
        prefix = _shared_prefix(tenant)
        hints: set[tuple[str, str]] = set()
        start = ""
        while True:
            keys, more = self.backend.list_page(prefix, start_after=start, limit=1000)
            hints.update(g for g in (_share_of(k, prefix) for k in keys) if g is not None)
            if not more or not keys:
                return frozenset(hints)
            start = keys[-1]

    def list_adapters(self, tenant: str) -> list[Manifest]:
        """Every live adapter of `tenant` (all pages; prefer `adapter_page` where it can grow)."""
        return _all_pages(lambda after: self.adapter_page(tenant, after=after, limit=1000))

    def list_tenants(self) -> list[str]:
        return _all_pages(lambda after: self.tenant_page(after=after, limit=1000))

    def list_shared_with(self, tenant: str) -> list[Manifest]:
        """Every adapter shared with `tenant`, from its share index (all pages)."""
        return _all_pages(lambda after: self.shared_page(tenant, after=after, limit=1000))

    def resolve(self, tenant: str, ref: AdapterRef) -> AdapterVersion:
        """The live version `ref` names, as seen by `tenant`.

        `ref.owner` defaults to `tenant`. Another owner's adapter is looked for only when
        `tenant`'s share index names it, and then resolves only if the manifest confirms the
        grant (`can_use`); otherwise it is answered exactly like a missing one, without reading
        the owner's manifest.
        """
        check_name(tenant, "tenant")
        owner = ref.owner or tenant
        if owner != tenant and (owner, ref.name) not in self.share_hints(tenant):
            raise not_found(ref)
        manifest = self._read(owner, ref.name)
        if manifest is None or not manifest.usable_by(tenant):
            raise not_found(ref)
        return manifest.resolve(ref)

    def set_alias(
        self, tenant: str, name: str, alias: str, target: str, expected: str | None = None
    ) -> Manifest:
        """Point `alias` at `target` (a version sha or another alias).

        With `expected` (a version sha), only if the alias currently points there (else
        Conflict): a compare-and-set for rollouts.
        """
        check_name(alias, "alias")
        if _looks_like_sha(alias):
            raise InvalidAdapter("an alias may not look like a version sha256")
        want = check_sha(expected, "expected version") if expected is not None else None

        def change(current: Manifest | None) -> Manifest:
            manifest = self._live(current, name)
            if _looks_like_sha(target):
                sha: str | None = check_sha(target)
            else:
                sha = manifest.aliases.get(check_name(target, "alias"))
            if sha is None or sha not in manifest.versions:
                raise not_found(f"{name}@{target}")
            if want is not None and manifest.aliases.get(alias) != want:
                raise Conflict(
                    f"alias {alias!r} of {name!r} points at "
                    f"{manifest.aliases.get(alias) or 'nothing'}, not the expected {want}"
                )
            return replace(manifest, aliases={**manifest.aliases, alias: sha})

        return self._update(tenant, name, change)

    def remove_alias(self, tenant: str, name: str, alias: str) -> Manifest:
        check_name(alias, "alias")

        def change(current: Manifest | None) -> Manifest:
            manifest = self._live(current, name)
            if alias not in manifest.aliases:
                return manifest
            aliases = {a: s for a, s in manifest.aliases.items() if a != alias}
            return replace(manifest, aliases=aliases)

        return self._update(tenant, name, change)

    # --- sharing: the manifest is the truth, the grantee's share index a confirmed hint ------

    def share(self, tenant: str, name: str, grantee: str) -> Manifest:
        """Let `grantee` use `name`: marker, then manifest, then the marker once more.

        Order of writes: (1) the marker in the grantee's index, (2) the manifest (the truth),
        (3) the marker again. A crash after (1) leaves a marker the manifest does not confirm:
        harmless, and removed by `repair_share_index`. (3) covers an unshare of the same grant
        running concurrently, which may delete the marker between (1) and (2). Sharing again
        rewrites the marker: it repairs one grant.
        """
        check_name(grantee, "tenant")
        manifest = self.get_manifest(tenant, name)  # missing or revoked: nothing is written
        if grantee == tenant:
            return manifest
        marker = _share_key(grantee, tenant, name)
        self.backend.put(marker, _MARKER)

        def change(current: Manifest | None) -> Manifest:
            manifest = self._live(current, name)
            shared = tuple(sorted({*manifest.shared_with, grantee}))
            return (
                manifest
                if shared == manifest.shared_with
                else replace(manifest, shared_with=shared)
            )

        manifest = self._update(tenant, name, change)
        self.backend.put(marker, _MARKER)
        return manifest

    def unshare(self, tenant: str, name: str, grantee: str) -> Manifest:
        """Stop sharing: the manifest first (from then on nothing confirms the grant), then the
        marker (a crash in between leaves a harmless, unconfirmed marker)."""
        check_name(grantee, "tenant")

        def change(current: Manifest | None) -> Manifest:
            manifest = self._live(current, name)
            shared = tuple(t for t in manifest.shared_with if t != grantee)
            return (
                manifest
                if shared == manifest.shared_with
                else replace(manifest, shared_with=shared)
            )

        manifest = self._update(tenant, name, change)
        if grantee != tenant:
            self._settle_marker(grantee, tenant, name)
        return manifest

    def _grants(self, owner: str, name: str, grantee: str) -> bool:
        manifest = self._read(owner, name)
        return manifest is not None and owner != grantee and manifest.usable_by(grantee)

    def _settle_marker(self, grantee: str, owner: str, name: str) -> bool:
        """Make one marker agree with the manifest; True if the grant stands.

        Deleting is followed by a second look at the manifest: a share that committed while
        this ran gets its marker back, so a grant never ends up without one.
        """
        key = _share_key(grantee, owner, name)
        if self._grants(owner, name, grantee):
            self.backend.put(key, _MARKER)
            return True
        self.backend.delete(key)
        if self._grants(owner, name, grantee):
            self.backend.put(key, _MARKER)
            return True
        return False

    def repair_share_index(self) -> ShareRepair:
        """Make every tenant's share index agree with the manifests (the truth).

        Writes the marker of every grant that has none (shares made before the index existed,
        or an interrupted write) and removes markers no manifest confirms (a crash between the
        two writes of a share, an unshare or a whole revoke). Reads every manifest and every
        index: an operator's maintenance task (`lora-gateway store repair-shares`), never on a
        request path. Safe to run while the gateways serve, and more than once.
        """
        report = ShareRepair()
        tenants = self.list_tenants()
        markers = {(grantee, *hint) for grantee in tenants for hint in self.share_hints(grantee)}
        for owner in tenants:
            for manifest in self.list_adapters(owner):
                report.adapters += 1
                for grantee in manifest.shared_with:
                    if grantee == owner:
                        continue
                    report.grants += 1
                    if (grantee, owner, manifest.name) not in markers:
                        self.backend.put(_share_key(grantee, owner, manifest.name), _MARKER)
                        report.added += 1
        for grantee, owner, name in sorted(markers):
            if not self._settle_marker(grantee, owner, name):
                report.removed += 1
        return report

    def revoke(
        self, tenant: str, name: str, version: str | None = None, *, delete_objects: bool = True
    ) -> list[str]:
        """Revoke one version (or, with None, the whole adapter); return the revoked shas.

        The manifest is marked first (so no read path returns the version any more), then the
        objects are deleted. Idempotent: revoking again finishes any interrupted deletion. With
        `delete_objects=False` only the manifest is marked: the gateway unloads the versions
        from the engine and its disk cache first and then calls `purge` (DESIGN invariant 7).
        """
        target = check_sha(version) if version is not None else None
        revoked: list[str] = []
        grantees: list[str] = []
        freed = [0, 0]  # bytes and names no longer live: refunded from the tenant's usage

        def change(current: Manifest | None) -> Manifest:
            if current is None:
                raise not_found(name)
            if target is None:
                shas = sorted({*current.versions, *current.revoked})
                new = replace(
                    current,
                    status="revoked",
                    versions={},
                    aliases={},
                    shared_with=(),
                    revoked=tuple(shas),
                )
                revoked[:] = shas
                grantees[:] = current.shared_with
                freed[:] = [
                    sum(v.total_bytes for v in current.versions.values()),
                    1 if _is_live(current) else 0,
                ]
                return current if new == current else new
            if target not in current.versions and target not in current.revoked:
                raise not_found(f"{name}@sha256:{target}")
            revoked[:] = [target]
            freed[:] = [0, 0]
            if target in current.revoked:
                return current
            freed[0] = current.versions[target].total_bytes
            return replace(
                current,
                versions={s: v for s, v in current.versions.items() if s != target},
                aliases={a: s for a, s in current.aliases.items() if s != target},
                revoked=tuple(sorted({*current.revoked, target})),
            )

        self._update(tenant, name, change)
        for grantee in grantees:
            # The manifest no longer confirms these grants; a marker left by a failure here is
            # harmless (and removed by `repair_share_index`).
            try:
                self.backend.delete(_share_key(grantee, tenant, name))
            except StoreError:
                log.warning("could not remove a share marker of a revoked adapter of %s", tenant)
        if any(freed):
            self._refund(tenant, freed[0], freed[1])
        if delete_objects:
            self.purge(tenant, name, revoked)
        return revoked

    def quarantine(self, tenant: str, name: str, sha: str, reason: str) -> Manifest:
        """Mark a version quarantined (idempotent): it stays in the manifest, aliases included,
        so that every read of it, on any replica and after a restart, is refused with
        `Quarantined` and `reason`; re-uploading the same bytes keeps it quarantined. Its
        objects are kept (for the operator's inspection); revoking it works as usual."""
        target = check_sha(sha)
        note = reason[:200]

        def change(current: Manifest | None) -> Manifest:
            if current is None or target not in current.versions:
                raise not_found(f"{name}@sha256:{target}")
            version = current.versions[target]
            if version.status == "quarantined":
                return current
            versions = dict(current.versions)
            versions[target] = replace(version, status="quarantined", quarantine_reason=note)
            return replace(current, versions=versions)

        return self._update(tenant, name, change)

    def purge(self, tenant: str, name: str, shas: Iterable[str]) -> None:
        """Delete the objects of revoked versions (idempotent)."""
        for sha in shas:
            for filename in ADAPTER_FILES:
                self.backend.delete(_object_key(tenant, name, check_sha(sha), filename))

    # --- composition and reads of objects -----------------------------------------------------

    def compose(
        self,
        tenant: str,
        name: str,
        parts: Sequence[tuple[AdapterRef, float]],
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
    ) -> AdapterVersion:
        """Publish the weighted sum of `tenant`'s own adapter versions as a new version.

        Bounded before anything is fetched, from the manifests: at most
        `limits.max_compose_parts` parts, their ranks summing to at most the model's max rank,
        their stored bytes to at most `limits.max_compose_bytes`. The parts are then fetched
        into the spool (their bytes reserved first), the result's size is computed from their
        headers (at most `limits.max_file_bytes`, reserved, and checked against `quota`), and
        it is written one module at a time.
        """
        check_name(name, "adapter name")
        aliases = tuple(check_name(alias, "alias") for alias in aliases)
        self._check_text(created_by, description)
        if not parts:
            raise InvalidAdapter("composition needs at least one part")
        if len(parts) > self.limits.max_compose_parts:
            raise CapacityExceeded(
                f"composition of {len(parts)} parts exceeds the cap of "
                f"{self.limits.max_compose_parts} parts"
            )
        versions: list[AdapterVersion] = []
        weights: list[float] = []
        for ref, weight in parts:
            if ref.owner not in (None, tenant):
                raise InvalidAdapter("composition parts must be the tenant's own adapters")
            if not isinstance(weight, int | float) or isinstance(weight, bool):
                raise InvalidAdapter("composition weights must be numbers")
            versions.append(self.resolve(tenant, ref))
            weights.append(float(weight))
        ranks = [version.rank for version in versions]
        if sum(ranks) > self.spec.max_rank:
            raise InvalidAdapter(
                f"composed rank {sum(ranks)} (sum of the parts' ranks {ranks}) exceeds the "
                f"maximum rank {self.spec.max_rank}"
            )
        part_bytes = sum(version.total_bytes for version in versions)
        if part_bytes > self.limits.max_compose_bytes:
            raise CapacityExceeded(
                f"the parts of this composition store {format_bytes(part_bytes)}, above the cap "
                f"of {format_bytes(self.limits.max_compose_bytes)}"
            )
        with self.spool.reserve(part_bytes, "this composition") as space:
            folder = self.spool.folder("compose-")
            try:
                return self._compose_in(
                    folder,
                    space,
                    tenant,
                    name,
                    versions,
                    weights,
                    created_by,
                    aliases,
                    description,
                    quota,
                )
            finally:
                shutil.rmtree(folder, ignore_errors=True)

    def _compose_in(
        self,
        folder: Path,
        space: SpoolSpace,
        tenant: str,
        name: str,
        versions: Sequence[AdapterVersion],
        weights: Sequence[float],
        created_by: str,
        aliases: tuple[str, ...],
        description: str,
        quota: Quota | None,
    ) -> AdapterVersion:
        configs: list[dict[str, object]] = []
        headers = []
        for index, version in enumerate(versions):
            part = folder / f"part-{index}"
            part.mkdir()
            for entry in version.files:
                self._fetch_verified(version, entry, part / entry.filename)
            configs.append(parse_config((part / CONFIG_FILE).read_bytes(), self.limits))
            headers.append(read_safetensors_header(part / WEIGHTS_FILE, self.limits))
        plan = plan_composition(
            [{n: t.shape for n, t in header.items()} for header, _ in headers],
            configs,
            weights,
            max_rank=self.spec.max_rank,
        )
        if plan.size > self.limits.max_file_bytes:
            raise CapacityExceeded(
                f"the composed {WEIGHTS_FILE} would be {format_bytes(plan.size)}, above the cap "
                f"of {format_bytes(self.limits.max_file_bytes)}"
            )
        config_bytes = _config_bytes(plan.config)
        if quota is not None:
            self._check_quota(
                tenant, name, plan.size + len(config_bytes), quota, "this composition"
            )
        space.grow(plan.size + len(config_bytes), "the composed adapter")

        def load(index: int, key: ModuleKey) -> dict[str, Array] | None:
            header, data_start = headers[index]
            names = {part: tensor_name(key, part) for part in ("A", "B")}
            if names["A"] not in header:
                return None
            subset = {n: header[n] for n in names.values()}
            loaded = load_tensors(
                folder / f"part-{index}" / WEIGHTS_FILE, self.limits, header=(subset, data_start)
            )
            return {part: loaded[n] for part, n in names.items()}

        out = folder / "composed"
        out.mkdir()
        (out / CONFIG_FILE).write_bytes(config_bytes)
        with (out / WEIGHTS_FILE).open("wb") as f:
            write_composition(plan, load, f)
        composed_from = tuple(
            (str(AdapterRef(owner=tenant, name=v.name, version=v.sha)), w)
            for v, w in zip(versions, weights, strict=True)
        )
        return self._publish(
            tenant,
            name,
            out,
            created_by=created_by,
            aliases=aliases,
            description=description,
            composed_from=composed_from,
            space=space,
            quota=quota,
        )

    def _fetch_verified(self, version: AdapterVersion, entry: FileEntry, dest: Path) -> None:
        self.fetch_file(version, entry.filename, dest)
        if dest.stat().st_size != entry.size or sha256_file(dest) != entry.sha256:
            raise IntegrityError(
                f"stored {entry.filename} of {version.version_id} does not match its sha256"
            )

    def fetch_file(self, version: AdapterVersion, filename: str, dest: Path) -> None:
        """Download one file of a version to `dest`, unverified (the caller checks sha256)."""
        try:
            self.backend.download_file(
                _object_key(version.tenant, version.name, version.sha, filename), dest
            )
        except BlobNotFound:
            raise AdapterNotFound(f"version {version.version_id} is no longer stored") from None


#: Conditional writes of a usage object: every upload of a tenant contends on one object.
_USAGE_RETRIES = 25


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.2, 0.002 * 2**attempt)))  # noqa: S311 - jitter


def _is_live(manifest: Manifest | None) -> bool:
    """Whether a manifest counts as one of its tenant's adapters."""
    return manifest is not None and manifest.status == "active"


def _looks_like_sha(text: str) -> bool:
    try:
        check_sha(text)
    except InvalidAdapter:
        return False
    return True


def _config_bytes(config: dict[str, object]) -> bytes:
    return json.dumps(config, indent=2, sort_keys=True).encode()
