"""Fixtures for the adapter store: the base-model spec, backends (local folder, S3 over HTTP)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapter_store import BaseModelSpec, BlobBackend, LocalBackend, Registry
from adapter_store.s3 import S3Backend
from lora_gateway import devtools
from tests.conftest import AdapterFactory
from tests.support.s3server import S3Server, s3_server

MAX_RANK = 64


@pytest.fixture(scope="session")
def spec(tiny_model: Path) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(
        tiny_model, max_rank=MAX_RANK, aliases=(devtools.TINY_MODEL_NAME,)
    )


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


def make_s3_backend(server: S3Server, **kwargs: object) -> S3Backend:
    return S3Backend(
        server.bucket,
        prefix=f"test-{uuid.uuid4().hex[:12]}",
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> BlobBackend:
    if request.param == "local":
        return LocalBackend(tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3")
    return make_s3_backend(server)


@pytest.fixture
def registry(backend: BlobBackend, spec: BaseModelSpec, tmp_path: Path) -> Registry:
    return Registry(backend, spec, spool_dir=tmp_path / "spool")


@pytest.fixture
def local_registry(spec: BaseModelSpec, tmp_path: Path) -> Registry:
    return Registry(LocalBackend(tmp_path / "store"), spec, spool_dir=tmp_path / "spool")


@pytest.fixture(scope="session")
def good_adapter(make_test_adapter: AdapterFactory) -> Path:
    """Rank 8, alpha 16, attention modules, F32."""
    return make_test_adapter(seed=1)


@pytest.fixture
def adapter_copy(good_adapter: Path, tmp_path: Path) -> Path:
    """A private copy of the good adapter, to mutate."""
    dest = tmp_path / "adapter"
    shutil.copytree(good_adapter, dest)
    return dest
