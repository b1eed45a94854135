"""Retention through the real gateway (gRPC on 127.0.0.1, the session's vLLM engine, S3 over
HTTP): SetRetention keeps the newest K versions plus every aliased one (weighted too), applies
again at each upload, and what it retires is NOT_FOUND afterwards, even a version that was in
the engine. Codes from DESIGN.md's table: K < 1 INVALID_ARGUMENT, a retired version NOT_FOUND,
a user key PERMISSION_DENIED."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from lora_gateway.v1 import admin_pb2, admin_pb2_grpc
from lora_gateway.v1 import inference_pb2 as pb
from tests.api.conftest import ApiEnv, metadata
from tests.conftest import AdapterFactory

pytestmark = pytest.mark.engine

TENANT = "retain"
NAME = "retained-bot"


async def served(api: ApiEnv, adapter: str) -> str:
    request = pb.GenerateRequest(
        adapter=adapter, text="hello", sampling=pb.SamplingParams(max_tokens=1, temperature=0.0)
    )
    response = await api.stub.Generate(request, metadata=metadata(TENANT))
    return response.adapter.version


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def audited(path: Path, rpc: str, version: str) -> dict[str, str]:
    for _ in range(50):  # the audit log is written off the request path
        for line in await asyncio.to_thread(_lines, path):
            record = json.loads(line)
            if record["rpc"] == rpc and record["version"] == version:
                return dict(record)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no audit record of {rpc} {version}")


async def test_retention_retires_through_the_gateway(
    api: ApiEnv, make_test_adapter: AdapterFactory
) -> None:
    admin_stub = admin_pb2_grpc.AdminStub(api.channel)
    as_admin = metadata(TENANT, "admin")

    def set_retention(**fields: object) -> object:
        request = admin_pb2.SetRetentionRequest(name=NAME, **fields)  # type: ignore[arg-type]
        return admin_stub.SetRetention(request, metadata=as_admin)

    async with api.admin(TENANT) as admin:
        v1 = (await admin.upload_adapter(NAME, api.adapters["attn-r8"], aliases=("prod",))).version
        v2 = (await admin.upload_adapter(NAME, api.adapters["mlp-r4"])).version
        v3 = (await admin.upload_adapter(NAME, api.adapters["all-r16-rslora"])).version
    assert await served(api, f"{NAME}@{v2}") == v2  # v2 is in the engine now

    done = await set_retention(keep_last=1)
    assert isinstance(done, admin_pb2.SetRetentionResponse)
    # Newest (v3, also latest) and prod (v1) stay; v2 goes.
    assert list(done.retired_versions) == [v2]
    assert done.adapter.keep_last == 1
    assert {v.version for v in done.adapter.versions} == {v1, v3}
    assert await code_of(served(api, f"{NAME}@{v2}")) == grpc.StatusCode.NOT_FOUND
    assert await served(api, f"{NAME}@prod") == v1
    assert await served(api, NAME) == v3
    record = await audited(Path(str(api.server.settings.audit_log)), "SetRetention", v2)
    assert (record["decision"], record["tenant"], record["adapter"]) == ("allow", TENANT, NAME)

    # Refusals change nothing.
    before = await admin_stub.GetAdapter(admin_pb2.GetAdapterRequest(name=NAME), metadata=as_admin)
    for bad in ({"keep_last": 0}, {"keep_last": -2}, {"keep_last": 3, "keep_all": True}):
        assert await code_of(set_retention(**bad)) == grpc.StatusCode.INVALID_ARGUMENT
    user_call = admin_stub.SetRetention(
        admin_pb2.SetRetentionRequest(name=NAME, keep_last=5), metadata=metadata(TENANT)
    )
    assert await code_of(user_call) == grpc.StatusCode.PERMISSION_DENIED
    after = await admin_stub.GetAdapter(admin_pb2.GetAdapterRequest(name=NAME), metadata=as_admin)
    assert after == before

    # A weighted alias keeps its versions at the next upload; the policy applies there.
    async with api.admin(TENANT) as admin:
        await admin.set_alias_weights(NAME, "canary", {v1: 0.5, v3: 0.5})
        v4 = (await admin.upload_adapter(NAME, api.adapters["qv-r8"])).version
        assert {v.version for v in (await admin.get_adapter(NAME)).versions} == {v1, v3, v4}
        await admin.set_alias(NAME, "canary", v4)  # ends the canary: v3 has no alias now
        v5 = (await admin.upload_adapter(NAME, make_test_adapter(seed=21))).version
        # v5 newest (latest), v1 prod, v4 canary; v3 retired by the upload.
        assert {v.version for v in (await admin.get_adapter(NAME)).versions} == {v1, v4, v5}
    assert await code_of(served(api, f"{NAME}@{v3}")) == grpc.StatusCode.NOT_FOUND
    assert await served(api, f"{NAME}@canary") == v4
