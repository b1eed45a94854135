"""`MemoryBackend`: the `BlobBackend` semantics over a dict, for tests that need 10,000 objects
in a second (the local folder fsyncs every write: about 7 ms each here), and `Recording`, a
wrapper that counts the requests a backend serves and can fail them all (a partition).

The semantics are the local folder's (adapter_store.local): etag = sha256 of the bytes, byte
order listings, If-Match / If-None-Match. tests/store runs the same behaviour on the real
backends.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from adapter_store.backend import BlobBackend, Keys
from adapter_store.errors import BlobNotFound, PreconditionFailed, StoreUnavailable


class MemoryBackend:
    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._keys: list[str] = []  # sorted
        self._lock = threading.Lock()
        self._modified: dict[str, float] = {}

    def get(self, key: str) -> tuple[bytes, str]:
        with self._lock:
            data = self._objects.get(key)
        if data is None:
            raise BlobNotFound(f"no object {key}")
        return data, hashlib.sha256(data).hexdigest()

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        data, current = self.get(key)
        return None if current == etag else (data, current)

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        with self._lock:
            current = self._objects.get(key)
            if if_none_match and current is not None:
                raise PreconditionFailed(f"object {key} already exists")
            if if_match is not None and (
                current is None or hashlib.sha256(current).hexdigest() != if_match
            ):
                raise PreconditionFailed(f"object {key} changed")
            if current is None:
                bisect.insort(self._keys, key)
            self._objects[key] = bytes(data)
            self._modified[key] = time.time()
        return hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, path: Path) -> None:
        self.put(key, path.read_bytes())

    def download_file(self, key: str, dest: Path) -> None:
        data, _ = self.get(key)
        with dest.open("wb") as out:
            out.write(data)

    def delete(self, key: str) -> None:
        with self._lock:
            if self._objects.pop(key, None) is not None:
                del self._keys[bisect.bisect_left(self._keys, key)]
                self._modified.pop(key, None)

    def modified(self, key: str) -> float:
        with self._lock:
            stamp = self._modified.get(key)
        if stamp is None:
            raise BlobNotFound(f"no object {key}")
        return stamp

    def list_page_modified(
        self, prefix: str, *, start_after: str = "", limit: int = 1000
    ) -> tuple[list[tuple[str, float]], bool]:
        keys, more = self.list_page(prefix, start_after=start_after, limit=limit)
        with self._lock:
            return [(k, self._modified[k]) for k in keys if k in self._modified], more

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            start = bisect.bisect_left(self._keys, prefix)
            out = []
            for key in self._keys[start:]:
                if not key.startswith(prefix):
                    break
                out.append(key)
            return out

    def list_page(
        self, prefix: str, *, start_after: str = "", limit: int = 1000, folders: bool = False
    ) -> tuple[Keys, bool]:
        with self._lock:
            index = bisect.bisect_right(self._keys, max(prefix, start_after))
            out: list[str] = []
            while index < len(self._keys) and len(out) <= limit:
                key = self._keys[index]
                if not key.startswith(prefix):
                    break
                rest = key[len(prefix) :]
                if folders and "/" in rest:
                    folder = prefix + rest.split("/", 1)[0] + "/"
                    if folder > start_after:
                        out.append(folder)
                    # skip the whole folder
                    index = bisect.bisect_left(self._keys, folder + "\U0010ffff")
                    continue
                out.append(key)
                index += 1
        return out[:limit], len(out) > limit


class Recording:
    """Wraps a backend: counts each request by method (and keeps them in order: method, first
    argument), and fails every request with StoreUnavailable while `down` is set."""

    def __init__(self, inner: BlobBackend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.order: list[tuple[str, Any]] = []
        self.down = False

    def total(self) -> int:
        return sum(self.calls.values())

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable("the store is unreachable (test partition)")
            self.calls[name] += 1
            self.order.append((name, args[0] if args else None))
            return attribute(*args, **kwargs)

        return recorded


__all__ = ["MemoryBackend", "Recording"]
