"""`DiskCache`: adapter versions on local disk, verified, atomic, single-flight, byte-budget LRU.

Layout: `<root>/<sha[:2]>/<sha>/{adapter_config.json, adapter_model.safetensors}`, and the
version's `chat_template.jinja` when it has one (`VERSION_FILES`); the path is derived from the
version's sha256 only, the file names are the store's constants. Downloads go to
`<root>/.tmp/`, each file is fsynced and checked against the manifest's size and sha256, then
the complete folder is renamed into place.

The API is async and runs on one event loop; blocking work (downloads, hashing, deletes) runs
in threads via `asyncio.to_thread`. Concurrent `ensure` calls for one version share one task
(`singleflight.SingleFlight`), so a cancelled waiter does not cancel the download for the
others. An entry in use should be pinned by the caller.

Byte budget: a download reserves its bytes in the same step as it picks its victims (least
recently used, unpinned entries first), before anything is awaited, so concurrent downloads
never count the same free bytes twice; it starts writing only once the folders being deleted
are gone, so the bytes on disk (entries, folders being deleted, downloads in progress) never
exceed the budget.

Owners: two tenants may upload identical bytes, and their versions then share one folder.
`ensure(version, owner=...)` records who uses the folder (residency passes "tenant/name"), and
`release(sha, owner)` (revocation) deletes the folder only when no other owner is left, so one
tenant's revocation never deletes the files another tenant's identical version is loading
from. `contains(sha, owner=...)` answers for one owner: the tier a tenant sees never depends on
what another tenant has cached. Owners live in memory: after a restart the entries found on
disk have none until they are used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from adapter_store.errors import CapacityExceeded, IntegrityError, StoreUnavailable
from adapter_store.model import (
    ADAPTER_FILES,
    VERSION_FILES,
    AdapterVersion,
    FileEntry,
    check_sha,
    sha256_file,
)
from adapter_store.singleflight import SingleFlight
from adapter_store.sized import SizedOrderedDict

__all__ = ["CacheEntry", "CacheStats", "DiskCache", "Fetch"]

log = logging.getLogger(__name__)

#: Download one file of a version to a path (e.g. `Registry.fetch_file`); blocking.
Fetch = Callable[[AdapterVersion, str, Path], None]

_HEX2 = re.compile(r"^[0-9a-f]{2}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class CacheStats:
    """Counters since start-up."""

    hits: int = 0
    misses: int = 0
    downloads: int = 0
    evictions: int = 0
    verify_failures: int = 0


@dataclass(frozen=True)
class CacheEntry:
    """One cached version, as listed by `DiskCache.entries()` (least recently used first)."""

    sha: str
    size: int
    path: Path
    pinned: bool


@dataclass
class _Entry:
    size: int
    #: False for entries found on disk at start-up: their sha256 is checked on first use.
    verified: bool


def _entry_size(entry: _Entry) -> int:
    return entry.size


class DiskCache:
    """A byte-budgeted cache of adapter versions under `root`."""

    def __init__(
        self, root: Path, budget_bytes: int, fetch: Fetch, *, verify: bool = False
    ) -> None:
        """`verify=True` re-checks the full sha256 of an entry on every `ensure`, not just size."""
        self.root = Path(root)
        self._budget = budget_bytes
        self._fetch = fetch
        self._verify = verify
        self._tmp = self.root / ".tmp"
        self._entries: SizedOrderedDict[str, _Entry] = SizedOrderedDict(_entry_size)
        self._pins: Counter[str] = Counter()
        #: sha -> who uses the folder ("tenant/name" from residency); see `release`.
        self._owners: dict[str, set[str]] = {}
        self._inflight: SingleFlight[str, Path] = SingleFlight()
        self._deleting: dict[str, asyncio.Future[None]] = {}
        #: Bytes of downloads that have reserved room and not finished (started or not).
        self._reserved = 0
        #: Bytes of folders dropped from the index whose deletion has not finished yet.
        self._deleting_bytes = 0
        self._deleted: asyncio.Event | None = None
        self.stats = CacheStats()
        self._scan()

    # --- inspection ---------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def used_bytes(self) -> int:
        return self._entries.total

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by downloads in progress."""
        return self._reserved

    def contains(self, sha: str, *, owner: str | None = None) -> bool:
        """Is the version on disk (for `owner`: and has that owner fetched it)?"""
        if sha not in self._entries:
            return False
        return owner is None or owner in self._owners.get(sha, ())

    def owners(self, sha: str) -> frozenset[str]:
        return frozenset(self._owners.get(sha, ()))

    @property
    def entry_count(self) -> int:
        """Versions on disk."""
        return len(self._entries)

    def entries(self) -> list[CacheEntry]:
        return [
            CacheEntry(sha, entry.size, self.path_for(sha), self._pins[sha] > 0)
            for sha, entry in self._entries.items()
        ]

    def path_for(self, sha: str) -> Path:
        sha = check_sha(sha)
        return self.root / sha[:2] / sha

    # --- pins ---------------------------------------------------------------------------------

    def pin(self, sha: str) -> None:
        """Protect a version from eviction (counted: pin twice, unpin twice)."""
        self._pins[check_sha(sha)] += 1

    def unpin(self, sha: str) -> None:
        if self._pins[sha] > 1:
            self._pins[sha] -= 1
        else:
            self._pins.pop(sha, None)

    # --- ensure / remove ----------------------------------------------------------------------

    async def ensure(self, version: AdapterVersion, *, owner: str | None = None) -> Path:
        """A folder holding the version's files, verified; downloads it if needed.

        `owner` is recorded before anything is awaited, so a `release` by another owner that
        runs while this call waits (or while the caller then reads the files) keeps the folder.
        """
        sha = check_sha(version.sha)
        if owner is not None:
            self._owners.setdefault(sha, set()).add(owner)
        try:
            return await self._inflight.do(sha, functools.partial(self._ensure, version))
        except BaseException:
            if owner is not None and sha not in self._entries:
                self._drop_owner(sha, owner)
            raise

    def _drop_owner(self, sha: str, owner: str) -> None:
        owners = self._owners.get(sha)
        if owners is not None:
            owners.discard(owner)
            if not owners:
                del self._owners[sha]

    async def remove(self, sha: str) -> bool:
        """Delete a version from the cache (pins and owners notwithstanding); True if it was
        there."""
        sha = check_sha(sha)
        await self._inflight.settle(sha)
        self._owners.pop(sha, None)
        entry = self._entries.pop(sha, None)
        await self._delete([(sha, entry.size if entry else 0)])
        return entry is not None

    async def release(self, sha: str, owner: str) -> bool:
        """`owner` no longer uses the version (it was revoked): delete the folder if no other
        owner is left (pins notwithstanding). True if the folder was deleted.

        The check is repeated after waiting for a download in progress: an owner that joined
        meanwhile keeps the folder.
        """
        sha = check_sha(sha)
        self._drop_owner(sha, owner)
        if self._owners.get(sha):
            return False
        if sha in self._inflight:
            await self._inflight.settle(sha)
            if self._owners.get(sha):
                return False
        entry = self._entries.pop(sha, None)
        await self._delete([(sha, entry.size if entry else 0)])
        return entry is not None

    async def _ensure(self, version: AdapterVersion) -> Path:
        sha = version.sha
        path = self.path_for(sha)
        entry = self._entries.get(sha)
        if entry is not None:
            full = self._verify or not entry.verified
            if await asyncio.to_thread(_entry_ok, path, version.files, full):
                entry.verified = True
                self._entries.move_to_end(sha)
                self.stats.hits += 1
                return path
            log.warning("cached adapter %s failed verification; fetching it again", sha)
            self.stats.verify_failures += 1
            stale = self._entries.pop(sha, None)
            if stale is not None:
                await self._delete([(sha, stale.size)])
        self.stats.misses += 1
        return await self._download(version)

    async def _download(self, version: AdapterVersion) -> Path:
        sha, need = version.sha, version.total_bytes
        pending = self._deleting.get(sha)
        if pending is not None:
            await asyncio.shield(pending)
        # Reserve first: the room check, the choice of victims and the reservation happen in
        # one step, with no await in between, so a concurrent download sees these bytes taken.
        victims = self._make_room(need)
        self._reserved += need
        try:
            await self._delete(victims)
            await self._deletions_done()
            try:
                path = await asyncio.to_thread(self._build, version)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                freed = self._evict(need, budget=False)
                if not freed:
                    raise CapacityExceeded("the cache's disk is full") from None
                await self._delete(freed)
                try:
                    path = await asyncio.to_thread(self._build, version)
                except OSError as again:
                    if again.errno == errno.ENOSPC:
                        raise CapacityExceeded("the cache's disk is full") from None
                    raise
        finally:
            self._reserved -= need
        self._entries[sha] = _Entry(size=need, verified=True)
        self.stats.downloads += 1
        return path

    # --- room ---------------------------------------------------------------------------------

    def _evictable(self) -> list[str]:
        return [sha for sha in self._entries if self._pins[sha] == 0]

    def _make_room(self, need: int) -> list[tuple[str, int]]:
        """Evict LRU unpinned entries so that `need` more bytes fit the budget (or raise)."""
        if need > self._budget:
            raise CapacityExceeded(
                f"adapter of {need} bytes exceeds the cache budget of {self._budget} bytes"
            )
        if self.used_bytes + self._reserved + need <= self._budget:
            return []  # fits as it is: no need to walk the index
        spare = sum(self._entries[sha].size for sha in self._evictable())
        if self.used_bytes + self._reserved + need - spare > self._budget:
            raise CapacityExceeded(
                f"the cache budget of {self._budget} bytes is taken by pinned or loading adapters"
            )
        return self._evict(need, budget=True)

    def _evict(self, need: int, *, budget: bool) -> list[tuple[str, int]]:
        """Drop LRU unpinned entries from the index: until `need` fits the budget, or (for a
        full disk) until `need` bytes are freed. Returns (sha, size) of the folders that must
        go."""
        victims: list[tuple[str, int]] = []
        freed = 0
        for sha in self._evictable():
            if budget and self.used_bytes + self._reserved + need <= self._budget:
                break
            if not budget and freed >= need:
                break
            size = self._entries.pop(sha).size
            self._owners.pop(sha, None)
            freed += size
            victims.append((sha, size))
            self.stats.evictions += 1
        return victims

    async def _delete(self, victims: Iterable[tuple[str, int]]) -> None:
        """Delete folders already dropped from the index; their bytes count against the budget
        (`_deleting_bytes`) until they are gone."""
        victims = list(victims)
        if not victims:
            return
        paths = [self.path_for(sha) for sha, _ in victims]
        size = sum(s for _, s in victims)
        self._deleting_bytes += size
        future = asyncio.ensure_future(asyncio.to_thread(_remove_dirs, paths))
        for sha, _ in victims:
            self._deleting[sha] = future
        try:
            await asyncio.shield(future)
        finally:
            for sha, _ in victims:
                if self._deleting.get(sha) is future:
                    del self._deleting[sha]
            if not future.done():
                # Our waiter was cancelled; the deletion goes on and settles the count itself.
                future.add_done_callback(lambda _: self._deletion_settled(size))
            else:
                self._deletion_settled(size)

    def _deletion_settled(self, size: int) -> None:
        self._deleting_bytes -= size
        if self._deleted is not None:
            self._deleted.set()

    async def _deletions_done(self) -> None:
        """Wait until the bytes on disk leave room for every reserved download: the folders
        being deleted still take space until they are gone."""
        while self.used_bytes + self._reserved + self._deleting_bytes > self._budget:
            if self._deleting_bytes <= 0:
                return  # nothing left to wait for (reservations alone always fit)
            if self._deleted is None:
                self._deleted = asyncio.Event()
            self._deleted.clear()
            await self._deleted.wait()

    # --- blocking helpers (run in threads, or at start-up) -----------------------------------

    def _build(self, version: AdapterVersion) -> Path:
        """Download, verify and fsync every file into a temp folder, then rename it into place."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        temp = self._tmp / f"{version.sha}-{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            if any(entry.filename not in VERSION_FILES for entry in version.files):
                raise IntegrityError(f"manifest names an unexpected file in {version.sha}")

            def one(entry: FileEntry) -> None:
                dest = temp / entry.filename
                self._fetch_once_more_on_error(version, entry.filename, dest)
                if dest.stat().st_size != entry.size or sha256_file(dest) != entry.sha256:
                    raise IntegrityError(
                        f"downloaded {entry.filename} of {version.version_id} does not match "
                        "its recorded size and sha256"
                    )
                _fsync(dest)

            # The files at once: the small config's round trip then hides behind the weights'.
            with ThreadPoolExecutor(
                max(1, len(version.files)), thread_name_prefix="cache-fetch"
            ) as pool:
                list(pool.map(one, version.files))
            _fsync(temp)
            final = self.path_for(version.sha)
            final.parent.mkdir(exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.rename(temp, final)
            _fsync(final.parent)
            return final
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    def _fetch_once_more_on_error(self, version: AdapterVersion, filename: str, dest: Path) -> None:
        try:
            self._fetch(version, filename, dest)
        except StoreUnavailable:
            log.info("fetching %s of %s failed; trying once more", filename, version.sha)
            dest.unlink(missing_ok=True)
            self._fetch(version, filename, dest)

    def _scan(self) -> None:
        """Start-up: drop temp leftovers and malformed entries; index the rest (unverified)."""
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for group in self.root.iterdir():
            if not (group.is_dir() and _HEX2.fullmatch(group.name)):
                continue
            for folder in group.iterdir():
                name = folder.name
                valid = _SHA.fullmatch(name) and name[:2] == group.name and folder.is_dir()
                files = sorted(p.name for p in folder.iterdir()) if valid else []
                if not valid or not set(ADAPTER_FILES) <= set(files) <= set(VERSION_FILES):
                    self.stats.verify_failures += 1
                    _remove_dirs([folder])
                    continue
                size = sum((folder / f).stat().st_size for f in files)
                found.append((folder.stat().st_mtime, name, size))
        for _, sha, size in sorted(found):
            self._entries[sha] = _Entry(size=size, verified=False)
        _remove_dirs(self.path_for(sha) for sha, _ in self._evict(0, budget=True))


def _entry_ok(path: Path, files: Iterable[FileEntry], full: bool) -> bool:
    for entry in files:
        file = path / entry.filename
        try:
            if file.stat().st_size != entry.size:
                return False
        except OSError:
            return False
        if full and sha256_file(file) != entry.sha256:
            return False
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dirs(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
