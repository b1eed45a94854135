"""A gateway whose S3 store sits behind our fault proxy, on the session's shared engine.

    client ──gRPC──▶ gateway ──boto3──▶ FaultProxy (127.0.0.1) ──▶ SeaweedFS S3 server

The S3 timeouts are short (0.5 s connect, 1 s read, 2 attempts) so that a dead store answers in
seconds. Tests switch the proxy's fault; an autouse fixture puts it back to `pass` after each
test. `start_gateway` starts more gateways on the same store and engine (e.g. with small
admission limits for the overload tests).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lora_gateway.client import AsyncGatewayClient
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from tests.support.faultproxy import FaultProxy
from tests.support.gateway import clear_engine, client, gateway_settings, write_tenants
from tests.support.s3server import S3Server, s3_server

PREFIX = "faults"
MAX_TOKENS = 8
#: tenant -> its limits; each gets "<tenant>-user" and "<tenant>-admin" keys (`key_of`).
TENANTS: dict[str, dict[str, int]] = {
    "acme": {"max_concurrent": 32, "max_tokens": 128},
    "globex": {"max_concurrent": 32, "max_tokens": 64},
    "fuzz": {"max_concurrent": 32, "max_tokens": 8},
    "flood": {"max_concurrent": 2, "max_tokens": 128},
    "calm": {"max_concurrent": 2, "max_tokens": 128},
}


@dataclass
class FaultEnv:
    server: GatewayServer
    proxy: FaultProxy
    s3: S3Server
    work: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self, tenant: str, label: str = "user", **kwargs: Any) -> AsyncGatewayClient:
        return client(self.server, tenant, label, **kwargs)

    def stored_keys(self, under: str = "") -> list[str]:
        """Object keys in the store (read from the S3 server directly, not through the proxy)."""
        client = self.s3.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.s3.bucket, Prefix=f"{PREFIX}/{under}"
        ):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    @property
    def cache_root(self) -> Path:
        return self.server.gateway.residency.cache.root


async def start_gateway(
    engine: VLLMEngine, model: Path, proxy: FaultProxy, s3: S3Server, work: Path, **changes: Any
) -> GatewayServer:
    """A gateway on the shared engine whose store is `s3` behind `proxy`; `changes` override."""
    values: dict[str, Any] = {
        "tenants": write_tenants(work / "tenants.yaml", TENANTS),
        "s3_endpoint": proxy.endpoint_url,
        "s3_connect_timeout_s": 0.5,
        "s3_read_timeout_s": 1.0,
        "s3_max_attempts": 2,
        "poll_interval_s": 1.0,
        "drain_grace_s": 2.0,
        "default_max_tokens": MAX_TOKENS,
        "tenant_max_tokens": 128,
        "audit_log": str(work / "audit.jsonl"),
    }
    values.update(changes)
    settings = gateway_settings(model, work, s3=s3, prefix=PREFIX, **values)
    return await GatewayServer.start(settings, engine=engine)


@pytest.fixture(scope="package")
def s3() -> Iterator[S3Server]:
    with s3_server("faults") as server, server.credentials_in_env():
        yield server


@pytest.fixture(scope="package")
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", s3.port)) as started:
        yield started


@pytest.fixture(autouse=True)
def _proxy_passes_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "proxy" in request.fixturenames or "fenv" in request.fixturenames:
        request.getfixturevalue("proxy").passthrough()


@pytest.fixture(scope="package")
async def fenv(
    engine: VLLMEngine,
    tiny_model: Path,
    s3: S3Server,
    proxy: FaultProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[FaultEnv]:
    await clear_engine(engine)
    work = tmp_path_factory.mktemp("faults")
    server = await start_gateway(engine, tiny_model, proxy, s3, work)
    yield FaultEnv(server, proxy, s3, work)
    proxy.passthrough()
    await server.stop(grace=1.0)
    await clear_engine(engine)
