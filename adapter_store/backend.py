"""`BlobBackend`: the tiny interface every storage backend implements (bytes under keys).

`LocalBackend` (adapter_store.local, a folder) and `S3Backend` (adapter_store.s3: S3, MinIO,
SeaweedFS) implement it with the same semantics, so the registry behaves the same on both. Keys
are '/'-separated and come from `adapter_store.keys` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

__all__ = ["BlobBackend", "Keys", "Stamped"]

#: Keys of a listing (an alias: inside the backend classes, `list` is their method).
Keys = list[str]
#: Keys of a listing with each object's last-modified time (seconds since the epoch, the
#: store's clock: S3's LastModified, the local file's mtime).
Stamped = list[tuple[str, float]]


class BlobBackend(Protocol):
    """Bytes under keys. Keys are '/'-separated and built by `adapter_store.keys` only.

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
        """Up to `limit` keys under `prefix` greater than `start_after`, in the server's order
        (byte order on AWS S3, MinIO and the local folder), and whether more follow: one request
        to the store.

        With `folders`, only the level under `prefix`: its keys, and each sub-folder once, as
        `<prefix><child>/` (a `start_after` of that form skips the whole sub-folder).
        """
        ...

    def modified(self, key: str) -> float:
        """The object's last-modified time (seconds since the epoch, the store's clock: the
        time its current bytes were written); BlobNotFound if there is none. One request."""
        ...

    def list_page_modified(
        self, prefix: str, *, start_after: str = "", limit: int = 1000
    ) -> tuple[Stamped, bool]:
        """Like `list_page` (recursive), each key with its `modified` time: one request."""
        ...
