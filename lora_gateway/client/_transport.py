"""What both clients share around a call: channel options and credentials, per-call metadata,
one deadline across the attempts of a call, and the retry policy.

Metadata sent with each call:

- `authorization: Bearer <api key>` (when a key is given);
- `x-lora-adapter: <owner/name>` (`ROUTING_HEADER`) on Generate, GenerateStream, Pin, Unpin and
  Prefetch: the adapter reference without its `@alias` / `@sha256:` selector, which a front
  proxy hashes on (a routing hint only: the server resolves the reference from the body);
- `x-request-id` when a `request_id` is given.

Retries: only UNAVAILABLE is retried, at most `max_retries` times, with exponential backoff and
jitter, within the call's deadline (the deadline covers all attempts).
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import grpc

from lora_gateway import __version__, errors
from lora_gateway.client._errors import error_from_rpc, status_code
from lora_gateway.client._rpcs import Rpc
from lora_gateway.v1 import admin_pb2_grpc, inference_pb2_grpc

#: Metadata key carrying the adapter's `owner/name` (no selector) for consistent-hash routing.
ROUTING_HEADER: Final = "x-lora-adapter"
_REQUEST_ID_HEADER: Final = "x-request-id"
_MAX_BACKOFF_S: Final = 5.0
CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.primary_user_agent", f"lora-gateway-python/{__version__}"),
)

Metadata = tuple[tuple[str, str], ...]
_Channel = TypeVar("_Channel")


class UseClientDefault(enum.Enum):
    """Sentinel type: a per-call `timeout` left to the client's default."""

    TOKEN = 0


CLIENT_DEFAULT: Final = UseClientDefault.TOKEN
Timeout = float | None | UseClientDefault


def _printable(value: str) -> bool:
    """Whether a value can travel as an ASCII metadata value."""
    return bool(value) and all(0x20 <= ord(c) <= 0x7E for c in value)


def _auth_metadata(api_key: str | None) -> Metadata:
    if not api_key:
        return ()
    if not _printable(api_key) or " " in api_key:
        # The key itself is never part of a message.
        raise errors.InvalidArgument("api_key must be printable ASCII without spaces")
    return (("authorization", f"Bearer {api_key}"),)


def _routing_key(adapter: str) -> str | None:
    """`owner/name` of an adapter reference, without its `@selector`; None for the base model."""
    key = adapter.partition("@")[0].strip()
    return key if _printable(key) else None


def _credentials(
    tls: bool,
    root_certificates: bytes | None,
    client_cert_chain: bytes | None,
    client_private_key: bytes | None,
) -> grpc.ChannelCredentials | None:
    if bool(client_cert_chain) != bool(client_private_key):
        raise errors.InvalidArgument("client_cert_chain and client_private_key go together")
    if not (tls or root_certificates or client_cert_chain):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=client_private_key,
        certificate_chain=client_cert_chain,
    )


class _Deadline:
    """One deadline across all attempts of a call."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise errors.DeadlineExceeded("deadline exceeded before the call was sent")
        return left

    def allows(self, delay: float) -> bool:
        return self._end is None or time.monotonic() + delay < self._end


@dataclass(frozen=True)
class _RetryPolicy:
    max_retries: int
    backoff_s: float

    def delay(self, code: grpc.StatusCode, attempt: int, deadline: _Deadline) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the call must fail."""
        if code is not grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        ceiling = min(_MAX_BACKOFF_S, self.backoff_s * (2**attempt))
        delay = ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        return delay if deadline.allows(delay) else None


class Attempts:
    """The attempts of one call: the time left for the next, and the wait before it."""

    def __init__(self, deadline: _Deadline, policy: _RetryPolicy) -> None:
        self._deadline = deadline
        self._policy = policy
        self._failed = 0

    def remaining(self) -> float | None:
        """The next attempt's gRPC timeout (DeadlineExceeded when none is left)."""
        return self._deadline.remaining()

    def backoff(self, exc: grpc.RpcError, *, retryable: bool = True) -> float:
        """Seconds to wait before retrying after `exc`; raises its error when the call fails."""
        delay = self._policy.delay(status_code(exc), self._failed, self._deadline)
        if delay is None or not retryable:  # a stream that delivered tokens is not retried
            raise error_from_rpc(exc) from exc
        self._failed += 1
        return delay


class ClientBase(Generic[_Channel]):
    """Options, channel, stubs and per-call metadata: everything but the call itself.

    `target` is host:port. `api_key` travels as `authorization: Bearer <key>`. TLS is used when
    `tls` is set or certificates are given (`root_certificates` to verify the server, the
    client certificate chain and private key for mTLS). `timeout` is the default deadline of a
    call in seconds (None: no deadline); every method takes its own `timeout` too.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_cert_chain: bytes | None = None,
        client_private_key: bytes | None = None,
        timeout: float | None = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        wait_for_ready: bool = False,
    ) -> None:
        if not target:
            raise errors.InvalidArgument("target must be host:port")
        if max_retries < 0 or backoff_s < 0:
            raise errors.InvalidArgument("max_retries and backoff_s must be >= 0")
        if timeout is not None and timeout <= 0:
            raise errors.InvalidArgument("timeout must be > 0 or None")
        self.target = target
        self._auth = _auth_metadata(api_key)
        self._timeout = timeout
        self._retry = _RetryPolicy(max_retries, backoff_s)
        self._wait_for_ready = wait_for_ready
        credentials = _credentials(tls, root_certificates, client_cert_chain, client_private_key)
        self._channel = self._open_channel(target, credentials)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    def _open_channel(self, target: str, credentials: grpc.ChannelCredentials | None) -> _Channel:
        raise NotImplementedError

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(target={self.target!r})"

    def _attempts(self, timeout: Timeout) -> Attempts:
        limit = self._timeout if isinstance(timeout, UseClientDefault) else timeout
        return Attempts(_Deadline(limit), self._retry)

    def _metadata(self, adapter: str | None = None, request_id: str = "") -> Metadata:
        metadata = list(self._auth)
        key = _routing_key(adapter) if adapter else None
        if key:
            metadata.append((ROUTING_HEADER, key))
        if _printable(request_id):
            metadata.append((_REQUEST_ID_HEADER, request_id))
        return tuple(metadata)

    def _stub_method(self, call: Rpc[Any]) -> Any:
        """The stub's callable for `call` (sync or asyncio, as the channel is)."""
        return getattr(self._admin if call.service == "Admin" else self._inference, call.method)

    def _call_kwargs(self, call: Rpc[Any], timeout: float | None) -> dict[str, Any]:
        return {
            "metadata": self._metadata(call.adapter, call.request_id),
            "timeout": timeout,
            "wait_for_ready": self._wait_for_ready,
        }
