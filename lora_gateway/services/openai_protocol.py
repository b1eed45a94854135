"""OpenAI's request and response shapes ↔ the gateway's plain types (JSON in, JSON out).

Requests: `/v1/completions` and `/v1/chat/completions` bodies become a `GenerateCall` (and
whether to stream); `model` is an adapter reference (`name`, `name@alias`, `owner/name`,
`name@sha256:...`) or the base model's name. Fields OpenAI defines are read with OpenAI's
defaults (temperature 1, top_p 1, n 1); vLLM's extensions that this gateway also has are read
too (`top_k`, `min_tokens`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`,
`prompt_logprobs`, `add_generation_prompt`, and `structured_outputs` with `json`, `regex`,
`choice`, `grammar`, `json_object`, `disable_any_whitespace`), so vLLM's clients work too.
`response_format` (`json_object`, `json_schema`) overrides the constraint kind of
`structured_outputs`, as in vLLM. What the gateway cannot do is refused (400), never ignored:
n > 1, echo, best_of > 1, suffix, logit_bias, tools and functions, audio.
Unknown fields are ignored (new client versions add optional ones). The routing key of a
weighted alias (a canary: which version serves, sticky per key) is the `x-routing-key` header,
else OpenAI's `user` field (a stable id of the end user), else the request id.

Responses follow OpenAI's objects: `text_completion`, `chat.completion`, their streaming
chunks, and the `model` list. A completion's `model` (and every chunk's) names what served it,
as OpenAI's own API answers a model alias with the dated snapshot it resolved to: the adapter
reference pinned to the exact version (`served_model`: `invoices@prod` is answered as
`invoices@sha256:<hex>`, the version a weighted alias chose), or the base model's name. Errors
are `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from adapter_store import AdapterRef, InvalidAdapter
from lora_gateway import errors
from lora_gateway.chat import ChatMessage
from lora_gateway.engine.base import (
    FinishReason,
    GenerateParams,
    OutputConstraint,
    Prompt,
    TokenChunk,
    TokenLogprob,
)
from lora_gateway.gateway import ChatPrompt, GenerateCall, ModelEntry, Served
from lora_gateway.services.inference import (
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_REQUEST_ID,
    MAX_STOP,
    MAX_STOP_CHARS,
    routing_key,
)

#: HTTP status of each gRPC status code (google.rpc's own mapping, as grpc-gateway uses it).
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
#: OpenAI's error `type` per HTTP status.
ERROR_TYPE: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.ABORT: "abort",
}
_ROLES = {"developer": "system"}  # OpenAI's newer name of the system role


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if code is None and status == 404 and message == errors.ADAPTER_NOT_FOUND_TEXT:
        code = "model_not_found"
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPE.get(status, "server_error"),
            "param": None,
            "code": code,
        }
    }


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A parsed completion or chat request."""

    call: GenerateCall
    model: str
    stream: bool
    include_usage: bool
    #: Return logprobs (chat: `logprobs: true`; completions: `logprobs: N`).
    logprobs: bool


class _Body:
    """Typed reads of a JSON object, each failure a 400 naming the field."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body

    def _get(self, name: str) -> Any:
        value = self.body.get(name)
        return None if value is None else value

    def string(self, name: str, *, required: bool = False) -> str | None:
        value = self._get(name)
        if value is None:
            if required:
                raise errors.InvalidArgument(f"{name}: required")
            return None
        if not isinstance(value, str):
            raise errors.InvalidArgument(f"{name}: expected a string")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise errors.InvalidArgument(f"{name}: expected true or false")
        return value

    def integer(self, name: str, low: int, high: int) -> int | None:
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise errors.InvalidArgument(f"{name}: expected an integer in [{low}, {high}]")
        return value

    def number(
        self, name: str, low: float, high: float, default: float, *, low_open: bool = False
    ) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise errors.InvalidArgument(f"{name}: expected a number")
        number = float(value)
        if not math.isfinite(number) or not low <= number <= high or (low_open and number == low):
            bracket = "(" if low_open else "["
            raise errors.InvalidArgument(f"{name}: must be in {bracket}{low:g}, {high:g}]")
        return number

    def absent(self, name: str, why: str, *, allowed: Sequence[object] = ()) -> None:
        """Refuse a field this gateway does not implement (unless empty or an allowed value)."""
        value = self._get(name)
        if value is None or value in allowed or value in ([], {}, ""):
            return
        raise errors.InvalidArgument(f"{name}: {why}")


def parse_model(model: str, base_name: str) -> AdapterRef | None:
    """The adapter `model` names (None: the base model)."""
    if model == base_name:
        return None
    if not model:
        raise errors.InvalidArgument("model: required (an adapter name or the base model's)")
    try:
        return AdapterRef.parse(model)
    except InvalidAdapter as exc:
        raise errors.InvalidArgument(f"model: {exc}") from None


def _stop(body: _Body) -> tuple[str, ...]:
    value = body.body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or any(not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in stops)
    ):
        raise errors.InvalidArgument(
            f"stop: a string or at most {MAX_STOP} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters"
        )
    return tuple(stops)


def _token_list(value: object, name: str) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in value
    ):
        return None
    if not value or len(value) > MAX_PROMPT_TOKENS:
        raise errors.InvalidArgument(f"{name}: 1..{MAX_PROMPT_TOKENS} token ids")
    return tuple(value)


def _constraint(body: _Body) -> OutputConstraint | None:
    """`structured_outputs` (vLLM's extension), with `response_format` overriding its kind."""
    extension = body.body.get("structured_outputs")
    if extension is not None and not isinstance(extension, dict):
        raise errors.InvalidArgument("structured_outputs: expected an object")
    fields: dict[str, Any] = dict(extension or {})
    whitespace = fields.pop("disable_any_whitespace", False)
    if not isinstance(whitespace, bool):
        raise errors.InvalidArgument("structured_outputs.disable_any_whitespace: true or false")
    kinds = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(kinds) - {"json", "regex", "choice", "grammar", "json_object"})
    if unknown:
        raise errors.InvalidArgument(f"structured_outputs: not supported: {', '.join(unknown)}")
    response_format = body.body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or not isinstance(
            response_format.get("type"), str
        ):
            raise errors.InvalidArgument("response_format: expected an object with a type")
        kind = response_format["type"]
        if kind == "json_object":
            kinds = {"json_object": True}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise errors.InvalidArgument(
                    "response_format.json_schema.schema: a JSON schema (an object) is required"
                )
            kinds = {"json": schema}
        elif kind != "text":
            raise errors.InvalidArgument(
                f"response_format.type: {kind[:32]!r} is not one of text, json_object, json_schema"
            )
    if not kinds:
        if whitespace:
            raise errors.InvalidArgument("disable_any_whitespace applies to JSON constraints only")
        return None
    if len(kinds) > 1:
        raise errors.InvalidArgument("structured_outputs: exactly one constraint kind")
    ((kind, value),) = kinds.items()
    if kind == "json":
        text = value if isinstance(value, str) else json.dumps(value)
        return OutputConstraint(json_schema=text, disable_any_whitespace=whitespace)
    if kind == "json_object":
        if value is not True:
            raise errors.InvalidArgument("structured_outputs.json_object: true")
        return OutputConstraint(json_object=True, disable_any_whitespace=whitespace)
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise errors.InvalidArgument("structured_outputs.choice: a list of strings")
        return OutputConstraint(choice=tuple(value), disable_any_whitespace=whitespace)
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"structured_outputs.{kind}: a string")
    if kind == "regex":
        return OutputConstraint(regex=value, disable_any_whitespace=whitespace)
    return OutputConstraint(grammar=value, disable_any_whitespace=whitespace)


def _params(
    body: _Body, default_max_tokens: int, logprobs: int | None, max_tokens_field: str
) -> GenerateParams:
    max_tokens = body.integer(max_tokens_field, 1, 2**31 - 1)
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = body.integer("max_tokens", 1, 2**31 - 1)
    min_tokens = body.integer("min_tokens", 0, 2**31 - 1) or 0
    max_tokens = max_tokens or default_max_tokens
    if min_tokens > max_tokens:
        raise errors.InvalidArgument("min_tokens: must be <= max_tokens")
    stop_ids = body.body.get("stop_token_ids")
    if stop_ids is not None and (
        not isinstance(stop_ids, list)
        or len(stop_ids) > MAX_STOP * 8
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids)
    ):
        raise errors.InvalidArgument("stop_token_ids: a short list of token ids")
    seed = body.integer("seed", -(2**63), 2**64 - 1)
    top_k = body.integer("top_k", -1, 2**31 - 1)
    return GenerateParams(
        max_tokens=max_tokens,
        temperature=body.number("temperature", 0.0, 2.0, 1.0),
        top_p=body.number("top_p", 0.0, 1.0, 1.0, low_open=True),
        top_k=max(top_k or 0, 0),
        seed=None if seed is None else seed % 2**64,
        stop=_stop(body),
        stop_token_ids=tuple(stop_ids or ()),
        ignore_eos=body.boolean("ignore_eos"),
        presence_penalty=body.number("presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=body.number("frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=body.number("repetition_penalty", 0.0, 2.0, 1.0, low_open=True),
        min_tokens=min_tokens,
        structured=_constraint(body),
        logprobs=logprobs,
        prompt_logprobs=body.integer("prompt_logprobs", 0, 2**31 - 1),
    )


def _common(body: _Body) -> None:
    body.absent("n", "only 1 completion per request is supported", allowed=(1,))
    body.absent("logit_bias", "not supported")
    body.absent("tools", "tool calling is not supported")
    body.absent("functions", "function calling is not supported")
    body.absent("tool_choice", "tool calling is not supported", allowed=("none",))
    body.absent("function_call", "function calling is not supported", allowed=("none",))
    body.absent("audio", "audio output is not supported")
    modalities = body.body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise errors.InvalidArgument('modalities: only ["text"] is supported')


def _request_id(prefix: str, given: str | None) -> str:
    tag = given if given and len(given) <= MAX_REQUEST_ID and given.isprintable() else prefix
    return f"{tag}-{uuid.uuid4().hex[:16]}"


def _routing_key(body: _Body, header: str | None) -> str:
    """The `x-routing-key` header, else the `user` field, else "" (the request id)."""
    if header:
        return routing_key(header, "x-routing-key")
    return routing_key(body.string("user") or "", "user")


def _stream_options(body: _Body, stream: bool) -> bool:
    options = body.body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise errors.InvalidArgument("stream_options: expected an object")
    if not stream:
        raise errors.InvalidArgument("stream_options: only with stream: true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise errors.InvalidArgument("stream_options.include_usage: true or false")
    return include


def _as_object(raw: object) -> _Body:
    if not isinstance(raw, dict):
        raise errors.InvalidArgument("the request body must be a JSON object")
    return _Body(raw)


def completion_request(
    raw: object,
    *,
    base_name: str,
    default_max_tokens: int,
    request_id: str | None = None,
    routing_header: str | None = None,
) -> Request:
    body = _as_object(raw)
    _common(body)
    body.absent("echo", "echo is not supported", allowed=(False,))
    body.absent("best_of", "only best_of 1 is supported", allowed=(1,))
    body.absent("suffix", "suffix is not supported")
    model = body.string("model", required=True) or ""
    prompt_value = body.body.get("prompt")
    if (
        isinstance(prompt_value, list)
        and len(prompt_value) == 1
        and not isinstance(prompt_value[0], int)
    ):
        prompt_value = prompt_value[0]  # a batch of one
    prompt: Prompt
    if isinstance(prompt_value, str):
        if not prompt_value or len(prompt_value) > MAX_PROMPT_CHARS:
            raise errors.InvalidArgument(f"prompt: 1..{MAX_PROMPT_CHARS} characters")
        prompt = Prompt(text=prompt_value)
    else:
        ids = _token_list(prompt_value, "prompt")
        if ids is None:
            raise errors.InvalidArgument(
                "prompt: a string or a list of token ids (one prompt per request)"
            )
        prompt = Prompt(token_ids=ids)
    logprobs = body.integer("logprobs", 0, 2**31 - 1)
    stream = body.boolean("stream")
    return Request(
        call=GenerateCall(
            parse_model(model, base_name),
            prompt,
            _params(body, default_max_tokens, logprobs, "max_tokens"),
            _request_id("cmpl", request_id),
            _routing_key(body, routing_header),
        ),
        model=model,
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs is not None,
    )


def _content(value: object, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise errors.InvalidArgument(
                    f"messages[{index}].content: only text parts are supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise errors.InvalidArgument(f"messages[{index}].content: a text part's text")
            parts.append(text)
        return "".join(parts)
    raise errors.InvalidArgument(f"messages[{index}].content: a string or a list of text parts")


def chat_request(
    raw: object,
    *,
    base_name: str,
    default_max_tokens: int,
    request_id: str | None = None,
    routing_header: str | None = None,
) -> Request:
    body = _as_object(raw)
    _common(body)
    model = body.string("model", required=True) or ""
    messages = body.body.get("messages")
    if not isinstance(messages, list):
        raise errors.InvalidArgument("messages: a list of {role, content} objects is required")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise errors.InvalidArgument(f"messages[{index}]: expected an object")
        role = message.get("role")
        if not isinstance(role, str) or len(role) > 64:
            raise errors.InvalidArgument(f"messages[{index}].role: a string is required")
        if message.get("tool_calls") or message.get("function_call"):
            raise errors.InvalidArgument(f"messages[{index}]: tool calls are not supported")
        content = message.get("content")
        text = "" if content is None and role == "assistant" else _content(content, index)
        parsed.append(ChatMessage(_ROLES.get(role, role), text))
    logprobs = body.boolean("logprobs")
    top = body.integer("top_logprobs", 0, 2**31 - 1)
    if top is not None and not logprobs:
        raise errors.InvalidArgument("top_logprobs: needs logprobs: true")
    stream = body.boolean("stream")
    return Request(
        call=GenerateCall(
            parse_model(model, base_name),
            ChatPrompt(tuple(parsed), body.boolean("add_generation_prompt", True)),
            _params(
                body, default_max_tokens, (top or 0) if logprobs else None, "max_completion_tokens"
            ),
            _request_id("chatcmpl", request_id),
            _routing_key(body, routing_header),
        ),
        model=model,
        stream=stream,
        include_usage=_stream_options(body, stream),
        logprobs=logprobs,
    )


# --- responses --------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


def served_model(request: Request, served: Served) -> str:
    """The response's `model`: the request's adapter reference pinned to the version that
    served it (`name@sha256:<hex>`, `owner/name@sha256:<hex>` when the request named the
    owner), so that sending it back as `model` gets the same version; the request's `model`
    for the base model."""
    ref = request.call.adapter
    if ref is None or not served.version.startswith("sha256:"):
        return request.model
    return str(AdapterRef(owner=ref.owner, name=ref.name, version=served.version[7:]))


def usage(chunk: TokenChunk) -> dict[str, int]:
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
    }


def finish(chunk: TokenChunk) -> str | None:
    return None if chunk.finish_reason is None else _FINISH[chunk.finish_reason]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", "surrogatepass"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion: one entry per generated token."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _bytes(e.token),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)}
                    for t in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of a (legacy) completion: parallel lists; `text_offset` counts
    characters from the start of the completion (`offset` for a streamed chunk)."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
        "text_offset": offsets,
    }


def models_list(entries: Sequence[ModelEntry]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": e.id,
                "object": "model",
                "created": e.created,
                "owned_by": e.owner or "lora-gateway",
            }
            for e in entries
        ],
    }
