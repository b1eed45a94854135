"""Server options end to end: mTLS, warm set, prefetch on upload, load-time checks, idle close."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_store import LocalBackend, Registry
from adapter_store.model import BaseModelSpec
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key
from tests.conftest import AdapterFactory, engine_settings

pytestmark = pytest.mark.engine

KEY = "secret-tls-admin"


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def issue(
    name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Pem]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    pem = Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return cert, key, pem


@dataclass
class TlsEnv:
    server: GatewayServer
    ca: Pem
    client: Pem
    stranger: Pem

    @property
    def target(self) -> str:
        return f"localhost:{self.server.port}"

    def connect(self, cert: Pem | None, **options: Any) -> AsyncGatewayClient:
        """A TLS client trusting our CA, presenting `cert` (None: no client certificate)."""
        return AsyncGatewayClient(
            self.target,
            KEY,
            tls=True,
            root_certificates=self.ca.cert,
            client_cert_chain=cert.cert if cert else None,
            client_private_key=cert.key if cert else None,
            **options,
        )


@pytest.fixture(scope="module")
async def tls_env(
    engine: VLLMEngine,
    tiny_model: Path,
    make_test_adapter: AdapterFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[TlsEnv]:
    work = tmp_path_factory.mktemp("tls")
    ca_cert, ca_key, ca = issue("test-ca", None)
    _, _, server_pem = issue("localhost", (ca_cert, ca_key))
    _, _, client_pem = issue("client", (ca_cert, ca_key))
    _, _, stranger = issue("stranger", None)  # self-signed: not from our CA
    for name, data in {
        "ca.pem": ca.cert,
        "server.pem": server_pem.cert,
        "server.key": server_pem.key,
    }.items():
        (work / name).write_bytes(data)
    tenants = {
        "tenants": {
            "acme": {"keys": [{"id": "a", "sha256": hash_key(KEY), "role": "tenant-admin"}]}
        }
    }
    (work / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    # A warm adapter already in the store before the server starts.
    spec = BaseModelSpec.from_hf_config(
        tiny_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,)
    )
    registry = Registry(LocalBackend(work / "store"), spec)
    warm_dir = make_test_adapter(seed=61, rank=8)
    registry.upload_dir("acme", "warm", warm_dir, created_by="test")
    # Stored under a rank limit of 16; the server below accepts rank 8 at most.
    registry.upload_dir("acme", "wide", make_test_adapter(seed=63, rank=16), created_by="test")
    settings = engine_settings(
        tiny_model,
        store=f"file://{work / 'store'}",
        cache_dir=str(work / "cache"),
        tenants_file=str(work / "tenants.yaml"),
        listen="127.0.0.1:0",
        base_model_aliases=(devtools.TINY_MODEL_NAME,),
        tls_cert=str(work / "server.pem"),
        tls_key=str(work / "server.key"),
        tls_client_ca=str(work / "ca.pem"),
        max_lora_rank=8,
        warm_adapters=("acme/warm",),
        prefetch_on_upload=True,
        self_test=False,
    )
    server = await GatewayServer.start(settings, engine=engine)
    yield TlsEnv(server, ca, client_pem, stranger)
    await server.stop(grace=1.0)


async def test_mtls_accepts_our_clients_and_refuses_others(tls_env: TlsEnv) -> None:
    async with tls_env.connect(tls_env.client) as client:
        result = await client.generate("", "hello world", GenerateOptions(max_tokens=3))
        assert len(result.token_ids) == 3
    async with tls_env.connect(tls_env.stranger, max_retries=0, timeout=5) as stranger:
        with pytest.raises(errors.Unavailable):
            await stranger.generate("", "hello world", GenerateOptions(max_tokens=3))
    async with tls_env.connect(None, max_retries=0, timeout=5) as no_cert:
        with pytest.raises(errors.Unavailable):
            await no_cert.generate("", "hello world", GenerateOptions(max_tokens=3))


async def test_warm_set_is_loaded_and_pinned_at_start(tls_env: TlsEnv) -> None:
    residency = tls_env.server.gateway.residency
    warm = [v for v in residency.resident_versions() if (v.tenant, v.name) == ("acme", "warm")]
    assert len(warm) == 1
    assert residency.entry(warm[0]).pinned


async def test_prefetch_on_upload(tls_env: TlsEnv, make_test_adapter: AdapterFactory) -> None:
    async with tls_env.connect(tls_env.client) as admin:
        info = await admin.upload_adapter("fresh", make_test_adapter(seed=62, rank=8))
    sha = info.version.removeprefix("sha256:")
    assert tls_env.server.gateway.residency.is_resident(("acme", "fresh", sha))


async def test_load_time_validation_keeps_bad_adapters_from_the_engine(tls_env: TlsEnv) -> None:
    """An adapter the store accepted but this deployment cannot serve (rank above its limit)
    is refused at load, before `add_lora`: the engine never sees it and keeps serving."""
    engine = tls_env.server.engine
    before = await engine.list_adapters()
    async with tls_env.connect(tls_env.client) as client:
        with pytest.raises(errors.FailedPrecondition):
            await client.generate("wide", "hello world", GenerateOptions(max_tokens=3))
        assert await engine.list_adapters() == before
        assert (
            len(
                (
                    await client.generate("warm", "hello world", GenerateOptions(max_tokens=3))
                ).token_ids
            )
            == 3
        )


async def test_idle_connections_are_closed(
    engine: VLLMEngine, tiny_model: Path, tmp_path: Path
) -> None:
    """A client connection with no RPC for `max_connection_idle_s` is closed by the server."""
    tenants = {
        "tenants": {"acme": {"keys": [{"id": "a", "sha256": hash_key(KEY), "role": "user"}]}}
    }
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    settings = engine_settings(
        tiny_model,
        store=f"file://{tmp_path / 'store'}",
        cache_dir=str(tmp_path / "cache"),
        tenants_file=str(tmp_path / "tenants.yaml"),
        listen="127.0.0.1:0",
        max_connection_idle_s=1.0,
        self_test=False,
    )
    server = await GatewayServer.start(settings, engine=engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            deadline = asyncio.get_running_loop().time() + 10
            while channel.get_state() is grpc.ChannelConnectivity.READY:
                assert asyncio.get_running_loop().time() < deadline, "idle connection kept open"
                await asyncio.sleep(0.1)
            assert channel.get_state() is grpc.ChannelConnectivity.IDLE
    finally:
        await server.stop(grace=1.0)
