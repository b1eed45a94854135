"""The gateway's error tree. Each class carries the gRPC status code it is answered with.

    GatewayError                      INTERNAL (fixed text to the client; details in the log)
    ├── InvalidArgument               INVALID_ARGUMENT   malformed request, bad sampling params
    ├── NotFound                      NOT_FOUND          no such adapter, not visible, revoked
    ├── Unauthenticated               UNAUTHENTICATED    missing or bad credentials
    ├── PermissionDenied              PERMISSION_DENIED  role lacks the permission
    ├── ResourceExhausted             RESOURCE_EXHAUSTED quota or capacity exhausted
    ├── FailedPrecondition            FAILED_PRECONDITION incompatible adapter, alias conflict
    │                                                    (store: Quarantined, a version the canary
    │                                                    quarantined)
    ├── Unavailable                   UNAVAILABLE        store unreachable, engine down/restarting
    │   └── EngineDead                UNAVAILABLE        the engine process died
    ├── DataLoss                      DATA_LOSS          stored bytes do not match their sha256
    ├── DeadlineExceeded              DEADLINE_EXCEEDED  the client's deadline passed
    └── Aborted                       ABORTED            request aborted (revocation, shutdown)

`adapter_store` has its own tree (it never imports this package); `status_of` maps both, by type,
in this one place. Classifying errors by message substrings is not done anywhere.
"""

from __future__ import annotations

import grpc

from adapter_store import errors as store_errors

INTERNAL_TEXT = "internal error"


class GatewayError(Exception):
    """Base of the tree. Unknown failures are answered as INTERNAL with a fixed text."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: Seconds after which the same call may succeed (a rate limit's refusal), sent to the
    #: client as `retry-after` trailing metadata; the SDK sets it from there. None: no hint.
    retry_after_s: float | None = None

    @property
    def public_message(self) -> str:
        """What the client sees. INTERNAL never leaks details."""
        if self.code is grpc.StatusCode.INTERNAL:
            return INTERNAL_TEXT
        return str(self) or self.code.name.lower()


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, *args: object, retry_after_s: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after_s = retry_after_s


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class EngineDead(Unavailable):
    """The engine core process died; the server stops reporting SERVING."""


class DataLoss(GatewayError):
    code = grpc.StatusCode.DATA_LOSS


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(GatewayError):
    code = grpc.StatusCode.ABORTED


_STORE_CODES: dict[type[store_errors.StoreError], grpc.StatusCode] = {
    store_errors.InvalidAdapter: grpc.StatusCode.INVALID_ARGUMENT,
    store_errors.AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    store_errors.Incompatible: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.Quarantined: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.EvaluationRequired: grpc.StatusCode.FAILED_PRECONDITION,
    store_errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    store_errors.IntegrityError: grpc.StatusCode.DATA_LOSS,
    store_errors.CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

#: One text for every NOT_FOUND about adapters, so that another tenant's adapter answers
#: exactly like a missing one.
ADAPTER_NOT_FOUND_TEXT = "adapter not found"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing text for any exception (INTERNAL for unknown ones)."""
    if isinstance(exc, GatewayError):
        return exc.code, exc.public_message
    if isinstance(exc, store_errors.StoreError):
        for cls in type(exc).__mro__:
            code = _STORE_CODES.get(cls)
            if code is not None:
                if code is grpc.StatusCode.NOT_FOUND:
                    return code, ADAPTER_NOT_FOUND_TEXT
                return code, str(exc) or code.name.lower()
    return grpc.StatusCode.INTERNAL, INTERNAL_TEXT
