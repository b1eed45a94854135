"""The OpenAI-compatible HTTP front: Starlette routes served by uvicorn in the gateway's loop.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming with SSE when
`stream` is true) and `GET /v1/models`. Each request is handled like a gRPC call by the
interceptor, and then by the same core (`gateway.Gateway`):

- the route is looked up in `tenancy.METHOD_PERMISSIONS` ("HTTP POST /v1/chat/completions"),
  `Authorization: Bearer <key>` is authenticated against the tenants in force and the role
  checked (`Policy.authorize`); refusals are audited and counted like gRPC's;
- generation goes through `Gateway.generate`: admission, per-tenant caps, rates and quotas,
  resolution (another tenant's adapter is NOT_FOUND exactly like a missing one), residency,
  the engine, and the same metrics (`lora_gateway_requests_total` with the gRPC code name);
- `/v1/models` is admitted like a non-Generate RPC (`RpcLimits.rpc`) and lists what
  `Gateway.models` finds (the base model, the tenant's adapters, those shared with it);
- every error leaves in OpenAI's format (`openai_protocol.error_body`) with the HTTP status of
  its gRPC code (`openai_protocol.HTTP_STATUS`: 400, 401, 403, 404, 409, 429 with
  `retry-after`, 503, 500 with a fixed text). An error after a stream has started is sent as
  a last `data: {"error": ...}` event, which OpenAI's clients raise.

Why Starlette + uvicorn: both are well kept (Encode's; uvicorn is the server FastAPI and vLLM's
own OpenAI server run on), both already come with vLLM, so nothing new is installed; Starlette
is the small routing and streaming layer this needs without FastAPI's schema machinery (the
bodies are read by hand, so a refusal's text is ours); and uvicorn's `Server.serve()` runs as a
task inside the gateway's event loop, so the HTTP front shares the process, the engine and the
core with gRPC, and stops in the drain order (DESIGN invariant 10): health NOT_SERVING →
draining (new requests 503) → listener closed → in-flight requests finish within the grace,
then are cancelled (engine abort).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, cast

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapter_store import StoreError
from lora_gateway import errors, logs
from lora_gateway.audit import AuditLog
from lora_gateway.config import Settings
from lora_gateway.engine.base import TokenChunk, TokenLogprob
from lora_gateway.gateway import Gateway, Served
from lora_gateway.metrics import NO_ADAPTER_LABEL, adapter_label, parse_listen
from lora_gateway.services import openai_protocol as protocol
from lora_gateway.tenancy import Policy, Principal, RpcLimits
from lora_gateway.tenancy.limits import retry_after_seconds
from lora_gateway.usage import Meter, UsageLog

log = logging.getLogger(__name__)

#: The routes, as they appear in `tenancy.METHOD_PERMISSIONS`.
COMPLETIONS = "HTTP POST /v1/completions"
CHAT = "HTTP POST /v1/chat/completions"
MODELS = "HTTP GET /v1/models"
#: A request body must arrive within this many seconds.
BODY_TIMEOUT_S = 30.0
#: Bodies larger than this are decoded in a thread, not on the event loop.
_THREAD_DECODE_BYTES = 256 << 10
#: OpenAI's clients (and vLLM) send -9999.0 for a log-probability of -inf: JSON has no -inf.
_LOGPROB_FLOOR = -9999.0
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_Stream: TypeAlias = AsyncGenerator[tuple[Served, TokenChunk], None]


class _TooLarge(errors.InvalidArgument):
    """A request body over the limit (413)."""


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _event(value: object) -> bytes:
    return b"data: " + _json_bytes(value) + b"\n\n"


def _floor(entries: list[TokenLogprob]) -> list[TokenLogprob]:
    """Log-probabilities of -inf (a token the grammar masked) as -9999.0."""

    def clamp(value: float | None) -> float | None:
        return None if value is None else max(value, _LOGPROB_FLOOR)

    return [
        replace(
            e,
            logprob=clamp(e.logprob),
            top=tuple(replace(t, logprob=max(t.logprob, _LOGPROB_FLOOR)) for t in e.top),
        )
        for e in entries
    ]


@dataclass
class _Outcome:
    """What a request ended with, for its metrics and its usage record."""

    principal: Principal | None = None
    adapter: str = NO_ADAPTER_LABEL
    code: str = "OK"
    #: The usage meter of a completion request (None: no usage log, or /v1/models).
    meter: Meter | None = None
    done: bool = False


class OpenAIFront:
    """The routes and their handling (see the module docstring)."""

    def __init__(
        self,
        gateway: Gateway,
        audit: AuditLog | None,
        limits: RpcLimits | None,
        base_name: str,
        usage: UsageLog | None = None,
    ) -> None:
        self.gateway = gateway
        self.audit = audit
        self.limits = limits
        #: Usage records: one per completion request of an authenticated caller.
        self.usage = usage
        self.base_name = base_name
        self.max_body = gateway.settings.max_message_bytes

    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ]
        return Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    # --- routes -------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETIONS, protocol.completion_request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, CHAT, protocol.chat_request, chat=True)

    async def models(self, request: Request) -> Response:
        outcome = _Outcome()
        try:
            principal = self._authorize(request, MODELS)
            outcome.principal = principal
            with self.limits.rpc(principal.tenant) if self.limits else contextlib.nullcontext():
                entries = await self.gateway.models(principal, self.base_name)
            return JSONResponse(protocol.models_list(entries))
        except (errors.GatewayError, StoreError) as exc:
            return self._error(exc, MODELS, outcome)
        finally:
            self._done(outcome, None)

    # --- generation -----------------------------------------------------------------------------
    async def _generate(
        self,
        request: Request,
        route: str,
        parse: Callable[..., protocol.Request],
        *,
        chat: bool,
    ) -> Response:
        started = time.perf_counter()
        outcome = _Outcome()
        streaming = False
        try:
            principal = self._authorize(request, route)
            outcome.principal = principal
            given = request.headers.get("x-request-id")
            if self.usage is not None:
                # The request id until the call's own is known (a refused body has none).
                outcome.meter = self.usage.start(principal, route, request_id=(given or "")[:128])
                outcome.meter.started = started
            parsed = parse(
                await self._body(request),
                base_name=self.base_name,
                default_max_tokens=self.gateway.settings.default_max_tokens,
                request_id=given,
                routing_header=request.headers.get("x-routing-key"),
            )
            logs.request_id.set(parsed.call.request_id)
            if outcome.meter is not None:
                outcome.meter.streamed = parsed.stream
            stream = cast(_Stream, self.gateway.generate(principal, parsed.call, outcome.meter))
            try:
                served, first = await anext(stream)
            except BaseException:
                await stream.aclose()
                raise
            outcome.adapter = adapter_label(served.tenant, served.name)
            model = protocol.served_model(parsed, served)
            if parsed.stream:
                streaming = True
                body = self._sse(parsed, model, first, stream, outcome, started, chat)

                async def closed() -> None:
                    # The body may never have started (the client went away first): its own
                    # `finally` did not run, so the stream is closed and the request ends here.
                    await body.aclose()
                    await stream.aclose()
                    if not outcome.done:
                        outcome.code = "CANCELLED"
                        self._done(outcome, started)

                return _SseResponse(body, closed)
            return await self._whole(parsed, model, first, stream, chat)
        except (errors.GatewayError, StoreError) as exc:
            return self._error(exc, route, outcome)
        except asyncio.CancelledError:
            outcome.code = "CANCELLED"
            raise
        finally:
            if not streaming:
                self._done(outcome, started)

    async def _whole(
        self, parsed: protocol.Request, model: str, first: TokenChunk, stream: _Stream, chat: bool
    ) -> Response:
        chunks = [first]
        try:
            async for _, chunk in stream:
                chunks.append(chunk)
        finally:
            await stream.aclose()
        last = chunks[-1]
        content = "".join(c.text for c in chunks)
        logprobs: dict[str, Any] | None = None
        if parsed.logprobs:
            entries = _floor([e for c in chunks for e in c.logprobs or ()])
            logprobs = (
                protocol.chat_logprobs(entries) if chat else protocol.completion_logprobs(entries)
            )
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": logprobs,
            "finish_reason": protocol.finish(last),
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": content, "refusal": None}
        else:
            choice["text"] = content
        return JSONResponse(
            {
                "id": parsed.call.request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": protocol.now(),
                "model": model,
                "choices": [choice],
                "usage": protocol.usage(last),
                "system_fingerprint": None,
            }
        )

    async def _sse(
        self,
        parsed: protocol.Request,
        model: str,
        first: TokenChunk,
        stream: _Stream,
        outcome: _Outcome,
        started: float,
        chat: bool,
    ) -> AsyncGenerator[bytes, None]:
        """The chunks as server-sent events, then `[DONE]`; an error mid-stream becomes an
        `error` event. When the client goes away, the stream is closed (engine abort). Every
        chunk names the version that serves (`model`, see `protocol.served_model`)."""
        head = {
            "id": parsed.call.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": protocol.now(),
            "model": model,
            "system_fingerprint": None,
        }
        offset = 0
        last = first
        try:
            if chat:
                delta = {"role": "assistant", "content": ""}
                opening = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                yield _event({**head, "choices": [opening]})
            yield _event({**head, "choices": [self._choice(parsed, first, offset, chat)]})
            offset += len(first.text)
            async for _, chunk in stream:
                last = chunk
                yield _event({**head, "choices": [self._choice(parsed, chunk, offset, chat)]})
                offset += len(chunk.text)
            if parsed.include_usage:
                yield _event({**head, "choices": [], "usage": protocol.usage(last)})
            yield b"data: [DONE]\n\n"
        except (errors.GatewayError, StoreError) as exc:
            code, text = errors.status_of(exc)
            outcome.code = code.name
            if code.name == "INTERNAL":
                log.error("internal error in a streamed OpenAI request", exc_info=exc)
            yield _event(protocol.error_body(protocol.http_status(code), text))
        except BaseException:
            outcome.code = "CANCELLED"
            raise
        finally:
            await stream.aclose()
            self._done(outcome, started)

    @staticmethod
    def _choice(
        parsed: protocol.Request, chunk: TokenChunk, offset: int, chat: bool
    ) -> dict[str, Any]:
        logprobs: dict[str, Any] | None = None
        if parsed.logprobs and chunk.logprobs is not None:
            entries = _floor(chunk.logprobs)
            logprobs = (
                protocol.chat_logprobs(entries)
                if chat
                else protocol.completion_logprobs(entries, offset)
            )
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": logprobs,
            "finish_reason": protocol.finish(chunk),
        }
        if chat:
            choice["delta"] = {"content": chunk.text}
        else:
            choice["text"] = chunk.text
        return choice

    # --- plumbing -------------------------------------------------------------------------------
    def _authorize(self, request: Request, route: str) -> Principal:
        try:
            principal = self.gateway.keyring.authenticate(request.headers.get("authorization"))
            Policy.authorize(principal, route)
        except errors.GatewayError as exc:
            if self.audit is not None:
                self.audit.record(
                    principal=None,
                    rpc=route,
                    decision="deny",
                    code=exc.code.name,
                    detail=exc.public_message,
                )
            raise _Denied(exc) from None
        return principal

    async def _body(self, request: Request) -> object:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise _TooLarge(f"the request body is larger than {self.max_body} bytes")
        body = bytearray()
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                async for piece in request.stream():
                    body += piece
                    if len(body) > self.max_body:
                        raise _TooLarge(f"the request body is larger than {self.max_body} bytes")
        except TimeoutError:
            raise errors.InvalidArgument(
                f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
            ) from None
        try:
            if len(body) > _THREAD_DECODE_BYTES:
                return await asyncio.to_thread(json.loads, bytes(body))
            return json.loads(body)
        except (ValueError, RecursionError):
            raise errors.InvalidArgument("the request body is not valid JSON") from None

    def _error(self, exc: BaseException, route: str, outcome: _Outcome) -> Response:
        denied = isinstance(exc, _Denied)
        cause = exc.cause if isinstance(exc, _Denied) else exc
        code, text = errors.status_of(cause)
        outcome.code = code.name
        if code.name == "INTERNAL":
            log.error("internal error in %s", route, exc_info=cause)
        if denied and self.gateway.metrics is not None:
            self.gateway.metrics.requests_total.labels("", "", code.name).inc()
            outcome.principal = None
        status = 413 if isinstance(cause, _TooLarge) else protocol.http_status(code)
        headers = {}
        after = getattr(cause, "retry_after_s", None)
        if isinstance(after, int | float) and after > 0:
            headers["retry-after"] = str(retry_after_seconds(after))
        if status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(protocol.error_body(status, text), status_code=status, headers=headers)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own refusals (unknown route 404, wrong method 405) in OpenAI's format."""
        message = "unknown route" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(
            protocol.error_body(exc.status_code, message, code=None),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def _done(self, outcome: _Outcome, started: float | None) -> None:
        """Once per request: its metrics and, for a completion, its usage record."""
        if outcome.done:
            return
        outcome.done = True
        if outcome.meter is not None and self.usage is not None:
            self.usage.finish(outcome.meter, outcome.code)
        metrics = self.gateway.metrics
        if metrics is None or outcome.principal is None:
            return
        seconds = None if started is None else time.perf_counter() - started
        metrics.request_done(outcome.principal.tenant, outcome.adapter, outcome.code, seconds)


class _Denied(errors.GatewayError):
    """An authentication or permission refusal, already audited (wraps the refusal)."""

    def __init__(self, cause: errors.GatewayError) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.code = cause.code


class _SseResponse(StreamingResponse):
    """Server-sent events whose request always ends: `closed` runs after the response, however
    it ended (also when its body never started)."""

    def __init__(self, body: AsyncIterator[bytes], closed: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._closed = closed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._closed()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its signal handlers: the gateway's own (SIGTERM → drain)
    stay in force."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpenAIServer:
    """The HTTP listener: uvicorn serving `OpenAIFront.app()` as a task of this event loop."""

    def __init__(self, server: _Uvicorn, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    @classmethod
    async def start(cls, settings: Settings, front: OpenAIFront) -> OpenAIServer:
        listen = settings.openai_listen
        assert listen is not None
        try:
            host, port = parse_listen(listen)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=1024)
        except (ValueError, OSError) as exc:
            raise errors.Unavailable(f"cannot listen on {listen} (openai_listen): {exc}") from None
        sock.setblocking(False)
        config = uvicorn.Config(
            front.app(),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_keep_alive=30,
            # Beyond this many connections at once uvicorn answers 503 (each tenant's own caps
            # apply to the requests themselves).
            limit_concurrency=settings.max_concurrent_requests + settings.max_concurrent_rpcs,
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
            ssl_ca_certs=settings.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca else ssl.CERT_NONE,
        )
        server = _Uvicorn(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="openai-http")
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # raises what stopped it
                raise errors.Unavailable(f"the OpenAI HTTP server on {listen} did not start")
            await asyncio.sleep(0.01)
        bound = int(sock.getsockname()[1])
        log.info("OpenAI-compatible HTTP API on port %d", bound)
        return cls(server, task, bound)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish within `grace` s, then cancel them."""
        # uvicorn hands it to asyncio.wait_for, which takes fractions of a second too.
        self._server.config.timeout_graceful_shutdown = max(grace, 0.01)  # type: ignore[assignment]
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
