"""One place for authentication, authorization, admission of RPCs, error → status mapping,
deadlines and metrics.

`GatewayInterceptor` looks every RPC up in `tenancy.METHOD_PERMISSIONS` (an unknown method is
denied), authenticates the bearer key (against the `Tenants` in force: a reloaded tenants file
applies to the next call), checks the role, and then wraps the method handler so that the
principal is visible to the servicer (`current_principal()`), the client's deadline bounds the
work, and every exception leaves as the status code of `errors.status_of` — INTERNAL with a
fixed text for anything unexpected, its details only in the server log. A refusal carrying
`retry_after_s` (a rate limit) also sends `retry-after: <seconds>` as trailing metadata.
Each Generate and GenerateStream call of an authenticated caller leaves one usage record
(`usage.UsageLog`) with its final code: the error's, DEADLINE_EXCEEDED, or CANCELLED when the
client went away.

Admission of RPCs (`tenancy.RpcLimits`): public streams (Health/Watch, reflection) count against
their peer address's and the total cap; authenticated RPCs other than Generate against their
tenant's and the total cap. Generate is admitted by the gateway (`tenancy.Admission`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lora_gateway import errors, logs
from lora_gateway.audit import AuditLog
from lora_gateway.metrics import NO_ADAPTER_LABEL, Metrics, adapter_label
from lora_gateway.tenancy import (
    GENERATE_METHODS,
    Hold,
    KeyRing,
    Permission,
    Policy,
    Principal,
    RpcLimits,
    Tenants,
    permission_for,
)
from lora_gateway.tenancy.limits import retry_after_seconds
from lora_gateway.usage import Meter, UsageLog

log = logging.getLogger(__name__)

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
_adapter: contextvars.ContextVar[str] = contextvars.ContextVar("adapter", default=NO_ADAPTER_LABEL)
_meter: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("usage", default=None)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served."""
    try:
        return _principal.get()
    except LookupError:
        raise errors.Unauthenticated("missing credentials") from None


def current_meter() -> Meter | None:
    """The usage meter of the inference RPC being served (None: no usage log, or not an
    inference RPC); the servicer hands it to `Gateway.generate`."""
    return _meter.get()


def note_adapter(tenant: str, name: str) -> None:
    """Label the current request's metrics with the adapter it resolved to (never user text)."""
    _adapter.set(adapter_label(tenant, name))


RETRY_AFTER_KEY = "retry-after"


def peer_address(peer: str) -> str:
    """A peer's address without its port: "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"."""
    scheme, sep, rest = peer.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        host, colon, _port = rest.rpartition(":")
        return f"{scheme}:{host}" if colon else peer
    return peer


def trailing_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """`retry-after` (whole seconds) for an error that carries `retry_after_s`."""
    after = getattr(exc, "retry_after_s", None)
    if isinstance(after, int | float) and after > 0:
        return ((RETRY_AFTER_KEY, str(retry_after_seconds(after))),)
    return ()


#: How long, and how many bytes, a refused client-streaming call is read before its status is
#: sent (see `_abort_handler`).
DRAIN_S = 0.25
DRAIN_BYTES = 4 << 20


def _abort_handler(
    code: grpc.StatusCode, text: str, like: grpc.RpcMethodHandler | None = None
) -> grpc.RpcMethodHandler:
    """A handler that refuses the call; of the same streaming kind as the method's own handler
    (a unary handler answering a client-streaming call is an error inside gRPC's core)."""

    async def abort(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, text)

    async def abort_stream(
        request: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[object]:
        await context.abort(code, text)
        yield None  # pragma: no cover - abort raises

    if like is None or like.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort)

    async def abort_upload(requests: AsyncIterator[bytes], context: Any) -> None:
        # grpc.aio's client answers INTERNAL "Internal error from Core" in place of this status
        # when the call ends while it is still writing (grpc/grpc#36066): read what it sends
        # first, for at most DRAIN_S seconds and DRAIN_BYTES, so that a refused upload of a
        # small adapter gets the real answer. A larger one may still see INTERNAL.
        received = 0
        with contextlib.suppress(TimeoutError, grpc.RpcError):
            async with asyncio.timeout(DRAIN_S):
                async for message in requests:
                    received += len(message)  # no deserializer here: raw bytes
                    if received > DRAIN_BYTES:
                        break
        await context.abort(code, text)

    if like.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort_upload)
    if like.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.stream_stream_rpc_method_handler(abort_stream)


class GatewayInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        keyring: KeyRing | Tenants,
        metrics: Metrics | None,
        audit: AuditLog | None,
        limits: RpcLimits | None = None,
        usage: UsageLog | None = None,
    ) -> None:
        self.keyring = keyring if isinstance(keyring, Tenants) else Tenants(keyring)
        self.metrics = metrics
        self.audit = audit
        self.limits = limits
        #: Usage records: one per Generate/GenerateStream call (lora_gateway.usage).
        self.usage = usage

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        permission = permission_for(method)
        if permission is Permission.HEALTH:
            public = await continuation(details)
            if self.limits is None or public is None or public.unary_unary is not None:
                return public  # unary health calls hold nothing: never capped
            return self._wrap_public_stream(public, self.limits)
        metadata = dict(details.invocation_metadata or ())
        principal: Principal | None = None
        handler = await continuation(details)
        try:
            if permission is None:
                raise errors.PermissionDenied("permission denied")
            header = metadata.get("authorization")
            principal = self.keyring.authenticate(header if isinstance(header, str) else None)
            Policy.authorize(principal, method)
        except errors.GatewayError as exc:
            if self.audit is not None:
                self.audit.record(
                    principal=None,
                    rpc=method,
                    decision="deny",
                    code=exc.code.name,
                    detail=exc.public_message,
                )
            if self.metrics is not None:
                self.metrics.requests_total.labels("", "", exc.code.name).inc()
            return _abort_handler(exc.code, exc.public_message, handler)
        if handler is None:
            return _abort_handler(grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        given = metadata.get("x-request-id")
        rid = given if isinstance(given, str) and given.isprintable() and len(given) <= 128 else ""
        admit: Callable[[], Hold] | None = None
        if self.limits is not None and method not in GENERATE_METHODS:
            limits, tenant = self.limits, principal.tenant

            def admit() -> Hold:
                return limits.rpc(tenant)

        return self._wrap(handler, principal, method, rid or uuid.uuid4().hex, admit)

    # --- wrapping -----------------------------------------------------------------------------
    def _wrap_public_stream(
        self, handler: grpc.RpcMethodHandler, limits: RpcLimits
    ) -> grpc.RpcMethodHandler:
        """A public stream counted against its peer's and the total cap while it is open.

        Both servicer styles are kept: an async generator (reflection) and a coroutine that
        writes with `context.write` (grpc_health's Watch)."""
        inner = handler.unary_stream or handler.stream_stream
        if inner is None:  # a client-streaming public method: none exists
            return handler

        async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> Hold:
            try:
                return limits.public_stream(peer_address(context.peer()))
            except errors.ResourceExhausted as exc:
                await context.abort(exc.code, exc.public_message)
                raise  # pragma: no cover - abort raises

        wrapped: Callable[..., Any]
        if inspect.isasyncgenfunction(inner):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                with await admit(context):
                    async for message in inner(request, context):
                        yield message

            wrapped = generator
        else:

            async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                with await admit(context):
                    return await inner(request, context)

            wrapped = coroutine

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(
        self,
        handler: grpc.RpcMethodHandler,
        principal: Principal,
        method: str,
        rid: str,
        admit: Callable[[], Hold] | None = None,
    ) -> grpc.RpcMethodHandler:
        classify = self._classify
        done = self._done
        usage = self.usage if method in GENERATE_METHODS else None
        streamed = handler.unary_stream is not None or handler.stream_stream is not None

        def meter() -> Meter | None:
            if usage is None:
                return None
            opened = usage.start(principal, method, streamed=streamed, request_id=rid)
            _meter.set(opened)
            return opened

        if handler.unary_unary is not None or handler.stream_unary is not None:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                _principal.set(principal)
                logs.request_id.set(rid)
                started, code = time.perf_counter(), grpc.StatusCode.OK
                hold: Hold | None = None
                metered = meter()
                cancelled = False
                try:
                    hold = admit() if admit is not None else None
                    async with asyncio.timeout(context.time_remaining()):
                        return await inner(request, context)
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                except Exception as exc:
                    code, text = classify(exc, method, principal)
                    await context.abort(code, text, trailing_metadata(exc))
                finally:
                    if hold is not None:
                        hold.release()
                    done(principal, code, started)
                    if metered is not None and usage is not None:
                        usage.finish(metered, grpc.StatusCode.CANCELLED if cancelled else code)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            _principal.set(principal)
            logs.request_id.set(rid)
            started, code = time.perf_counter(), grpc.StatusCode.OK
            hold: Hold | None = None
            metered = meter()
            cancelled = False
            try:
                hold = admit() if admit is not None else None
                async with asyncio.timeout(context.time_remaining()):
                    async for message in inner_stream(request, context):
                        yield message
            except (asyncio.CancelledError, GeneratorExit):
                cancelled = True
                raise
            except Exception as exc:
                code, text = classify(exc, method, principal)
                await context.abort(code, text, trailing_metadata(exc))
            finally:
                if hold is not None:
                    hold.release()
                done(principal, code, started)
                if metered is not None and usage is not None:
                    usage.finish(metered, grpc.StatusCode.CANCELLED if cancelled else code)

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream is not None
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _classify(
        self, exc: Exception, method: str, principal: Principal
    ) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, TimeoutError):
            exc = errors.DeadlineExceeded("deadline exceeded")
        code, text = errors.status_of(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.error("internal error in %s", method, exc_info=exc)
        # Admin errors, and stored bytes failing their sha256 on any RPC (a store-integrity
        # event an operator must see), go to the audit log.
        audited = "Admin" in method or code is grpc.StatusCode.DATA_LOSS
        if self.audit is not None and code is not grpc.StatusCode.OK and audited:
            self.audit.record(
                principal=principal, rpc=method, decision="error", code=code.name, detail=text
            )
        return code, text

    def _done(self, principal: Principal, code: grpc.StatusCode, started: float) -> None:
        if self.metrics is None:
            return
        self.metrics.request_done(
            principal.tenant, _adapter.get(), code, time.perf_counter() - started
        )
