"""Weighted aliases (canaries) through the real gateway: gRPC on 127.0.0.1, the session's vLLM
engine, S3 over HTTP (SeaweedFS).

The realised split is judged by the binomial distribution (mean n*p, standard deviation
sqrt(n*p*(1-p))), computed here, never by the code under test; the served version is what each
response names. Expected status codes come from DESIGN.md's table: malformed weights
INVALID_ARGUMENT, a revoked version NOT_FOUND (as SetAlias), a lost compare-and-set
FAILED_PRECONDITION (alias conflict), a user key PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest

from lora_gateway import errors
from lora_gateway.client import Adapter, AsyncGatewayClient
from lora_gateway.services.openai_protocol import chat_request, completion_request
from lora_gateway.v1 import inference_pb2 as pb
from tests.api.conftest import ApiEnv, key, metadata

pytestmark = pytest.mark.engine

#: The module's own tenant (tests/api/conftest.py), so that its adapters stay out of the
#: listings other modules check.
TENANT = "canary"
NAME = "canary-bot"
#: Allowed distance of a realised count from its binomial mean, in standard deviations: a
#: correct split fails about once in 150,000 runs; routing that ignores the weights (all on the
#: primary, or an even split) is 13 and 10 standard deviations away at n = 400, p = 0.3.
SIGMAS = 4.5
REQUESTS = 400
CANARY_WEIGHT = 0.3
#: Requests in flight at once (the tenant may have 64).
PARALLEL = 32


@dataclass(frozen=True)
class Canary:
    stable: str
    canary: str
    #: A version of NAME that was revoked.
    revoked: str


@pytest.fixture(scope="module")
async def versions(api: ApiEnv) -> Canary:
    async with api.admin(TENANT) as admin:
        stable = await admin.upload_adapter(NAME, api.adapters["attn-r8"], aliases=("prod",))
        canary = await admin.upload_adapter(NAME, api.adapters["mlp-r4"])
        gone = await admin.upload_adapter(NAME, api.adapters["all-r16-rslora"])
        await admin.revoke_adapter(NAME, gone.version)
    return Canary(stable.version, canary.version, gone.version)


async def served(api: ApiEnv, routing_key: str = "", adapter: str = f"{NAME}@prod") -> str:
    request = pb.GenerateRequest(
        adapter=adapter,
        text="hello",
        sampling=pb.SamplingParams(max_tokens=1, temperature=0.0),
        routing_key=routing_key,
    )
    response = await api.stub.Generate(request, metadata=metadata(TENANT))
    assert response.adapter.name == NAME
    return response.adapter.version


async def served_many(api: ApiEnv, keys: list[str]) -> list[str]:
    gate = asyncio.Semaphore(PARALLEL)

    async def one(routing_key: str) -> str:
        async with gate:
            return await served(api, routing_key)

    return list(await asyncio.gather(*(one(k) for k in keys)))


def within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


async def test_the_split_matches_the_weights_and_sticks_to_the_routing_key(
    api: ApiEnv, versions: Canary
) -> None:
    split = {versions.stable: 1 - CANARY_WEIGHT, versions.canary: CANARY_WEIGHT}
    async with api.admin(TENANT) as admin:
        info = await admin.set_alias_weights(NAME, "prod", split)
        assert info.alias_weights == {"prod": split}
        assert info.aliases["prod"] == versions.stable  # the primary version
        assert (await admin.get_adapter(NAME)).alias_weights == {"prod": split}
        listed = {a.name: a for a in (await admin.list_adapters()).adapters}
        assert listed[NAME].alias_weights == {"prod": split}
    keys = [f"conversation-{i}" for i in range(REQUESTS)]
    first = await served_many(api, keys)
    counts = Counter(first)
    assert set(counts) == {versions.stable, versions.canary}
    assert within_binomial(counts[versions.canary], REQUESTS, CANARY_WEIGHT), counts
    # Sticky: a key gets the version it got, every time (keys on either version).
    sample = [keys[first.index(versions.canary)], keys[first.index(versions.stable)]]
    sample += keys[:3]
    for routing_key in sample:
        again = [await served(api, routing_key) for _ in range(20)]
        assert again == [first[keys.index(routing_key)]] * 20
    # Without a routing key each request draws by its own request id: both versions serve.
    unkeyed = Counter(await asyncio.gather(*(served(api) for _ in range(40))))
    assert set(unkeyed) == {versions.stable, versions.canary}, unkeyed
    # An exact version is untouched by the weights.
    for version in (versions.stable, versions.canary):
        assert await served(api, "conversation-0", f"{NAME}@{version}") == version


async def test_all_weight_on_one_version_ends_the_canary(api: ApiEnv, versions: Canary) -> None:
    async with api.admin(TENANT) as admin:
        await admin.set_alias_weights(NAME, "prod", {versions.stable: 0.5, versions.canary: 0.5})
        info = await admin.set_alias_weights(NAME, "prod", {versions.canary: 1.0})
        assert (info.alias_weights, info.aliases["prod"]) == ({}, versions.canary)
        assert (await admin.get_adapter(NAME)).alias_weights == {}
    keys = [f"ended-{i}" for i in range(40)]
    assert await served_many(api, keys) == [versions.canary] * 40
    async with api.admin(TENANT) as admin:  # SetAlias ends one as well
        await admin.set_alias_weights(NAME, "prod", {versions.stable: 0.5, versions.canary: 0.5})
        info = await admin.set_alias(NAME, "prod", versions.stable)
        assert (info.alias_weights, info.aliases["prod"]) == ({}, versions.stable)
    assert await served_many(api, keys) == [versions.stable] * 40


async def test_bad_weights_are_refused_and_change_nothing(api: ApiEnv, versions: Canary) -> None:
    stable, canary = versions.stable, versions.canary
    async with api.admin(TENANT) as admin:
        await admin.set_alias_weights(NAME, "prod", {stable: 0.8, canary: 0.2})
        before: Adapter = await admin.get_adapter(NAME)
        five = {f"sha256:{d * 64}": 0.2 for d in "12345"}
        refusals: list[tuple[dict[str, float], type[errors.GatewayError], str]] = [
            ({stable: 0.8, canary: 0.1}, errors.InvalidArgument, "sum to 1"),
            ({stable: 1.2, canary: -0.2}, errors.InvalidArgument, "> 0"),
            ({stable: 1.0, canary: 0.0}, errors.InvalidArgument, "> 0"),
            ({stable: math.nan, canary: 0.5}, errors.InvalidArgument, "finite"),
            ({stable: math.inf}, errors.InvalidArgument, "finite"),
            ({}, errors.InvalidArgument, "at least one"),
            (five, errors.InvalidArgument, "at most 4 versions"),
            ({stable: 0.5, "latest-but-bad!": 0.5}, errors.InvalidArgument, "alias"),
            ({stable: 0.9, versions.revoked: 0.1}, errors.NotFound, "not found"),
            ({stable: 0.9, "no-such-alias": 0.1}, errors.NotFound, "not found"),
        ]
        for weights, expected_error, text in refusals:
            with pytest.raises(expected_error, match=text):
                await admin.set_alias_weights(NAME, "prod", weights)
        with pytest.raises(errors.FailedPrecondition, match="not the expected"):
            await admin.set_alias_weights(
                NAME, "prod", {stable: 0.5, canary: 0.5}, expected={stable: 0.9, canary: 0.1}
            )
        # Another tenant's adapter reads like a missing one; a user key may not write.
        async with api.admin("globex") as other:
            with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
                await other.set_alias_weights(NAME, "prod", {stable: 1.0}, tenant=TENANT)
        async with AsyncGatewayClient(api.target, key(TENANT, "user")) as user:
            with pytest.raises(errors.PermissionDenied):
                await user.set_alias_weights(NAME, "prod", {stable: 1.0})
        assert await admin.get_adapter(NAME) == before


async def test_concurrent_weight_writes_with_expected_lose_nothing(
    api: ApiEnv, versions: Canary
) -> None:
    """Writers each move 0.01 of the weight to the canary by compare-and-set, retrying when they
    lose (FAILED_PRECONDITION): every move counts."""
    stable, canary = versions.stable, versions.canary
    writers, moves = 4, 3
    lost = [0]

    async def writer() -> None:
        async with api.admin(TENANT) as admin:
            for _ in range(moves):
                while True:
                    split = dict((await admin.get_adapter(NAME)).alias_weights["prod"])
                    share = split[canary] + 0.01
                    try:
                        await admin.set_alias_weights(
                            NAME, "prod", {stable: 1 - share, canary: share}, expected=split
                        )
                        break
                    except errors.FailedPrecondition:
                        lost[0] += 1

    async with api.admin(TENANT) as admin:
        await admin.set_alias_weights(NAME, "prod", {stable: 0.9, canary: 0.1})
        await asyncio.gather(*(writer() for _ in range(writers)))
        split = (await admin.get_adapter(NAME)).alias_weights["prod"]
    assert split[canary] == pytest.approx(0.1 + writers * moves * 0.01, abs=1e-9)


async def test_an_invalid_routing_key_is_refused(api: ApiEnv, versions: Canary) -> None:
    for bad in ("x" * 257, "line\nbreak"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await served(api, bad)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "routing_key" in (caught.value.details() or "")
        tokenize = pb.TokenizeRequest(adapter=f"{NAME}@prod", text="hi", routing_key=bad)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.Tokenize(tokenize, metadata=metadata(TENANT))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    tokenize = pb.TokenizeRequest(adapter=f"{NAME}@prod", text="hi", routing_key="k")
    assert (await api.stub.Tokenize(tokenize, metadata=metadata(TENANT))).count > 0


def test_the_openai_front_takes_the_header_then_user() -> None:
    body = {"model": "bot@prod", "prompt": "hi", "user": "end-user-7"}
    parse = {"base_name": "base", "default_max_tokens": 4}
    assert completion_request(body, **parse).call.routing_key == "end-user-7"
    with_header = completion_request(body, **parse, routing_header="session-1")
    assert with_header.call.routing_key == "session-1"
    chat = {"model": "bot@prod", "messages": [{"role": "user", "content": "hi"}]}
    assert chat_request(chat, **parse).call.routing_key == ""
    assert chat_request({**chat, "user": "u"}, **parse).call.routing_key == "u"
    with pytest.raises(errors.InvalidArgument, match="user"):
        chat_request({**chat, "user": "u" * 257}, **parse)
