"""`DiskCache`: adapter versions on local disk, verified, atomic, single-flight, byte-budget LRU.

Layout: `<root>/<sha[:2]>/<sha>/{adapter_config.json, adapter_model.safetensors}`; the path is
derived from the version's sha256 only. Downloads go to `<root>/.tmp/`, each file is fsynced and
checked against the manifest's size and sha256, then the complete folder is renamed into place.

The API is async and runs on one event loop; blocking work (downloads, hashing, deletes) runs
in threads via `asyncio.to_thread`. Concurrent `ensure` calls for one version share one task
(single-flight), awaited through `asyncio.shield` so a cancelled waiter does not cancel the
download for the others. Room is made (least recently used, unpinned entries first) before a
download starts; an entry in use should be pinned by the caller.
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
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from adapter_store.errors import CapacityExceeded, IntegrityError, StoreUnavailable
from adapter_store.model import ADAPTER_FILES, AdapterVersion, FileEntry, check_sha, sha256_file

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
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._deleting: dict[str, asyncio.Future[None]] = {}
        self._reserved = 0
        self.stats = CacheStats()
        self._scan()

    # --- inspection ---------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def used_bytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def contains(self, sha: str) -> bool:
        return sha in self._entries

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

    async def ensure(self, version: AdapterVersion) -> Path:
        """A folder holding the version's two files, verified; downloads it if needed."""
        sha = check_sha(version.sha)
        task = self._inflight.get(sha)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ensure(version))
            self._inflight[sha] = task
            task.add_done_callback(functools.partial(self._finished, sha))
        return await asyncio.shield(task)

    def _finished(self, sha: str, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(sha) is task:
            del self._inflight[sha]
        if not task.cancelled():
            task.exception()  # mark it retrieved: nobody may be left awaiting it

    async def remove(self, sha: str) -> bool:
        """Delete a version from the cache (pins notwithstanding); True if it was there."""
        sha = check_sha(sha)
        task = self._inflight.get(sha)
        if task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(task)
        present = self._entries.pop(sha, None) is not None
        await self._delete([sha])
        return present

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
            if self._entries.pop(sha, None) is not None:
                await self._delete([sha])
        self.stats.misses += 1
        return await self._download(version)

    async def _download(self, version: AdapterVersion) -> Path:
        sha, need = version.sha, version.total_bytes
        pending = self._deleting.get(sha)
        if pending is not None:
            await asyncio.shield(pending)
        await self._delete(self._make_room(need))
        self._reserved += need
        try:
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

    def _make_room(self, need: int) -> list[str]:
        """Evict LRU unpinned entries so that `need` more bytes fit the budget (or raise)."""
        if need > self._budget:
            raise CapacityExceeded(
                f"adapter of {need} bytes exceeds the cache budget of {self._budget} bytes"
            )
        spare = sum(self._entries[sha].size for sha in self._evictable())
        if self.used_bytes + self._reserved + need - spare > self._budget:
            raise CapacityExceeded(
                f"the cache budget of {self._budget} bytes is taken by pinned or loading adapters"
            )
        return self._evict(need, budget=True)

    def _evict(self, need: int, *, budget: bool) -> list[str]:
        """Drop LRU unpinned entries from the index: until `need` fits the budget, or (for a
        full disk) until `need` bytes are freed. Returns the shas whose folders must go."""
        victims: list[str] = []
        freed = 0
        for sha in self._evictable():
            if budget and self.used_bytes + self._reserved + need <= self._budget:
                break
            if not budget and freed >= need:
                break
            freed += self._entries.pop(sha).size
            victims.append(sha)
            self.stats.evictions += 1
        return victims

    async def _delete(self, shas: Iterable[str]) -> None:
        shas = list(shas)
        if not shas:
            return
        paths = [self.path_for(sha) for sha in shas]
        future = asyncio.ensure_future(asyncio.to_thread(_remove_dirs, paths))
        for sha in shas:
            self._deleting[sha] = future
        try:
            await asyncio.shield(future)
        finally:
            for sha in shas:
                if self._deleting.get(sha) is future:
                    del self._deleting[sha]

    # --- blocking helpers (run in threads, or at start-up) -----------------------------------

    def _build(self, version: AdapterVersion) -> Path:
        """Download, verify and fsync every file into a temp folder, then rename it into place."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        temp = self._tmp / f"{version.sha}-{uuid.uuid4().hex}"
        temp.mkdir()
        try:
            for entry in version.files:
                if entry.filename not in ADAPTER_FILES:
                    raise IntegrityError(f"manifest names an unexpected file in {version.sha}")
                dest = temp / entry.filename
                self._fetch_once_more_on_error(version, entry.filename, dest)
                if dest.stat().st_size != entry.size or sha256_file(dest) != entry.sha256:
                    raise IntegrityError(
                        f"downloaded {entry.filename} of {version.version_id} does not match "
                        "its recorded size and sha256"
                    )
                _fsync(dest)
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
                if not valid or files != sorted(ADAPTER_FILES):
                    self.stats.verify_failures += 1
                    _remove_dirs([folder])
                    continue
                size = sum((folder / f).stat().st_size for f in files)
                found.append((folder.stat().st_mtime, name, size))
        for _, sha, size in sorted(found):
            self._entries[sha] = _Entry(size=size, verified=False)
        _remove_dirs(self.path_for(sha) for sha in self._evict(0, budget=True))


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
