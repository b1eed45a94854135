"""Inference service: protobuf ↔ domain translation only (validate → from_pb → core → to_pb)."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator

import grpc

from adapter_store import AdapterRef, InvalidAdapter
from lora_gateway import errors
from lora_gateway.chat import ChatMessage
from lora_gateway.engine.base import (
    FinishReason,
    GenerateParams,
    OutputConstraint,
    Prompt,
    TokenLogprob,
)
from lora_gateway.gateway import ChatPrompt, Gateway, GenerateCall, Served
from lora_gateway.interceptors import current_meter, current_principal, note_adapter
from lora_gateway.v1 import inference_pb2 as pb
from lora_gateway.v1 import inference_pb2_grpc as pb_grpc

MAX_PROMPT_CHARS = 200_000
MAX_PROMPT_TOKENS = 65_536
MAX_STOP = 8
MAX_STOP_CHARS = 128
MAX_REQUEST_ID = 128
#: Longest routing key (GenerateRequest.routing_key, the OpenAI front's `user`).
MAX_ROUTING_KEY = 256
#: A chat message role longer than this is refused before it is compared with the roles.
MAX_ROLE_CHARS = 64

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
        structured=constraint_from_pb(sampling.constraint)
        if sampling.HasField("constraint")
        else None,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
        prompt_logprobs=sampling.prompt_logprobs if sampling.HasField("prompt_logprobs") else None,
    )


def constraint_from_pb(constraint: pb.OutputConstraint) -> OutputConstraint:
    """The constraint as given (its limits are the core's to check)."""
    kind = constraint.WhichOneof("kind")
    whitespace = constraint.disable_any_whitespace
    if kind == "json_schema":
        return OutputConstraint(
            json_schema=constraint.json_schema, disable_any_whitespace=whitespace
        )
    if kind == "regex":
        return OutputConstraint(regex=constraint.regex, disable_any_whitespace=whitespace)
    if kind == "choice":
        choices = tuple(constraint.choice.choices)
        return OutputConstraint(choice=choices, disable_any_whitespace=whitespace)
    if kind == "grammar":
        return OutputConstraint(grammar=constraint.grammar, disable_any_whitespace=whitespace)
    if kind == "json_object" and constraint.json_object:
        return OutputConstraint(json_object=True, disable_any_whitespace=whitespace)
    raise errors.InvalidArgument(
        "constraint: set one of json_schema, regex, choice, grammar or json_object"
    )


def chat_from_pb(messages: pb.Messages) -> ChatPrompt:
    """A conversation as given (roles and sizes are checked by the chat templates)."""
    parsed = []
    for index, message in enumerate(messages.messages):
        if len(message.role) > MAX_ROLE_CHARS:
            raise errors.InvalidArgument(f"messages[{index}].role: too long")
        parsed.append(ChatMessage(message.role, message.content))
    add = messages.add_generation_prompt if messages.HasField("add_generation_prompt") else True
    return ChatPrompt(tuple(parsed), add)


def text_prompt(text: str) -> Prompt:
    if not text or len(text) > MAX_PROMPT_CHARS:
        raise errors.InvalidArgument(f"prompt text must be 1..{MAX_PROMPT_CHARS} characters")
    return Prompt(text=text)


def adapter_from_pb(text: str) -> AdapterRef | None:
    if not text:
        return None
    try:
        return AdapterRef.parse(text)
    except InvalidAdapter as exc:
        raise errors.InvalidArgument(f"adapter reference: {exc}") from None


def routing_key(text: str, what: str = "routing_key") -> str:
    """A caller's routing key as given; INVALID_ARGUMENT beyond MAX_ROUTING_KEY printable
    characters."""
    if len(text) > MAX_ROUTING_KEY or not text.isprintable():
        raise errors.InvalidArgument(f"{what}: at most {MAX_ROUTING_KEY} printable characters")
    return text


def call_from_pb(request: pb.GenerateRequest, default_max_tokens: int) -> GenerateCall:
    kind = request.WhichOneof("prompt")
    prompt: Prompt | ChatPrompt
    if kind == "text":
        prompt = text_prompt(request.text)
    elif kind == "token_ids":
        ids = tuple(request.token_ids.ids)
        if not ids or len(ids) > MAX_PROMPT_TOKENS:
            raise errors.InvalidArgument(f"prompt token_ids must be 1..{MAX_PROMPT_TOKENS} ids")
        prompt = Prompt(token_ids=ids)
    elif kind == "messages":
        prompt = chat_from_pb(request.messages)
    else:
        raise errors.InvalidArgument("a prompt (text, token_ids or messages) is required")
    adapter = adapter_from_pb(request.adapter)
    if len(request.request_id) > MAX_REQUEST_ID or not request.request_id.isprintable():
        raise errors.InvalidArgument(f"request_id: at most {MAX_REQUEST_ID} printable characters")
    request_id = f"{request.request_id or 'req'}-{uuid.uuid4().hex[:16]}"
    return GenerateCall(
        adapter,
        prompt,
        params_from_pb(request.sampling, default_max_tokens),
        request_id,
        routing_key(request.routing_key),
    )


def served_to_pb(served: Served) -> pb.ServedAdapter:
    return pb.ServedAdapter(tenant=served.tenant, name=served.name, version=served.version)


def logprobs_to_pb(entries: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    out = []
    for entry in entries:
        message = pb.TokenLogprob(
            token_id=entry.token_id,
            token=entry.token,
            top=[
                pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.token)
                for t in entry.top
            ],
        )
        if entry.logprob is not None:
            message.logprob = entry.logprob
        out.append(message)
    return out


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
        stream = self.gateway.generate(current_principal(), call, current_meter())
        async for served, chunk in stream:
            if not response.HasField("adapter"):
                note_adapter(served.tenant, served.name)
            response.text += chunk.text
            response.token_ids.extend(chunk.token_ids)
            if chunk.logprobs:
                response.logprobs.extend(logprobs_to_pb(chunk.logprobs))
            if chunk.prompt_logprobs:
                response.prompt_logprobs.extend(logprobs_to_pb(chunk.prompt_logprobs))
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
        stream = self.gateway.generate(current_principal(), call, current_meter())
        async for served, chunk in stream:
            message = pb.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids)
            if chunk.logprobs:
                message.logprobs.extend(logprobs_to_pb(chunk.logprobs))
            if chunk.prompt_logprobs:
                message.prompt_logprobs.extend(logprobs_to_pb(chunk.prompt_logprobs))
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

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.TokenizeResponse:
        kind = request.WhichOneof("prompt")
        prompt: Prompt | ChatPrompt
        if kind == "text":
            prompt = text_prompt(request.text)
        elif kind == "messages":
            prompt = chat_from_pb(request.messages)
        else:
            raise errors.InvalidArgument("a prompt (text or messages) is required")
        result = await self.gateway.tokenize(
            current_principal(),
            adapter_from_pb(request.adapter),
            prompt,
            routing_key(request.routing_key),
        )
        return pb.TokenizeResponse(
            token_ids=result.token_ids,
            count=len(result.token_ids),
            rendered=result.rendered or "",
            max_model_len=result.max_model_len,
        )
