"""Inference service: protobuf ↔ domain translation only (validate → from_pb → core → to_pb)."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator

import grpc

from adapter_store import AdapterRef, InvalidAdapter
from lora_gateway import errors
from lora_gateway.engine.base import FinishReason, GenerateParams, Prompt
from lora_gateway.gateway import Gateway, GenerateCall, Served
from lora_gateway.interceptors import current_principal, note_adapter
from lora_gateway.v1 import inference_pb2 as pb
from lora_gateway.v1 import inference_pb2_grpc as pb_grpc

MAX_PROMPT_CHARS = 200_000
MAX_PROMPT_TOKENS = 65_536
MAX_STOP = 8
MAX_STOP_CHARS = 128
MAX_REQUEST_ID = 128

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def _finite(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise errors.InvalidArgument(
            f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}"
        )
    return value


def params_from_pb(sampling: pb.SamplingParams, default_max_tokens: int) -> GenerateParams:
    if len(sampling.stop) > MAX_STOP or any(
        len(s) > MAX_STOP_CHARS or not s for s in sampling.stop
    ):
        raise errors.InvalidArgument(
            f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters"
        )
    if len(sampling.stop_token_ids) > MAX_STOP * 8:
        raise errors.InvalidArgument("stop_token_ids: too many")
    max_tokens = sampling.max_tokens or default_max_tokens
    if sampling.min_tokens > max_tokens:
        raise errors.InvalidArgument("min_tokens must be <= max_tokens")
    return GenerateParams(
        max_tokens=max_tokens,
        temperature=_finite("temperature", sampling.temperature, 0.0, 2.0)
        if sampling.HasField("temperature")
        else 0.0,
        top_p=_finite("top_p", sampling.top_p, 0.0, 1.0, low_open=True)
        if sampling.HasField("top_p")
        else 1.0,
        top_k=sampling.top_k if sampling.HasField("top_k") else 0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
        stop_token_ids=tuple(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        presence_penalty=_finite("presence_penalty", sampling.presence_penalty, -2.0, 2.0)
        if sampling.HasField("presence_penalty")
        else 0.0,
        frequency_penalty=_finite("frequency_penalty", sampling.frequency_penalty, -2.0, 2.0)
        if sampling.HasField("frequency_penalty")
        else 0.0,
        repetition_penalty=_finite(
            "repetition_penalty", sampling.repetition_penalty, 0.0, 2.0, low_open=True
        )
        if sampling.HasField("repetition_penalty")
        else 1.0,
        min_tokens=sampling.min_tokens,
    )


def call_from_pb(request: pb.GenerateRequest, default_max_tokens: int) -> GenerateCall:
    kind = request.WhichOneof("prompt")
    if kind == "text":
        if not request.text or len(request.text) > MAX_PROMPT_CHARS:
            raise errors.InvalidArgument(f"prompt text must be 1..{MAX_PROMPT_CHARS} characters")
        prompt = Prompt(text=request.text)
    elif kind == "token_ids":
        ids = tuple(request.token_ids.ids)
        if not ids or len(ids) > MAX_PROMPT_TOKENS:
            raise errors.InvalidArgument(f"prompt token_ids must be 1..{MAX_PROMPT_TOKENS} ids")
        prompt = Prompt(token_ids=ids)
    else:
        raise errors.InvalidArgument("a prompt (text or token_ids) is required")
    adapter = None
    if request.adapter:
        try:
            adapter = AdapterRef.parse(request.adapter)
        except InvalidAdapter as exc:
            raise errors.InvalidArgument(f"adapter reference: {exc}") from None
    if len(request.request_id) > MAX_REQUEST_ID or not request.request_id.isprintable():
        raise errors.InvalidArgument(f"request_id: at most {MAX_REQUEST_ID} printable characters")
    request_id = f"{request.request_id or 'req'}-{uuid.uuid4().hex[:16]}"
    return GenerateCall(
        adapter, prompt, params_from_pb(request.sampling, default_max_tokens), request_id
    )


def served_to_pb(served: Served) -> pb.ServedAdapter:
    return pb.ServedAdapter(tenant=served.tenant, name=served.name, version=served.version)


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def _call(self, request: pb.GenerateRequest) -> GenerateCall:
        return call_from_pb(request, self.gateway.settings.default_max_tokens)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GenerateResponse:
        call = self._call(request)
        response = pb.GenerateResponse(request_id=call.request_id)
        async for served, chunk in self.gateway.generate(current_principal(), call):
            if not response.HasField("adapter"):
                note_adapter(served.tenant, served.name)
            response.text += chunk.text
            response.token_ids.extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                response.finish_reason = _FINISH[chunk.finish_reason]
                response.usage.prompt_tokens = chunk.prompt_tokens
                response.usage.completion_tokens = chunk.completion_tokens
            response.adapter.CopyFrom(served_to_pb(served))
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self._call(request)
        first = True
        async for served, chunk in self.gateway.generate(current_principal(), call):
            message = pb.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids)
            if first:
                note_adapter(served.tenant, served.name)
                message.adapter.CopyFrom(served_to_pb(served))
                message.request_id = call.request_id
                first = False
            if chunk.finish_reason is not None:
                message.finish_reason = _FINISH[chunk.finish_reason]
                message.usage.prompt_tokens = chunk.prompt_tokens
                message.usage.completion_tokens = chunk.completion_tokens
            yield message
