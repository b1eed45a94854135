"""`LocalBackend`: the blob interface on a local folder (the embedded default store).

Same semantics as S3: whole-object writes are atomic (temp file, fsync, rename, fsync of the
folder), an object's etag is the sha256 of its bytes, and conditional puts are checked and
written under a lock held across threads (threading.Lock) and processes (fcntl.flock on
`<root>/.lock`), so two writers never lose an update.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from adapter_store.backend import Keys, Stamped
from adapter_store.errors import (
    BlobNotFound,
    CapacityExceeded,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)
from adapter_store.keys import EVENTS

__all__ = ["LocalBackend"]

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TEMP_PREFIX = ".tmp-"


class LocalBackend:
    """Objects stored as files under `root`, one file per key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lock_path = self.root / ".lock"

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not all(_SEGMENT.fullmatch(part) and ".." not in part for part in parts):
            raise StoreError(f"invalid storage key {key[:200]!r}")
        return self.root.joinpath(*parts)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, self._lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"no object {key}") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the local store: {exc.strerror}") from None
        return data, hashlib.sha256(data).hexdigest()

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        data, current = self.get(key)
        return None if current == etag else (data, current)

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        path = self._path(key)
        if if_match is None and not if_none_match:
            self._write_atomic(path, data)
            return hashlib.sha256(data).hexdigest()
        with self._locked():
            try:
                current: str | None = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if if_none_match and current is not None:
                raise PreconditionFailed(f"object {key} already exists")
            if if_match is not None and current != if_match:
                raise PreconditionFailed(f"object {key} changed")
            self._write_atomic(path, data)
        return hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        self._atomic(target, lambda temp: shutil.copyfile(path, temp))

    def download_file(self, key: str, dest: Path) -> None:
        source = self._path(key)
        try:
            shutil.copyfile(source, dest)
        except FileNotFoundError:
            if not source.exists():
                raise BlobNotFound(f"no object {key}") from None
            raise

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        if key.startswith(EVENTS):
            # Each change-feed event has a folder of its own (keys.event_key): remove it too,
            # so that expired events leave nothing behind.
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        keys = []
        for folder, _, files in os.walk(base):
            for file in files:
                if file.startswith(_TEMP_PREFIX) or file == ".lock":
                    continue
                keys.append((Path(folder) / file).relative_to(self.root).as_posix())
        return sorted(keys)

    def list_page(
        self, prefix: str, *, start_after: str = "", limit: int = 1000, folders: bool = False
    ) -> tuple[Keys, bool]:
        if not folders:
            keys = [key for key in self.list(prefix) if key > start_after]
        else:
            base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
            try:
                entries = list(os.scandir(base))
            except FileNotFoundError:
                return [], False
            except OSError as exc:
                raise StoreUnavailable(f"cannot list the local store: {exc.strerror}") from None
            keys = sorted(
                key
                for key in (
                    prefix + entry.name + ("/" if entry.is_dir() else "")
                    for entry in entries
                    if not entry.name.startswith(_TEMP_PREFIX) and entry.name != ".lock"
                )
                if key > start_after
            )
        return keys[:limit], len(keys) > limit

    def modified(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            raise BlobNotFound(f"no object {key}") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the local store: {exc.strerror}") from None

    def list_page_modified(
        self, prefix: str, *, start_after: str = "", limit: int = 1000
    ) -> tuple[Stamped, bool]:
        keys, more = self.list_page(prefix, start_after=start_after, limit=limit)
        stamped: Stamped = []
        for key in keys:
            try:
                stamped.append((key, self.modified(key)))
            except BlobNotFound:
                continue  # deleted since the listing: as if listed a moment later
        return stamped, more

    def _write_atomic(self, path: Path, data: bytes) -> None:
        self._atomic(path, lambda temp: temp.write_bytes(data))

    def _atomic(self, path: Path, fill: Callable[[Path], object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fill(temp)
            with temp.open("rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(temp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise CapacityExceeded("the local store's disk is full") from None
            raise StoreUnavailable(f"cannot write to the local store: {exc.strerror}") from None
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
