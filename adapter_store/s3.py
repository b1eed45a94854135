"""`S3Backend`: the blob interface on S3 or an S3-compatible server (MinIO). The only boto3 user.

- Path-style addressing and an endpoint URL for MinIO; credentials from the standard boto3 chain
  unless given explicitly.
- Explicit connect/read timeouts and bounded retries ("standard" mode), so a dead store fails a
  request within seconds.
- Conditional writes with put_object's IfMatch / IfNoneMatch; a 412 PreconditionFailed or 409
  ConditionalRequestConflict becomes PreconditionFailed (the registry re-reads and retries).
- botocore errors are classified by exception type and error code, never by message text, in
  one place: every call to the store runs inside `_mapped(key)`, which raises the store's own
  error (adapter_store.errors) for whatever boto3 raised (as httpx's `map_exceptions`).
- Downloads are one streamed GET; files above `multipart_threshold` go through the transfer
  manager (ranged parts), as do large uploads (multipart).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from adapter_store.backend import Keys, Stamped
from adapter_store.errors import (
    BlobNotFound,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3Backend"]

_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_NOT_MODIFIED = frozenset({"304", "NotModified"})
_UNAVAILABLE = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "503",
        "500",
        "403",
    }
)


class S3Backend:
    """Objects under `s3://<bucket>/<prefix>/`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        max_attempts: int = 3,
        addressing_style: Literal["auto", "virtual", "path"] = "path",
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": addressing_style},
            # Plain checksums only when required: S3-compatible servers differ on the newer ones.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self._client: S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, 8 * 1024 * 1024),
            use_threads=False,
            # One attempt per download: a cut transfer is retried once by the disk cache
            # (`DiskCache._fetch_once_more_on_error`), not up to 5 times more in here.
            num_download_attempts=1,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> tuple[bytes, str]:
        with _mapped(key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]

    def get_if_changed(self, key: str, etag: str) -> tuple[bytes, str] | None:
        with _mapped(key):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=self._key(key), IfNoneMatch=etag
                )
            except ClientError as exc:
                if _code(exc) in _NOT_MODIFIED or _status(exc) == 304:
                    return None
                raise
            return response["Body"].read(), response["ETag"]

    def put(
        self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False
    ) -> str:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if if_match is not None:
            params["IfMatch"] = if_match
        if if_none_match:
            params["IfNoneMatch"] = "*"
        with _mapped(key):
            return self._client.put_object(**params)["ETag"]

    def put_file(self, key: str, path: Path) -> None:
        with _mapped(key):
            self._client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)

    def download_file(self, key: str, dest: Path) -> None:
        """One GET streamed to `dest`; above `multipart_threshold`, the transfer manager's
        ranged parts instead (its HEAD first cost every adapter file a second round trip)."""
        with _mapped(key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            try:
                if response["ContentLength"] > self._transfer.multipart_threshold:
                    body.close()
                    self._client.download_file(
                        self.bucket, self._key(key), str(dest), Config=self._transfer
                    )
                    return
                with dest.open("wb") as out:
                    for chunk in body.iter_chunks(_CHUNK):
                        out.write(chunk)
            finally:
                body.close()

    def delete(self, key: str) -> None:
        # Deleting a missing key is not an error: a "not found" answer is one more success.
        with contextlib.suppress(BlobNotFound), _mapped(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> list[str]:
        strip = len(self._key(""))
        keys: list[str] = []
        with _mapped(prefix):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def list_page(
        self, prefix: str, *, start_after: str = "", limit: int = 1000, folders: bool = False
    ) -> tuple[Keys, bool]:
        strip = len(self._key(""))
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._key(prefix),
            "MaxKeys": limit,
        }
        if folders:
            params["Delimiter"] = "/"
        if start_after:
            # A sub-folder comes back once, as a common prefix, for as long as any key under it
            # is after `start_after`: start after all of them. Keys are built from names of
            # [A-Za-z0-9._-] and "/", all below "~".
            after = self._key(start_after)
            params["StartAfter"] = after + "~" if after.endswith("/") else after
        with _mapped(prefix):
            response = self._client.list_objects_v2(**params)
        files = [item["Key"][strip:] for item in response.get("Contents", [])]
        folders_found = [item["Prefix"][strip:] for item in response.get("CommonPrefixes", [])]
        # The server's order, which its StartAfter follows: byte order on AWS S3 and MinIO,
        # the filer's name order on SeaweedFS ("b/" before "b-x/"). Re-sorting here would lose
        # keys on a server whose order differs. (The layout never mixes files and folders in
        # one listing; if it did, AWS's interleaving is byte order.)
        keys = sorted(files + folders_found) if files and folders_found else files + folders_found
        return [k for k in keys if k != start_after], bool(response.get("IsTruncated"))

    def modified(self, key: str) -> float:
        with _mapped(key):
            response = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return response["LastModified"].timestamp()

    def list_page_modified(
        self, prefix: str, *, start_after: str = "", limit: int = 1000
    ) -> tuple[Stamped, bool]:
        strip = len(self._key(""))
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._key(prefix),
            "MaxKeys": limit,
        }
        if start_after:
            params["StartAfter"] = self._key(start_after)
        with _mapped(prefix):
            response = self._client.list_objects_v2(**params)
        stamped = [
            (item["Key"][strip:], item["LastModified"].timestamp())
            for item in response.get("Contents", [])
        ]
        return [s for s in stamped if s[0] != start_after], bool(response.get("IsTruncated"))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


#: Bytes read at a time from a streamed GET.
_CHUNK = 1 << 20


@contextlib.contextmanager
def _mapped(key: str) -> Iterator[None]:
    """Run one call to the store: any exception it raises leaves as the store's own error
    (`_translate`), without the boto3 exception chained to it."""
    try:
        yield
    except Exception as exc:
        raise _translate(exc, key) from None


def _translate(exc: Exception, key: str) -> StoreError:
    """Map a boto3/botocore exception to the store's tree, by type and error code."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        # The transfer manager wraps the client error of an upload; classify that error.
        return _translate(exc.__context__, key)
    if isinstance(exc, RetriesExceededError):
        # The transfer manager's own retries of a download (connection cut, read timeout).
        return StoreUnavailable(f"the store broke off every attempt to read {key}")
    if isinstance(exc, ClientError):
        code, status = _code(exc), _status(exc)
        if code in _NOT_FOUND or status == 404:
            if code == "NoSuchBucket":
                return StoreUnavailable("the store's bucket does not exist")
            return BlobNotFound(f"no object {key}")
        if code in _PRECONDITION or status in (409, 412):
            return PreconditionFailed(f"object {key} changed concurrently")
        if code in _UNAVAILABLE or status >= 500 or status == 403:
            return StoreUnavailable(f"the store refused the request ({code or status})")
        return StoreError(f"the store failed a request ({code or status})")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StoreUnavailable("no usable credentials for the store")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return StoreUnavailable(f"the store is unreachable ({type(exc).__name__})")
    if isinstance(exc, BotoCoreError):
        return StoreUnavailable(f"the store failed a request ({type(exc).__name__})")
    if isinstance(exc, OSError):
        return StoreUnavailable(f"I/O error talking to the store ({type(exc).__name__})")
    return StoreError(f"unexpected error from the store ({type(exc).__name__})")
