"""Per-version serving metrics through the real gateway: gRPC and the OpenAI-compatible front on
127.0.0.1, the session's vLLM engine, S3 over HTTP (SeaweedFS), /metrics scraped over HTTP.

Expected values come from what the clients sent and received (the version each response names,
its completion tokens and finish reason), never from the gateway's own bookkeeping. The failing
call is a conversation longer than the model's context: a malformed request, INVALID_ARGUMENT
in DESIGN.md's table, refused after its adapter version resolved.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_gateway.v1 import inference_pb2 as pb
from tests.api.conftest import VERSION_METRICS_MAX, ApiEnv, metadata

pytestmark = pytest.mark.engine

TENANT = "vmetrics"
ADAPTER = f"{TENANT}/vm-bot"
#: A conversation longer than the context (max_model_len 256).
TOO_LONG = pb.Messages(messages=[pb.ChatMessage(role="user", content="stretch " * 400)])
_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop"}


@dataclass
class Seen:
    """What the clients saw of one version."""

    ok: int = 0
    tokens: int = 0
    finish: Counter[str] | None = None

    def add(self, tokens: int, finish: str) -> None:
        self.ok += 1
        self.tokens += tokens
        self.finish = (self.finish or Counter()) + Counter({finish: 1})


async def scrape(api: ApiEnv) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """metric sample name -> {sorted labels: value}, from /metrics over HTTP (in a thread)."""
    url = f"http://127.0.0.1:{api.server.metrics_port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
            return text

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_version(
    samples: dict[tuple[tuple[str, str], ...], float], adapter: str, **match: str
) -> dict[str, float]:
    """version label -> the sum of the samples of `adapter` that match `match`."""
    out: dict[str, float] = {}
    for key, value in samples.items():
        labels = dict(key)
        if labels.get("adapter") == adapter and all(labels.get(k) == v for k, v in match.items()):
            out[labels["version"]] = out.get(labels["version"], 0) + value
    return out


async def generate(api: ApiEnv, adapter: str, tenant: str = TENANT) -> tuple[str, int, str]:
    response = await api.stub.Generate(
        pb.GenerateRequest(
            adapter=adapter, text="hello there", sampling=pb.SamplingParams(max_tokens=4)
        ),
        metadata=metadata(tenant),
    )
    finish = _FINISH[response.finish_reason]
    return response.adapter.version, response.usage.completion_tokens, finish


async def test_per_version_counts_errors_and_summary(api: ApiEnv) -> None:
    async with api.admin(TENANT) as admin:
        v1 = await admin.upload_adapter("vm-bot", api.adapters["attn-r8"], aliases=("prod",))
        v2 = await admin.upload_adapter("vm-bot", api.adapters["mlp-r4"])  # latest
        await admin.share_adapter("vm-bot", "globex")
    seen = {v1.version: Seen(), v2.version: Seen()}
    # k = 3 calls on v1 (through its alias), j = 4 on v2: gRPC unary, stream, OpenAI, and one
    # refused with INVALID_ARGUMENT after it resolved.
    for _ in range(3):
        version, tokens, finish = await generate(api, "vm-bot@prod")
        assert version == v1.version
        seen[version].add(tokens, finish)
    version, tokens, finish = await generate(api, "vm-bot@latest")
    assert version == v2.version
    seen[version].add(tokens, finish)
    stream = api.stub.GenerateStream(
        pb.GenerateRequest(
            adapter=f"vm-bot@{v2.version}", text="hi", sampling=pb.SamplingParams(max_tokens=3)
        ),
        metadata=metadata(TENANT),
    )
    messages = [m async for m in stream]
    assert messages[0].adapter.version == v2.version
    seen[v2.version].add(messages[-1].usage.completion_tokens, _FINISH[messages[-1].finish_reason])
    async with api.openai(TENANT) as client:
        done = await client.completions.create(
            model=f"vm-bot@{v2.version}", prompt="hello", max_tokens=2, temperature=0
        )
    seen[v2.version].add(done.usage.completion_tokens, done.choices[0].finish_reason)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await api.stub.Generate(
            pb.GenerateRequest(adapter="vm-bot@latest", messages=TOO_LONG),
            metadata=metadata(TENANT),
        )
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # A grantee's call: its own tenant label in Prometheus, never in the owner's summary.
    version, grantee_tokens, _ = await generate(api, f"{TENANT}/vm-bot@prod", "globex")
    assert version == v1.version

    scraped = await scrape(api)
    requests = scraped["lora_gateway_version_requests_total"]
    ok = by_version(requests, ADAPTER, tenant=TENANT, code="OK")
    assert ok == {v1.version: 3, v2.version: 3}
    invalid = by_version(requests, ADAPTER, tenant=TENANT, code="INVALID_ARGUMENT")
    assert invalid == {v2.version: 1}
    assert by_version(requests, ADAPTER, tenant="globex") == {v1.version: 1}
    tokens = scraped["lora_gateway_version_completion_tokens_total"]
    assert by_version(tokens, ADAPTER, tenant=TENANT) == {v: s.tokens for v, s in seen.items()}
    assert by_version(tokens, ADAPTER, tenant="globex") == {v1.version: grantee_tokens}
    for version, s in seen.items():
        assert s.finish is not None
        for reason, n in s.finish.items():
            finish = scraped["lora_gateway_version_finish_total"]
            assert by_version(finish, ADAPTER, tenant=TENANT, reason=reason)[version] == n
    latency = by_version(
        scraped["lora_gateway_version_request_seconds_count"], ADAPTER, tenant=TENANT
    )
    assert latency == {v1.version: 3, v2.version: 4}  # the refused call has a latency too
    ttft = scraped["lora_gateway_version_time_to_first_token_seconds_count"]
    assert by_version(ttft, ADAPTER, tenant=TENANT) == {v1.version: 3, v2.version: 3}

    async with api.admin(TENANT) as admin:
        info = await admin.get_adapter("vm-bot")
    summary = {s.version: s for s in info.serving}
    assert set(summary) == {v1.version, v2.version}
    first, second = summary[v1.version], summary[v2.version]
    assert (first.requests, first.errors, first.error_codes) == (3, 0, {})  # not globex's
    assert (second.requests, second.errors) == (4, 1)
    assert second.error_codes == {"INVALID_ARGUMENT": 1}
    assert second.error_rate == 0.25
    for version, s in seen.items():
        assert summary[version].completion_tokens == s.tokens
        assert summary[version].finish_reasons == dict(s.finish or {})
        p50, p99 = summary[version].latency_p50_seconds, summary[version].latency_p99_seconds
        assert p50 is not None
        assert p99 is not None
        assert 0 < p50 <= p99
        assert summary[version].ttft_p50_seconds is not None
        assert summary[version].window_seconds == 300


async def test_version_labels_stay_bounded(api: ApiEnv) -> None:
    """More distinct versions than `version_metrics_max` (1 here): each adapter's `version`
    label has at most the bound + the versions its aliases name + "other", the counts sum to
    the calls made, and a version that leaves the set loses its series."""
    name = "vm-many"
    adapter = f"{TENANT}/{name}"
    async with api.admin(TENANT) as admin:
        va = (await admin.upload_adapter(name, api.adapters["attn-r8"], aliases=("prod",))).version
        vb = (await admin.upload_adapter(name, api.adapters["all-r16-rslora"])).version
        vc = (await admin.upload_adapter(name, api.adapters["mlp-r4"])).version
        vd = (await admin.upload_adapter(name, api.adapters["qv-r8"])).version  # latest
    aliased = {va, vd}
    bound = VERSION_METRICS_MAX + len(aliased) + 1
    made = 0
    for version, times in ((va, 2), (vb, 2), (vc, 2), (vd, 1), (vb, 1)):
        for _ in range(times):
            assert (await generate(api, f"{name}@{version}"))[0] == version
            made += 1
            counts = by_version((await scrape(api))["lora_gateway_version_requests_total"], adapter)
            assert len(counts) <= bound, counts
    assert sum(counts.values()) == made == 8
    # prod (va) and latest (vd) have labels; vb took the one free slot; vc counts as "other".
    assert counts == {va: 2, vb: 3, vd: 1, "other": 2}

    # prod moves to vc: vc gets its own labels on its next call; va, no longer aliased and
    # beyond the bound, leaves the set and loses its series (vb served more recently).
    async with api.admin(TENANT) as admin:
        await admin.set_alias(name, "prod", vc)
    assert (await generate(api, f"{name}@prod"))[0] == vc
    scraped = await scrape(api)
    counts = by_version(scraped["lora_gateway_version_requests_total"], adapter)
    assert counts == {vb: 3, vc: 1, vd: 1, "other": 2}
    for metric, samples in scraped.items():
        if metric.startswith("lora_gateway_version_"):
            assert va not in by_version(samples, adapter), metric
    async with api.admin(TENANT) as admin:
        info = await admin.get_adapter(name)
    summary = {s.version: s.requests for s in info.serving}
    assert summary == {vb: 3, vc: 1, vd: 1, "other": 2}


async def test_a_cancelled_stream_counts_as_cancelled(api: ApiEnv) -> None:
    """A caller that goes away mid-stream: one call, code CANCELLED, recorded when the gateway
    closes the call (no finish reason, the tokens it had produced)."""
    name = "vm-cancel"
    adapter = f"{TENANT}/{name}"
    async with api.admin(TENANT) as admin:
        version = (await admin.upload_adapter(name, api.adapters["attn-r8"])).version
    sampling = pb.SamplingParams(max_tokens=200, ignore_eos=True)
    call = api.stub.GenerateStream(
        pb.GenerateRequest(adapter=f"{name}@latest", text="count", sampling=sampling),
        metadata=metadata(TENANT),
    )
    first = await call.read()
    assert first.adapter.version == version
    call.cancel()
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        scraped = await scrape(api)
        requests = by_version(scraped["lora_gateway_version_requests_total"], adapter)
        if requests or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    cancelled = by_version(
        scraped["lora_gateway_version_requests_total"], adapter, code="CANCELLED"
    )
    assert cancelled == {version: 1}
    assert requests == {version: 1}
    assert by_version(scraped.get("lora_gateway_version_finish_total", {}), adapter) == {}
    tokens = by_version(scraped["lora_gateway_version_completion_tokens_total"], adapter)
    assert 0 < tokens[version] < 200
