"""Automatic rollback through the real gateway: gRPC on 127.0.0.1, the session's vLLM engine,
S3 over HTTP (SeaweedFS), the package's gateway (canaries checked every 0.25 s).

A canary version "starts failing": a wrapper around the engine (installed in the gateway for
this module only) fails every request on that version the way the engine fails a request
(UNAVAILABLE, "engine failed the request"); every other request runs on the real engine. The
same traffic on a healthy canary, and on a failing one below its policy's minimum of calls,
must move nothing. Codes from DESIGN.md's table: a bad policy INVALID_ARGUMENT, a user key
PERMISSION_DENIED, another tenant's adapter NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lora_gateway import errors
from lora_gateway.client import Adapter, AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.base import GenerateParams, LoadedAdapter, Prompt, TokenChunk
from lora_gateway.v1 import admin_pb2, admin_pb2_grpc
from tests.api.conftest import ROLLBACK_CHECK_S, ApiEnv, key, metadata
from tests.api.test_version_metrics import scrape

pytestmark = pytest.mark.engine

TENANT = "rollback"
OPTIONS = GenerateOptions(max_tokens=1, temperature=0.0)
POLICY: dict[str, Any] = {"max_error_rate": 0.25, "min_requests": 4, "window_s": 120.0}
PROMPT = "the quick brown"


class FailingVersions:
    """The engine, except that requests on the versions in `failing` (sha256 hex) fail in it
    as the engine fails a request (its errors reach the gateway as UNAVAILABLE)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.failing: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(
        self, request_id: str, prompt: Prompt, params: GenerateParams, adapter: LoadedAdapter | None
    ) -> AsyncIterator[TokenChunk]:
        return self._generate(request_id, prompt, params, adapter)

    async def _generate(
        self, request_id: str, prompt: Prompt, params: GenerateParams, adapter: LoadedAdapter | None
    ) -> AsyncIterator[TokenChunk]:
        if adapter is not None and adapter.lora_name.rpartition("sha256:")[2] in self.failing:
            raise errors.Unavailable("engine failed the request")
        async for chunk in self.engine.generate(request_id, prompt, params, adapter):
            yield chunk


@pytest.fixture(scope="module")
def failing(api: ApiEnv) -> Iterator[FailingVersions]:
    gateway = api.server.gateway
    real = gateway.engine
    wrapper = FailingVersions(real)
    gateway.engine = wrapper  # type: ignore[assignment]
    yield wrapper
    gateway.engine = real


async def _versions(api: ApiEnv) -> dict[str, str]:
    """svc and quiet: v1 (attn-r8; aliases bad, good, prod), v2 (mlp-r4), v3 (qv-r8)."""
    out: dict[str, str] = {}
    async with api.admin(TENANT) as admin:
        for name, aliases in (("svc", ("bad", "good")), ("quiet", ("prod",))):
            v1 = await admin.upload_adapter(name, api.adapters["attn-r8"], aliases=aliases)
            v2 = await admin.upload_adapter(name, api.adapters["mlp-r4"])
            v3 = await admin.upload_adapter(name, api.adapters["qv-r8"])
            out.update({"v1": v1.version, "v2": v2.version, "v3": v3.version})
    return out


async def drive(
    user: AsyncGatewayClient, ref: str, tag: str, enough: Callable[[dict[str, int]], bool]
) -> dict[str, int]:
    """Generate on `ref` with fresh routing keys until `enough(outcomes)` (at most 80 calls):
    outcome -> count, an outcome being the version served or the error's code name."""
    outcomes: dict[str, int] = {}
    for i in range(80):
        try:
            result = await user.generate(ref, PROMPT, OPTIONS, routing_key=f"{tag}-{i}")
            assert result.adapter is not None
            outcome = result.adapter.version
        except errors.GatewayError as exc:
            outcome = exc.code.name
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if enough(outcomes):
            return outcomes
    raise AssertionError(f"not enough calls of the kind wanted on {ref}: {outcomes}")


async def until_rolled_back(admin: AsyncGatewayClient, name: str, alias: str) -> Adapter:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = await admin.get_adapter(name)
        if alias in info.rollbacks:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}@{alias} was not rolled back within 10 s")


def _audit_lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_failing_canary_is_rolled_back_by_itself(
    api: ApiEnv, failing: FailingVersions
) -> None:
    v = await _versions(api)
    v1, v2, v3 = v["v1"], v["v2"], v["v3"]
    failing.failing = {v2.removeprefix("sha256:")}
    async with (
        api.admin(TENANT) as admin,
        AsyncGatewayClient(api.target, key(TENANT), max_retries=0) as user,
    ):
        for name, alias, canary, policy in (
            ("svc", "bad", v2, POLICY),
            ("svc", "good", v3, POLICY),
            ("quiet", "prod", v2, {**POLICY, "min_requests": 50}),
        ):
            await admin.set_rollback_policy(name, alias, **policy)
            split = await admin.set_alias_weights(name, alias, {v1: 0.5, canary: 0.5})
            assert split.alias_stable[alias] == v1  # the version it pointed at before
        before = await scrape(api)

        # The same traffic on the three canaries: 4 failed calls of the failing one are its
        # policy's minimum (an error rate of 1 > 0.25), and it is rolled back within a few
        # checks; the healthy one serves 6 calls; the other failing one fails 6 times, below
        # its minimum of 50.
        bad = await drive(user, "svc@bad", "bad", lambda o: o.get("UNAVAILABLE", 0) >= 4)
        assert set(bad) <= {v1, "UNAVAILABLE"}, bad
        crossed = time.monotonic()
        info = await until_rolled_back(admin, "svc", "bad")
        print(f"rolled back {time.monotonic() - crossed:.2f}s after the 4th failed call")
        good = await drive(user, "svc@good", "good", lambda o: o.get(v3, 0) >= 6)
        assert set(good) == {v1, v3}, good  # never an error
        quiet = await drive(user, "quiet@prod", "quiet", lambda o: o.get("UNAVAILABLE", 0) >= 6)
        assert set(quiet) <= {v1, "UNAVAILABLE"}, quiet

        assert info.aliases["bad"] == v1
        assert "bad" not in info.alias_weights
        assert "bad" not in info.alias_stable
        record = info.rollbacks["bad"]
        assert (record.canary, record.stable, record.reason) == (v2, v1, "error_rate")
        assert (record.value, record.threshold) == (1.0, 0.25)
        assert record.requests >= 4
        assert record.split == {v1: 0.5, v2: 0.5}
        assert record.replica
        assert info.rollback_policies["bad"].max_error_rate == 0.25  # kept for the next canary

        # Afterwards every request on the alias resolves to the stable version.
        after = await drive(user, "svc@bad", "after", lambda o: sum(o.values()) >= 16)
        assert after == {v1: 16}

        # The healthy canary and the one below its minimum are still canaries, checks later.
        await asyncio.sleep(3 * ROLLBACK_CHECK_S)
        svc = await admin.get_adapter("svc")
        assert svc.alias_weights["good"] == {v1: 0.5, v3: 0.5}
        assert "good" not in svc.rollbacks
        assert svc.alias_stable["good"] == v1
        quiet_info = await admin.get_adapter("quiet")
        assert quiet_info.alias_weights["prod"] == {v1: 0.5, v2: 0.5}
        assert quiet_info.rollbacks == {}

    # Audited, by no principal: the gateway itself.
    path = Path(str(api.server.settings.audit_log))
    for _ in range(50):
        records = [
            r
            for r in await asyncio.to_thread(_audit_lines, path)
            if r["rpc"] == "automatic-rollback" and r["tenant"] == TENANT
        ]
        if records:
            break
        await asyncio.sleep(0.1)
    assert len(records) == 1, records
    audit = records[0]
    assert (audit["tenant"], audit["adapter"], audit["version"]) == (TENANT, "svc", v1)
    assert (audit["principal_tenant"], audit["role"], audit["key_id"]) == ("", "", "")
    assert "error_rate 1 > 0.25" in audit["detail"]
    assert "bad:" in audit["detail"]
    # Counted in Prometheus, once, under the owner and the adapter.
    after_metrics = await scrape(api)
    labels = (("adapter", f"{TENANT}/svc"), ("reason", "error_rate"), ("tenant", TENANT))
    series = "lora_gateway_rollbacks_total"
    assert after_metrics[series][labels] - before.get(series, {}).get(labels, 0.0) == 1.0
    assert not any(dict(k)["adapter"] == f"{TENANT}/quiet" for k in after_metrics[series])


async def test_bad_rollback_policies_are_refused_and_change_nothing(api: ApiEnv) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "give at least one of"),
        ({"max_error_rate": 1.0}, "max_error_rate must be in [0, 1)"),
        ({"max_error_rate": -0.5}, "max_error_rate must be in [0, 1)"),
        ({"max_error_rate": float("nan")}, "max_error_rate must be a finite number"),
        ({"max_length_rate": 2.0}, "max_length_rate must be in [0, 1)"),
        ({"min_eval_score": 1.5}, "min_eval_score must be in (0, 1]"),
        ({"max_error_rate": 0.1, "min_requests": 200_000}, "min_requests must be in [1, 100000]"),
        ({"max_error_rate": 0.1, "window_s": -1.0}, "window_s must be in (0, 86400]"),
        ({"max_error_rate": 0.1, "window_s": 1e6}, "window_s must be in (0, 86400]"),
        ({"min_eval_score": 0.5, "eval_interval_s": 0.5}, "eval_interval_s must be in [1, "),
    ]
    async with api.admin(TENANT) as admin:
        await admin.upload_adapter("strict", api.adapters["attn-r8"], aliases=("prod",))
        await admin.set_rollback_policy("strict", "prod", max_error_rate=0.5)
        before = await admin.get_adapter("strict")
        for fields, reason in bad:
            with pytest.raises(errors.InvalidArgument) as refused:
                await admin.set_rollback_policy("strict", "prod", **fields)
            assert f"rollback policy: {reason}" in str(refused.value), (fields, refused.value)
        with pytest.raises(errors.InvalidArgument, match="invalid alias"):
            await admin.set_rollback_policy("strict", "../x", max_error_rate=0.5)
        after = await admin.get_adapter("strict")
        assert (after.rollback_policies, after.aliases) == (
            before.rollback_policies,
            before.aliases,
        )
        assert after.rollback_policies["prod"].max_error_rate == 0.5
    # The raw request: a policy and `remove` together, or neither.
    stub = admin_pb2_grpc.AdminStub(api.channel)
    policy = admin_pb2.RollbackPolicy(max_error_rate=0.1)
    for request in (
        admin_pb2.SetRollbackPolicyRequest(name="strict", alias="prod", policy=policy, remove=True),
        admin_pb2.SetRollbackPolicyRequest(name="strict", alias="prod"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await stub.SetRollbackPolicy(request, metadata=metadata(TENANT, "admin"))
        assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "give a policy, or remove" in str(raw.value.details())
    async with api.admin(TENANT) as admin:
        assert (await admin.get_adapter("strict")).rollback_policies == before.rollback_policies
    async with AsyncGatewayClient(api.target, key(TENANT)) as user:
        with pytest.raises(errors.PermissionDenied):
            await user.set_rollback_policy("strict", "prod", max_error_rate=0.1)
    async with api.admin("globex") as other:
        with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
            await other.set_rollback_policy("strict", "prod", max_error_rate=0.1, tenant=TENANT)
    async with api.admin(TENANT) as admin:
        removed = await admin.remove_rollback_policy("strict", "prod")
        assert removed.rollback_policies == {}
