"""One gateway for the request-feature tests: gRPC and the OpenAI-compatible HTTP front on
127.0.0.1:0, the session's engine, S3 over HTTP (SeaweedFS), the session's PEFT adapters.

Tenants: acme (user, tenant-admin) owns three adapters, globex (user, tenant-admin) one;
`slow` may send one request a minute (the rate-limit tests); `canary` (user, tenant-admin) is
test_canary_weights.py's own, `usage` (user, tenant-admin) test_usage.py's, `vmetrics`
test_version_metrics.py's, `lifecli` test_lifecycle_cli.py's. Expected values come from the
test_version_metrics.py's, `rollback` test_rollback.py's. Expected values come from the
PEFT-merged reference (devtools.ReferenceGenerator) and from transformers' own chat template
rendering, never from the gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from lora_gateway.client import AsyncGatewayClient
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from lora_gateway.v1 import inference_pb2_grpc
from tests.support.gateway import gateway_settings, key_of, running_gateway, write_tenants
from tests.support.s3server import S3Server, s3_server

#: Generated tokens of the reference comparisons.
MAX_TOKENS = 8
#: Per tenant: its limits, and its keys' labels (tests/support/gateway.py: "user", "admin").
TENANTS: dict[str, dict[str, Any]] = {
    "acme": {"max_concurrent": 64, "max_tokens": 200},
    "globex": {"max_concurrent": 64, "max_tokens": 200},
    "slow": {"max_concurrent": 64, "max_tokens": 200, "keys": ["user"], "requests_per_minute": 1},
    # test_canary_weights.py's own tenant: its adapters stay out of acme's listings.
    "canary": {"max_concurrent": 64, "max_tokens": 200},
    # test_evaluations.py's own tenant.
    "evals": {"max_concurrent": 64, "max_tokens": 200},
    # test_retention.py's own tenant.
    "retain": {"max_concurrent": 64, "max_tokens": 200},
    # test_usage.py's own: its usage records are exactly its own calls.
    "usage": {"max_concurrent": 64, "max_tokens": 200},
    # test_version_metrics.py's own tenant (per-version metrics).
    "vmetrics": {"max_concurrent": 64, "max_tokens": 200},
    # test_lifecycle_cli.py's own (retention and `adapter show` through the SDK and the CLI),
    # also test_openai.py's weighted-alias test.
    "lifecli": {"max_concurrent": 64, "max_tokens": 200},
    # test_rollback.py's own tenant (automatic rollback).
    "rollback": {"max_concurrent": 64, "max_tokens": 200},
}
#: Settings.rollback_check_interval_s and rollback_min_eval_interval_s of the package's
#: gateway: canaries are checked often, and a policy may re-evaluate every second.
ROLLBACK_CHECK_S = 0.25
ROLLBACK_MIN_EVAL_S = 1.0
#: Settings.version_metrics_max of the package's gateway (test_version_metrics.py's bound).
VERSION_METRICS_MAX = 1
#: The chat limit the tests reach (Settings.chat_max_messages).
CHAT_MAX_MESSAGES = 16


def key(tenant: str, label: str = "user") -> str:
    return key_of(tenant, label)


def metadata(tenant: str, label: str = "user") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key(tenant, label)}"),)


@dataclass
class ApiEnv:
    server: GatewayServer
    channel: grpc.aio.Channel
    #: name -> version of the uploaded adapters (acme: three, globex: qv-r8).
    versions: dict[str, str]
    adapters: dict[str, Path]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.openai_port}/v1"

    @property
    def stub(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel)

    def admin(self, tenant: str) -> AsyncGatewayClient:
        return AsyncGatewayClient(self.target, key(tenant, "admin"))

    def openai(self, tenant: str = "acme", **kwargs: Any) -> Any:
        import openai

        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key(tenant), **kwargs)


@pytest.fixture(scope="package")
def api_s3() -> Iterator[S3Server]:
    with s3_server("api-e2e") as server, server.credentials_in_env():
        yield server


@pytest.fixture(scope="package")
async def api(
    engine: VLLMEngine,
    tiny_model: Path,
    api_s3: S3Server,
    test_adapters: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[ApiEnv]:
    work = tmp_path_factory.mktemp("api")
    settings = gateway_settings(
        tiny_model,
        work,
        tenants=write_tenants(work / "tenants.yaml", TENANTS),
        s3=api_s3,
        prefix="api",
        openai_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        audit_log=str(work / "audit.jsonl"),
        usage_log=str(work / "usage.jsonl"),
        poll_interval_s=0.5,
        drain_grace_s=2.0,
        default_max_tokens=MAX_TOKENS,
        tenant_max_tokens=200,
        max_concurrent_requests=128,
        chat_max_messages=CHAT_MAX_MESSAGES,
        version_metrics_max=VERSION_METRICS_MAX,
        rollback_check_interval_s=ROLLBACK_CHECK_S,
        rollback_min_eval_interval_s=ROLLBACK_MIN_EVAL_S,
        # self_test stays off (gateway_settings): with constrained requests, tests/test_engine.py
    )
    versions: dict[str, str] = {}
    try:
        async with running_gateway(settings, engine) as server:
            async with server_admin(server, "acme") as acme, server_admin(server, "globex") as b:
                for name in ("attn-r8", "all-r16-rslora", "mlp-r4"):
                    info = await acme.upload_adapter(name, test_adapters[name], aliases=("prod",))
                    versions[name] = info.version
                info = await b.upload_adapter("qv-r8", test_adapters["qv-r8"])
                versions["qv-r8"] = info.version
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                yield ApiEnv(server, channel, versions, test_adapters)
    finally:
        for lora_int_id in await engine.list_adapters():  # leave the shared engine empty
            await engine.remove_adapter(lora_int_id)


def server_admin(server: GatewayServer, tenant: str) -> AsyncGatewayClient:
    return AsyncGatewayClient(f"127.0.0.1:{server.port}", key(tenant, "admin"))


@pytest.fixture(scope="package")
def hf_tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))
