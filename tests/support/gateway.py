"""Tenants files and running gateways, for the tests and the benchmarks: one builder.

A gateway here is the product's own `GatewayServer` (a real grpc.aio server on 127.0.0.1 port 0
with the gateway's servicers, health and reflection) on a given engine, store, settings and
tenants file:

    tenants = write_tenants(work / "tenants.yaml", {"acme": {"max_pins": 1}, "globex": {}})
    settings = gateway_settings(tiny_model, work, tenants=tenants, s3=s3, prefix="e2e")
    async with running_gateway(settings, engine) as server:
        async with client(server, "acme", "admin") as admin: ...

Keys: each tenant gets one key per label (default "user" and "admin"), id `<tenant>-<label>`,
role `ROLES[label]`, secret `key_of(tenant, label)`. Only the sha256 is in the file.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_gateway import devtools, errors
from lora_gateway.config import Settings
from lora_gateway.tenancy import hash_key

if TYPE_CHECKING:  # the server and the SDK are imported when used: conftest imports this module
    from lora_gateway.client import AsyncGatewayClient
    from lora_gateway.engine.base import Engine
    from lora_gateway.server import GatewayServer
    from tests.support.s3server import S3Server

#: Key label -> role in the tenants file.
ROLES: Mapping[str, str] = {"user": "user", "admin": "tenant-admin", "operator": "operator"}

#: Engine settings for this 2-core machine: 2 GPU slots, 3 loaded adapters, float32, eager.
ENGINE_DEFAULTS: Mapping[str, object] = {
    "dtype": "float32",
    "max_loras": 2,
    "max_cpu_loras": 3,
    "max_lora_rank": 16,
    "max_model_len": 256,
    "max_num_seqs": 16,
    "enforce_eager": True,
    "kv_cache_space_gib": 1,
}


def key_of(tenant: str, label: str = "user") -> str:
    """The secret of `tenant`'s key labelled `label` in a file written by `write_tenants`."""
    return f"secret-{tenant}-{label}"


def tenants_doc(
    tenants: Mapping[str, Mapping[str, Any]],
    *,
    keys: Sequence[str] = ("user", "admin"),
    secrets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A tenants file's document: each tenant with its limits (its mapping) and a key per label
    of `keys`, or of its own "keys" entry (a sequence of labels). `secrets` maps a key id
    (`<tenant>-<label>`) to a secret other than `key_of`'s (to rotate a key)."""
    doc: dict[str, Any] = {}
    for tenant, spec in tenants.items():
        limits = dict(spec)
        labels: Sequence[str] = limits.pop("keys", keys)
        entries = []
        for label in labels:
            key_id = f"{tenant}-{label}"
            secret = (secrets or {}).get(key_id, key_of(tenant, label))
            entries.append({"id": key_id, "sha256": hash_key(secret), "role": ROLES[label]})
        doc[tenant] = {**limits, "keys": entries}
    return {"tenants": doc}


def write_tenants(
    path: Path,
    tenants: Mapping[str, Mapping[str, Any]],
    *,
    keys: Sequence[str] = ("user", "admin"),
    secrets: Mapping[str, str] | None = None,
) -> Path:
    """Write `tenants_doc(tenants, ...)` as YAML to `path`; return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tenants_doc(tenants, keys=keys, secrets=secrets)))
    return path


def engine_settings(model: Path, **changes: object) -> Settings:
    """`ENGINE_DEFAULTS` for `model`, with `changes`."""
    return Settings.from_mapping({"model": str(model), **ENGINE_DEFAULTS, **changes})


def gateway_settings(
    model: Path,
    work: Path,
    *,
    tenants: Path,
    s3: S3Server | None = None,
    prefix: str = "gateway",
    s3_endpoint: str | None = None,
    **changes: object,
) -> Settings:
    """Settings of a gateway on `model` serving on 127.0.0.1 port 0 with `tenants`.

    The store is `s3`'s bucket under `prefix` (through `s3_endpoint`, e.g. a fault proxy, when
    given), or else a local folder `work/store`; the disk cache is `work/cache`. The tiny
    model's name is accepted as the adapters' base; the start-up self-test is off (proven in
    tests/test_engine.py: a test that wants it passes `self_test=True`). `changes` override
    any of it, and the engine settings (`ENGINE_DEFAULTS`)."""
    values: dict[str, object] = {
        "store": f"file://{work / 'store'}",
        "tenants_file": str(tenants),
        "listen": "127.0.0.1:0",
        "cache_dir": str(work / "cache"),
        "base_model_aliases": (devtools.TINY_MODEL_NAME,),
        "self_test": False,
    }
    if s3 is not None:
        values["store"] = f"s3://{s3.bucket}/{prefix}"
        values["s3_endpoint"] = s3_endpoint or s3.endpoint_url
        values["s3_region"] = s3.region
    values.update(changes)
    return engine_settings(model, **values)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, engine: Engine | None = None, *, grace: float = 1.0
) -> AsyncIterator[GatewayServer]:
    """A started `GatewayServer` (on `engine`, or owning one of its own when None), stopped
    with `grace` at exit."""
    from lora_gateway.server import GatewayServer

    server = await GatewayServer.start(settings, engine=engine)
    try:
        yield server
    finally:
        await server.stop(grace=grace)


def target(server: GatewayServer) -> str:
    return f"127.0.0.1:{server.port}"


def client(
    server: GatewayServer, tenant: str, label: str = "user", **kwargs: Any
) -> AsyncGatewayClient:
    """An SDK client with `key_of(tenant, label)`; no retries unless asked (a test sees the
    server's first answer)."""
    from lora_gateway.client import AsyncGatewayClient

    kwargs.setdefault("max_retries", 0)
    return AsyncGatewayClient(target(server), key_of(tenant, label), **kwargs)


async def clear_engine(engine: Engine) -> None:
    """Remove every adapter from a shared engine (other tests' gateways, and each benchmark,
    count its slots from empty); a dead engine has nothing left to clear."""
    with contextlib.suppress(errors.EngineDead):
        for lora_int_id in await engine.list_adapters():
            await engine.remove_adapter(lora_int_id)
