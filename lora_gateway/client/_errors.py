"""A failed call as the `lora_gateway.errors` class of its status code (one mapping, by type).

The exception carries the server's message and, as `code`, the status code received. Codes with
no class of their own (UNKNOWN, UNIMPLEMENTED, ...) raise the base `GatewayError`; INTERNAL too;
CANCELLED raises `errors.Aborted`. A refusal with a `retry-after` trailer carries it as
`retry_after_s` (seconds).
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from lora_gateway import errors

#: Status code -> error class, from the tree itself (direct subclasses, so UNAVAILABLE maps to
#: Unavailable rather than its EngineDead refinement).
_ERROR_BY_CODE: Final[dict[Any, type[errors.GatewayError]]] = {
    cls.code: cls for cls in errors.GatewayError.__subclasses__()
}
_ERROR_BY_CODE[grpc.StatusCode.INTERNAL] = errors.GatewayError
_ERROR_BY_CODE[grpc.StatusCode.CANCELLED] = errors.Aborted


def status_code(exc: grpc.RpcError) -> grpc.StatusCode:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def error_from_rpc(exc: grpc.RpcError) -> errors.GatewayError:
    """The lora_gateway error for a failed call, carrying the server's message and code."""
    code = status_code(exc)
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    cls = _ERROR_BY_CODE.get(code, errors.GatewayError)
    error = cls(details or code.name.lower())
    if error.code is not code:
        error.code = code
    error.retry_after_s = _retry_after(exc)
    return error


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The server's `retry-after` trailing metadata (seconds), if any."""
    trailing = getattr(exc, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
        for key, value in metadata or ():
            if key == "retry-after":
                seconds = float(value)
                return seconds if seconds >= 0 else None
    except (TypeError, ValueError):
        return None
    return None
