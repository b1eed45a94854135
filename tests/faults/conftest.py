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
import yaml

from lora_gateway import devtools
from lora_gateway.client import AsyncGatewayClient
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key
from tests.conftest import engine_settings
from tests.support.faultproxy import FaultProxy
from tests.support.s3server import S3Server, s3_server

PREFIX = "faults"
MAX_TOKENS = 8
#: tenant -> (max_concurrent, max_tokens); each gets "<tenant>-user" and "<tenant>-admin" keys.
TENANTS: dict[str, tuple[int, int]] = {
    "acme": (32, 128),
    "globex": (32, 64),
    "fuzz": (32, 8),
    "flood": (2, 128),
    "calm": (2, 128),
}


def key_of(tenant: str, role: str = "user") -> str:
    return f"secret-{tenant}-{role}"


def write_tenants(path: Path) -> Path:
    tenants: dict[str, dict[str, object]] = {}
    for tenant, (concurrent, tokens) in TENANTS.items():
        tenants[tenant] = {
            "max_concurrent": concurrent,
            "max_tokens": tokens,
            "keys": [
                {"id": f"{tenant}-user", "sha256": hash_key(key_of(tenant)), "role": "user"},
                {
                    "id": f"{tenant}-admin",
                    "sha256": hash_key(key_of(tenant, "admin")),
                    "role": "tenant-admin",
                },
            ],
        }
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


@dataclass
class FaultEnv:
    server: GatewayServer
    proxy: FaultProxy
    s3: S3Server
    work: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self, tenant: str, role: str = "user", **kwargs: Any) -> AsyncGatewayClient:
        kwargs.setdefault("max_retries", 0)
        return AsyncGatewayClient(self.target, key_of(tenant, role), **kwargs)

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


async def clear_engine(engine: VLLMEngine) -> None:
    """Leave the shared engine without adapters (other modules' gateways count its slots)."""
    for lora_int_id in await engine.list_adapters():
        await engine.remove_adapter(lora_int_id)


async def start_gateway(
    engine: VLLMEngine, model: Path, proxy: FaultProxy, s3: S3Server, work: Path, **changes: Any
) -> GatewayServer:
    values: dict[str, Any] = {
        "store": f"s3://{s3.bucket}/{PREFIX}",
        "s3_endpoint": proxy.endpoint_url,
        "s3_region": s3.region,
        "s3_connect_timeout_s": 0.5,
        "s3_read_timeout_s": 1.0,
        "s3_max_attempts": 2,
        "tenants_file": str(write_tenants(work / "tenants.yaml")),
        "listen": "127.0.0.1:0",
        "cache_dir": str(work / "cache"),
        "base_model_aliases": (devtools.TINY_MODEL_NAME,),
        "poll_interval_s": 1.0,
        "drain_grace_s": 2.0,
        "default_max_tokens": MAX_TOKENS,
        "tenant_max_tokens": 128,
        "audit_log": str(work / "audit.jsonl"),
        "self_test": False,  # proven in tests/test_engine.py; saves start-up time here
    }
    values.update(changes)
    return await GatewayServer.start(engine_settings(model, **values), engine=engine)


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
