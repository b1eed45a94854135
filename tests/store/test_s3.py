"""S3 specifics against a real server over HTTP: failures are fast and typed, bytes are verified."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapter_store import (
    AdapterNotFound,
    AdapterRef,
    DiskCache,
    IntegrityError,
    Registry,
    StoreUnavailable,
)
from adapter_store.errors import BlobNotFound, PreconditionFailed, StoreError
from adapter_store.model import WEIGHTS_FILE, BaseModelSpec
from adapter_store.s3 import S3Backend
from tests.store.conftest import make_s3_backend
from tests.support.s3server import S3Server, s3_server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dead_endpoint_fails_fast(spec: BaseModelSpec) -> None:
    backend = S3Backend(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    registry = Registry(backend, spec)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        registry.resolve("acme", AdapterRef.parse("bot"))
    assert time.monotonic() - started < 10


def test_missing_bucket_is_unavailable(s3: S3Server, spec: BaseModelSpec) -> None:
    backend = S3Backend(
        "no-such-bucket",
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
    )
    with pytest.raises(StoreUnavailable, match="bucket"):
        Registry(backend, spec).get_manifest("acme", "bot")


def test_server_down_then_back(spec: BaseModelSpec, good_adapter: Path) -> None:
    with s3_server(bucket="restart-test") as server:
        registry = Registry(make_s3_backend(server, max_attempts=1), spec)
        registry.upload_dir("acme", "bot", good_adapter, created_by="t")
        server.stop()
        with pytest.raises(StoreUnavailable):
            registry.get_manifest("acme", "bot")
        server.start()
        # The same registry serves again once the server does. SeaweedFS lists buckets (its
        # readiness check) a moment before it serves objects again (InternalError until its
        # volume server is back), so the first answers may still be refusals.
        deadline = time.monotonic() + 15
        while True:
            try:
                manifest = registry.get_manifest("acme", "bot")
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert manifest.name == "bot"


async def test_overwritten_object_is_caught_by_the_cache(
    s3: S3Server, spec: BaseModelSpec, good_adapter: Path, tmp_path: Path
) -> None:
    backend = make_s3_backend(s3)
    registry = Registry(backend, spec)
    version = registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    key = f"{backend.prefix}/tenants/acme/adapters/bot/versions/{version.sha}/{WEIGHTS_FILE}"
    data = bytearray((good_adapter / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(data))  # behind our back

    cache = DiskCache(tmp_path / "cache", 10**7, registry.fetch_file)
    with pytest.raises(IntegrityError, match="does not match"):
        await cache.ensure(version)
    assert not cache.contains(version.sha)
    assert not cache.path_for(version.sha).exists()
    assert list((tmp_path / "cache" / ".tmp").iterdir()) == []

    s3.client().delete_object(Bucket=s3.bucket, Key=key)
    with pytest.raises(AdapterNotFound):
        await cache.ensure(version)


def _calls(backend: S3Backend, tmp_path: Path) -> dict[str, Callable[[], object]]:
    """One call of each BlobBackend method, on the key "tenants/acme/x"."""
    key = "tenants/acme/x"
    (tmp_path / "file").write_bytes(b"data")
    return {
        "get": lambda: backend.get(key),
        "get_if_changed": lambda: backend.get_if_changed(key, '"etag"'),
        "put": lambda: backend.put(key, b"data"),
        "put_if_match": lambda: backend.put(key, b"data", if_match='"etag"'),
        "put_file": lambda: backend.put_file(key, tmp_path / "file"),
        "download_file": lambda: backend.download_file(key, tmp_path / "back"),
        "delete": lambda: backend.delete(key),
        "list": lambda: backend.list("tenants/"),
        "list_page": lambda: backend.list_page("tenants/", folders=True),
    }


def test_every_call_raises_the_stores_errors_only(s3: S3Server, tmp_path: Path) -> None:
    """Each method's boto3 errors leave as the store's own (one mapping for all of them), with
    no boto3 exception chained: refused credentials are StoreUnavailable everywhere."""
    refused = S3Backend(
        s3.bucket,
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key="not-the-secret",
        max_attempts=1,
    )
    for method, call in _calls(refused, tmp_path).items():
        with pytest.raises(StoreUnavailable, match="refused the request") as raised:
            call()
        assert raised.value.__cause__ is None, method
        assert raised.value.__suppress_context__, method

    backend = make_s3_backend(s3)
    calls = _calls(backend, tmp_path)
    for method in ("get", "get_if_changed", "download_file"):
        with pytest.raises(BlobNotFound):
            calls[method]()
    calls["delete"]()  # a missing key: not an error
    etag = backend.put("tenants/acme/x", b"one")
    assert backend.get_if_changed("tenants/acme/x", etag) is None
    assert backend.get_if_changed("tenants/acme/x", '"other"') == (b"one", etag)
    with pytest.raises(PreconditionFailed):
        calls["put_if_match"]()
    with pytest.raises(PreconditionFailed):
        backend.put("tenants/acme/x", b"two", if_none_match=True)
    assert issubclass(PreconditionFailed, StoreError)


def test_multipart_upload(s3: S3Server, tmp_path: Path) -> None:
    backend = make_s3_backend(s3, multipart_threshold=5 * 1024 * 1024)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    backend.put_file("tenants/acme/blob", big)
    backend.download_file("tenants/acme/blob", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == big.read_bytes()


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        import docker  # type: ignore[import-not-found]

        docker.from_env().ping()
    except Exception:
        return False
    return True


@pytest.mark.skipif(
    not _docker_works(),
    reason="MinIO variant needs a reachable Docker engine and testcontainers; the SeaweedFS "
    "variant of the same contract runs instead",
)
def test_contract_on_minio(spec: BaseModelSpec, good_adapter: Path) -> None:
    minio = pytest.importorskip("testcontainers.minio", reason="testcontainers is not installed")
    with minio.MinioContainer() as container:
        config = container.get_config()
        client = container.get_client()
        client.make_bucket("adapters")
        backend = S3Backend(
            "adapters",
            endpoint_url=f"http://{config['endpoint']}",
            region="us-east-1",
            access_key_id=config["access_key"],
            secret_access_key=config["secret_key"],
        )
        registry = Registry(backend, spec)
        version = registry.upload_dir("acme", "bot", good_adapter, created_by="t")
        registry.share("acme", "bot", "globex")
        assert registry.resolve("globex", AdapterRef.parse("acme/bot")) == version
        assert registry.revoke("acme", "bot") == [version.sha]
