"""One place for authentication, authorization, error → status mapping, deadlines and metrics.

`GatewayInterceptor` looks every RPC up in `tenancy.METHOD_PERMISSIONS` (an unknown method is
denied), authenticates the bearer key, checks the role, and then wraps the method handler so
that the principal is visible to the servicer (`current_principal()`), the client's deadline
bounds the work, and every exception leaves as the status code of `errors.status_of` — INTERNAL
with a fixed text for anything unexpected, its details only in the server log.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from lora_gateway import errors, logs
from lora_gateway.audit import AuditLog
from lora_gateway.metrics import NO_ADAPTER_LABEL, Metrics, adapter_label
from lora_gateway.tenancy import KeyRing, Permission, Policy, Principal, permission_for

log = logging.getLogger(__name__)

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")
_adapter: contextvars.ContextVar[str] = contextvars.ContextVar("adapter", default=NO_ADAPTER_LABEL)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served."""
    try:
        return _principal.get()
    except LookupError:
        raise errors.Unauthenticated("missing credentials") from None


def note_adapter(tenant: str, name: str) -> None:
    """Label the current request's metrics with the adapter it resolved to (never user text)."""
    _adapter.set(adapter_label(tenant, name))


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
    if like.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort)
    if like.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.stream_stream_rpc_method_handler(abort_stream)


class GatewayInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, keyring: KeyRing, metrics: Metrics | None, audit: AuditLog | None) -> None:
        self.keyring = keyring
        self.metrics = metrics
        self.audit = audit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        permission = permission_for(method)
        if permission is Permission.HEALTH:
            return await continuation(details)
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
        return self._wrap(handler, principal, method, rid or uuid.uuid4().hex)

    # --- wrapping -----------------------------------------------------------------------------
    def _wrap(
        self, handler: grpc.RpcMethodHandler, principal: Principal, method: str, rid: str
    ) -> grpc.RpcMethodHandler:
        classify = self._classify
        done = self._done

        if handler.unary_unary is not None or handler.stream_unary is not None:
            inner = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                _principal.set(principal)
                logs.request_id.set(rid)
                started, code = time.perf_counter(), grpc.StatusCode.OK
                try:
                    async with asyncio.timeout(context.time_remaining()):
                        return await inner(request, context)
                except Exception as exc:
                    code, text = classify(exc, method, principal)
                    await context.abort(code, text)
                finally:
                    done(principal, code, started)

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
            try:
                async with asyncio.timeout(context.time_remaining()):
                    async for message in inner_stream(request, context):
                        yield message
            except Exception as exc:
                code, text = classify(exc, method, principal)
                await context.abort(code, text)
            finally:
                done(principal, code, started)

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
