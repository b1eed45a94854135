"""Python SDK for lora-gateway: a blocking `GatewayClient` and an asyncio `AsyncGatewayClient`.

    with GatewayClient("gateway:50051", api_key) as client:
        result = client.generate("support@prod", "hello", max_tokens=32)
        print(result.text, result.adapter)

    async with AsyncGatewayClient("gateway:50051", api_key) as client:
        async for delta in client.generate_stream("acme/support", "hello"):
            print(delta.text, end="")

Both clients have the same methods and share everything but the call itself: request building,
response parsing, metadata, the upload reader, the retry policy and the error mapping live once,
in this module's private functions.

Metadata sent with each call:

- `authorization: Bearer <api key>` (when a key is given);
- `x-lora-adapter: <owner/name>` on Generate, GenerateStream, Pin, Unpin and Prefetch: the
  adapter reference without its `@alias` / `@sha256:` selector. A front proxy (Envoy's
  `hash_policy: header`, see the deployment chart) hashes on it so that one adapter's requests
  go to the replicas that already hold it. It is a routing hint only: the server resolves and
  authorizes the reference from the request body.
- `x-request-id` when a `request_id` is given.

Errors: every failure raises the `lora_gateway.errors` class of its status code with the
server's message (`errors.NotFound("adapter not found")`); the exception's `code` is the status
code received. Codes with no class of their own (UNKNOWN, UNIMPLEMENTED, ...) raise the base
`GatewayError`; CANCELLED raises `errors.Aborted`. Invalid arguments detected before anything is
sent raise `errors.InvalidArgument`. A refusal by a rate limit (RESOURCE_EXHAUSTED) carries the
server's `retry-after` hint as `error.retry_after_s` (seconds; None when the server sent none).

Retries: only UNAVAILABLE is retried, at most `max_retries` times, with exponential backoff and
jitter, within the call's deadline (the deadline covers all attempts). Every admin RPC is safe to
repeat: versions are content-addressed (a repeated upload or compose yields the same version),
share/unshare/pin/revoke are idempotent. An upload is retried from the start, re-reading the
files. A stream is retried only until its first message arrives; after that an UNAVAILABLE is
raised, since the tokens already delivered cannot be taken back.
"""

# ASYNC109: `timeout` is the gRPC deadline handed to the call, the grpc.aio convention.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, TypeVar

import grpc
import grpc.aio

from lora_gateway import __version__, errors
from lora_gateway.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

__all__ = [
    "ROUTING_HEADER",
    "AsyncGatewayClient",
    "GatewayClient",
    "GenerateResult",
    "ServedAdapter",
    "StreamDelta",
]

#: Metadata key carrying the adapter's `owner/name` (no selector) for consistent-hash routing.
ROUTING_HEADER: Final = "x-lora-adapter"
_REQUEST_ID_HEADER: Final = "x-request-id"

_UPLOAD_FILES: Final = ("adapter_config.json", "adapter_model.safetensors")
#: Files that PEFT writes next to an adapter and that are not uploaded.
_IGNORED_FILES: Final = frozenset({"README.md"})
_MAX_CHUNK_BYTES: Final = 4 << 20
_MAX_BACKOFF_S: Final = 5.0
_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.primary_user_agent", f"lora-gateway-python/{__version__}"),
)

_R = TypeVar("_R")


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedAdapter:
    """The exact adapter version that served a request."""

    tenant: str
    name: str
    #: "sha256:<64 hex>".
    version: str


@dataclass(frozen=True)
class GenerateResult:
    """A whole completion."""

    text: str
    token_ids: list[int]
    #: "length" (max_tokens), "stop" (EOS, stop string or token) or "abort".
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: None for the base model.
    adapter: ServedAdapter | None
    #: The server-assigned request id.
    request_id: str


@dataclass(frozen=True)
class StreamDelta:
    """One message of a stream: the text and token ids new since the previous one."""

    text: str
    token_ids: list[int]
    #: Set on the last message only: "length", "stop" or "abort".
    finish_reason: str | None
    #: Set on the last message only.
    prompt_tokens: int | None
    completion_tokens: int | None
    #: Set on the first message only (None for the base model).
    adapter: ServedAdapter | None
    #: Set on the first message only ("" otherwise).
    request_id: str


# --- shared private machinery ---------------------------------------------------------------


class _UseClientDefault(enum.Enum):
    """Sentinel type: a per-call `timeout` left to the client's default."""

    TOKEN = 0


_CLIENT_DEFAULT: Final = _UseClientDefault.TOKEN
_Timeout = float | None | _UseClientDefault

_FINISH_REASONS: Final = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}

#: Status code -> error class, from the tree itself (direct subclasses, so UNAVAILABLE maps to
#: Unavailable rather than its EngineDead refinement).
_ERROR_BY_CODE: Final[dict[Any, type[errors.GatewayError]]] = {
    cls.code: cls for cls in errors.GatewayError.__subclasses__()
}
_ERROR_BY_CODE[grpc.StatusCode.INTERNAL] = errors.GatewayError
_ERROR_BY_CODE[grpc.StatusCode.CANCELLED] = errors.Aborted


def _error_from_rpc(exc: grpc.RpcError) -> errors.GatewayError:
    """The lora_gateway error for a failed call, carrying the server's message and code."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
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


def _printable(value: str) -> bool:
    """Whether a value can travel as an ASCII metadata value."""
    return bool(value) and all(0x20 <= ord(c) <= 0x7E for c in value)


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
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
) -> Any:
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

    def delay(self, exc: grpc.RpcError, attempt: int, deadline: _Deadline) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the call must fail."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code is not grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        ceiling = min(_MAX_BACKOFF_S, self.backoff_s * (2**attempt))
        delay = ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        return delay if deadline.allows(delay) else None


class _ClientBase:
    """Options and per-call metadata, common to both clients."""

    def __init__(
        self,
        target: str,
        api_key: str | None,
        *,
        timeout: float | None,
        max_retries: int,
        backoff_s: float,
        wait_for_ready: bool,
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

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(target={self.target!r})"

    def _deadline(self, timeout: _Timeout) -> _Deadline:
        return _Deadline(self._timeout if isinstance(timeout, _UseClientDefault) else timeout)

    def _metadata(
        self, adapter: str | None = None, request_id: str = ""
    ) -> tuple[tuple[str, str], ...]:
        metadata = list(self._auth)
        key = _routing_key(adapter) if adapter else None
        if key:
            metadata.append((ROUTING_HEADER, key))
        if _printable(request_id):
            metadata.append((_REQUEST_ID_HEADER, request_id))
        return tuple(metadata)


def _check_page(page_size: int, page_token: str) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 0 <= page_size < 2**31:
        raise errors.InvalidArgument("page_size must be an integer >= 0 (0 = the server's default)")
    if not isinstance(page_token, str):
        raise errors.InvalidArgument("page_token must be a string")


def _list_request(
    tenant: str, include_shared: bool, page_size: int, page_token: str
) -> admin_pb2.ListAdaptersRequest:
    _check_page(page_size, page_token)
    return admin_pb2.ListAdaptersRequest(
        tenant=tenant, include_shared=include_shared, page_size=page_size, page_token=page_token
    )


def _residency_request(
    tenant: str, page_size: int, page_token: str
) -> admin_pb2.GetResidencyRequest:
    _check_page(page_size, page_token)
    return admin_pb2.GetResidencyRequest(tenant=tenant, page_size=page_size, page_token=page_token)


def _generate_request(
    adapter: str,
    prompt: str | None,
    token_ids: Sequence[int] | None,
    *,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: Sequence[str],
    stop_token_ids: Sequence[int],
    ignore_eos: bool,
    min_tokens: int,
    presence_penalty: float | None,
    frequency_penalty: float | None,
    repetition_penalty: float | None,
    request_id: str,
) -> inference_pb2.GenerateRequest:
    if (prompt is None) == (token_ids is None):
        raise errors.InvalidArgument("give exactly one of prompt or token_ids")
    if isinstance(stop, str):
        stop = (stop,)
    try:
        sampling = inference_pb2.SamplingParams(
            max_tokens=max_tokens,
            stop=list(stop),
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
        )
        optional: dict[str, float | int | None] = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "repetition_penalty": repetition_penalty,
        }
        for field_name, value in optional.items():
            if value is not None:
                setattr(sampling, field_name, value)
        request = inference_pb2.GenerateRequest(
            adapter=adapter, sampling=sampling, request_id=request_id
        )
        if prompt is not None:
            request.text = prompt
        else:
            request.token_ids.ids.extend(token_ids or ())
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"invalid request: {exc}") from None
    return request


def _served(adapter: inference_pb2.ServedAdapter) -> ServedAdapter | None:
    if not adapter.name:
        return None
    return ServedAdapter(tenant=adapter.tenant, name=adapter.name, version=adapter.version)


def _result(response: inference_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_FINISH_REASONS.get(response.finish_reason, ""),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        adapter=_served(response.adapter),
        request_id=response.request_id,
    )


def _delta(response: inference_pb2.GenerateStreamResponse) -> StreamDelta:
    has_usage = response.HasField("usage")
    return StreamDelta(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_FINISH_REASONS.get(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens if has_usage else None,
        completion_tokens=response.usage.completion_tokens if has_usage else None,
        adapter=_served(response.adapter),
        request_id=response.request_id,
    )


def _compose_parts(parts: Sequence[tuple[str, float]]) -> list[admin_pb2.ComposePart]:
    if not parts:
        raise errors.InvalidArgument("compose needs at least one part")
    try:
        return [admin_pb2.ComposePart(adapter=ref, weight=float(w)) for ref, w in parts]
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"invalid compose part: {exc}") from None


def _checked(response: Any, response_type: type[_R]) -> _R:
    if not isinstance(response, response_type):
        raise errors.GatewayError(f"unexpected response type {type(response).__name__}")
    return response


# --- upload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LocalFile:
    filename: str
    path: Path
    size: int
    sha256: str


def _scan_adapter_dir(directory: Path) -> list[_LocalFile]:
    """The two adapter files of a PEFT folder, hashed; InvalidArgument for anything else."""
    if not directory.is_dir():
        raise errors.InvalidArgument(f"{directory} is not a directory")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name in _IGNORED_FILES:
            continue
        if path.name not in _UPLOAD_FILES or not path.is_file():
            raise errors.InvalidArgument(
                f"unexpected {path.name!r} in {directory}: an adapter folder holds only "
                f"{' and '.join(_UPLOAD_FILES)} (and an optional README.md)"
            )
        found[path.name] = path
    missing = [name for name in _UPLOAD_FILES if name not in found]
    if missing:
        raise errors.InvalidArgument(f"{directory}: missing {', '.join(missing)}")
    files = []
    for name in _UPLOAD_FILES:
        digest = hashlib.sha256()
        size = 0
        with found[name].open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                size += len(block)
        files.append(_LocalFile(name, found[name], size, digest.hexdigest()))
    return files


def _upload_header(
    name: str, tenant: str, aliases: Sequence[str], description: str, files: Sequence[_LocalFile]
) -> admin_pb2.UploadAdapterRequest:
    if isinstance(aliases, str):
        aliases = (aliases,)
    header = admin_pb2.UploadHeader(
        tenant=tenant,
        name=name,
        aliases=list(aliases),
        description=description,
        files=[
            admin_pb2.DeclaredFile(filename=f.filename, size=f.size, sha256=f.sha256) for f in files
        ],
    )
    return admin_pb2.UploadAdapterRequest(header=header)


class _UploadReader:
    """Reads the declared files chunk by chunk, file after file (one reader per attempt).

    A read failure or a file that no longer matches its declaration ends the stream early and
    is raised locally by `check()` after the call, whatever the server answered.
    """

    def __init__(
        self,
        files: Sequence[_LocalFile],
        chunk_size: int,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self._files = list(files)
        self._chunk_size = chunk_size
        self._progress = progress
        self._index = 0
        self._handle: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._read = 0
        self.sent = 0
        self.total = sum(f.size for f in files)
        self.error: str | None = None
        if progress is not None:
            progress(0, self.total)

    def next(self) -> admin_pb2.UploadAdapterRequest | None:
        if self.error is not None:
            return None
        try:
            return self._next()
        except OSError as exc:
            self.error = f"cannot read {self._files[self._index].path}: {exc.strerror or exc}"
            self.close()
            return None

    def _next(self) -> admin_pb2.UploadAdapterRequest | None:
        while self._index < len(self._files):
            current = self._files[self._index]
            if self._handle is None:
                self._handle = current.path.open("rb")
                self._digest = hashlib.sha256()
                self._read = 0
            data = self._handle.read(self._chunk_size)
            if data:
                self._read += len(data)
                self._digest.update(data)
                if self._read > current.size:
                    self._changed(current)
                    return None
                self.sent += len(data)
                if self._progress is not None:
                    self._progress(self.sent, self.total)
                chunk = admin_pb2.FileChunk(filename=current.filename, data=data)
                return admin_pb2.UploadAdapterRequest(chunk=chunk)
            self.close()
            if self._read != current.size or self._digest.hexdigest() != current.sha256:
                self._changed(current)
                return None
            self._index += 1
        return None

    def _changed(self, current: _LocalFile) -> None:
        self.error = f"{current.path} changed while it was being uploaded"
        self.close()

    def __iter__(self) -> Iterator[admin_pb2.UploadAdapterRequest]:
        while (message := self.next()) is not None:
            yield message

    async def aiter(self) -> AsyncIterator[admin_pb2.UploadAdapterRequest]:
        # File reads go through a thread: the event loop never blocks on disk I/O.
        while (message := await asyncio.to_thread(self.next)) is not None:
            yield message

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def check(self) -> None:
        if self.error is not None:
            raise errors.InvalidArgument(self.error)


def _check_chunk_size(chunk_size: int) -> None:
    if not 0 < chunk_size <= _MAX_CHUNK_BYTES:
        raise errors.InvalidArgument(f"chunk_size must be in 1..{_MAX_CHUNK_BYTES}")


# --- the blocking client --------------------------------------------------------------------


class GatewayClient(_ClientBase):
    """Blocking client over a `grpc` channel. Thread-safe; use one per process and target.

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
        super().__init__(
            target,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_s=backoff_s,
            wait_for_ready=wait_for_ready,
        )
        credentials = _credentials(tls, root_certificates, client_cert_chain, client_private_key)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- call machinery --

    def _retrying(self, attempt_fn: Callable[[float | None], _R], timeout: _Timeout) -> _R:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return attempt_fn(deadline.remaining())
            except grpc.RpcError as exc:
                delay = self._retry.delay(exc, attempt, deadline)
                if delay is None:
                    raise _error_from_rpc(exc) from exc
            attempt += 1
            time.sleep(delay)

    def _unary(
        self,
        method: Any,
        request: Any,
        response_type: type[_R],
        timeout: _Timeout,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> _R:
        md = self._metadata() if metadata is None else metadata

        def attempt(remaining: float | None) -> _R:
            response = method(
                request, metadata=md, timeout=remaining, wait_for_ready=self._wait_for_ready
            )
            return _checked(response, response_type)

        return self._retrying(attempt, timeout)

    def _stream(
        self,
        request: inference_pb2.GenerateRequest,
        metadata: tuple[tuple[str, str], ...],
        timeout: _Timeout,
    ) -> Generator[StreamDelta, None, None]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = self._inference.GenerateStream(
                request,
                metadata=metadata,
                timeout=deadline.remaining(),
                wait_for_ready=self._wait_for_ready,
            )
            received = False
            try:
                for message in call:
                    received = True
                    yield _delta(message)
                return
            except grpc.RpcError as exc:
                delay = None if received else self._retry.delay(exc, attempt, deadline)
                if delay is None:
                    raise _error_from_rpc(exc) from exc
            finally:
                call.cancel()  # a consumer that stops early ends the RPC (no-op when done)
            attempt += 1
            time.sleep(delay)

    # -- inference --

    def generate(
        self,
        adapter: str = "",
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        request_id: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> GenerateResult:
        """Generate a completion for `prompt` (or `token_ids`) with `adapter` ("" = base model).

        `adapter` is a reference: "name", "name@alias", "name@sha256:<hex>" or "owner/name[@..]"
        for an adapter shared with the caller. Its `owner/name` part is also sent as the
        `x-lora-adapter` routing header, which a front proxy hashes on. `max_tokens` 0 is the
        server's default; unset sampling parameters are the server's defaults.
        """
        request = _generate_request(
            adapter,
            prompt,
            token_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            request_id=request_id,
        )
        metadata = self._metadata(adapter, request_id)
        response = self._unary(
            self._inference.Generate, request, inference_pb2.GenerateResponse, timeout, metadata
        )
        return _result(response)

    def generate_stream(
        self,
        adapter: str = "",
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        request_id: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> Generator[StreamDelta, None, None]:
        """Like `generate`, as an iterator of deltas; the last one carries finish_reason and usage.

        Arguments are checked now; the call starts at the first `next()`. The timeout covers the
        whole stream. Stopping early (`break`, then `close()` or garbage collection of the
        iterator; `contextlib.closing` makes it immediate) cancels the server's generation.
        """
        request = _generate_request(
            adapter,
            prompt,
            token_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            request_id=request_id,
        )
        return self._stream(request, self._metadata(adapter, request_id), timeout)

    # -- admin --

    def upload_adapter(
        self,
        name: str,
        directory: Path | str,
        *,
        tenant: str = "",
        aliases: Sequence[str] = (),
        description: str = "",
        chunk_size: int = 1 << 20,
        progress: Callable[[int, int], None] | None = None,
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.AdapterVersionInfo:
        """Upload a PEFT adapter folder as a new version of `name` (`latest` points at it).

        The folder holds adapter_config.json and adapter_model.safetensors (a README.md is
        ignored; any other file raises InvalidArgument before anything is sent). Both are
        declared with their size and sha256, then streamed in `chunk_size` pieces.
        `progress(bytes_sent, total_bytes)` is called after each chunk; on a retry it starts
        again from 0. An UNAVAILABLE upload is retried from the start: identical content is the
        same version, so a repeat after a lost reply is harmless.
        """
        _check_chunk_size(chunk_size)
        files = _scan_adapter_dir(Path(directory))
        header = _upload_header(name, tenant, aliases, description, files)
        metadata = self._metadata()

        def attempt(remaining: float | None) -> admin_pb2.AdapterVersionInfo:
            reader = _UploadReader(files, chunk_size, progress)
            try:
                response = self._admin.UploadAdapter(
                    itertools.chain([header], reader),
                    metadata=metadata,
                    timeout=remaining,
                    wait_for_ready=self._wait_for_ready,
                )
            except grpc.RpcError:
                reader.check()  # a local read failure explains the server's answer
                raise
            finally:
                reader.close()
            reader.check()
            return _checked(response, admin_pb2.AdapterVersionInfo)

        return self._retrying(attempt, timeout)

    def list_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.ListAdaptersResponse:
        """One page of adapters (`page_size` 0 = the server's default); its `next_page_token`
        is "" on the last page. `iter_adapters` walks every page."""
        request = _list_request(tenant, include_shared, page_size, page_token)
        return self._unary(
            self._admin.ListAdapters, request, admin_pb2.ListAdaptersResponse, timeout
        )

    def iter_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> Iterator[admin_pb2.AdapterInfo]:
        """Every adapter, page after page (`timeout` applies to each page's call)."""
        token = ""
        while True:
            page = self.list_adapters(
                tenant, include_shared, page_size=page_size, page_token=token, timeout=timeout
            )
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def get_adapter(
        self, name: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.AdapterInfo:
        request = admin_pb2.GetAdapterRequest(tenant=tenant, name=name)
        return self._unary(self._admin.GetAdapter, request, admin_pb2.AdapterInfo, timeout)

    def set_alias(
        self,
        name: str,
        alias: str,
        version: str,
        *,
        tenant: str = "",
        expected_version: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.AdapterInfo:
        """Point `alias` at `version` ("sha256:<hex>" or another alias): promote, roll back."""
        request = admin_pb2.SetAliasRequest(
            tenant=tenant,
            name=name,
            alias=alias,
            version=version,
            expected_version=expected_version,
        )
        return self._unary(self._admin.SetAlias, request, admin_pb2.AdapterInfo, timeout)

    def share_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.AdapterInfo:
        request = admin_pb2.ShareAdapterRequest(tenant=tenant, name=name, grantee=grantee)
        return self._unary(self._admin.ShareAdapter, request, admin_pb2.AdapterInfo, timeout)

    def unshare_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.AdapterInfo:
        request = admin_pb2.ShareAdapterRequest(tenant=tenant, name=name, grantee=grantee)
        return self._unary(self._admin.UnshareAdapter, request, admin_pb2.AdapterInfo, timeout)

    def compose_adapter(
        self,
        name: str,
        parts: Sequence[tuple[str, float]],
        *,
        tenant: str = "",
        aliases: Sequence[str] = (),
        description: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.AdapterVersionInfo:
        """New version of `name` = sum of weight x part, parts given as (reference, weight)."""
        request = admin_pb2.ComposeAdapterRequest(
            tenant=tenant,
            name=name,
            parts=_compose_parts(parts),
            aliases=list(aliases),
            description=description,
        )
        return self._unary(
            self._admin.ComposeAdapter, request, admin_pb2.AdapterVersionInfo, timeout
        )

    def revoke_adapter(
        self,
        name: str,
        version: str = "",
        tenant: str = "",
        *,
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.RevokeAdapterResponse:
        """Revoke one version ("sha256:<hex>") or, with version "", the whole adapter."""
        request = admin_pb2.RevokeAdapterRequest(tenant=tenant, name=name, version=version)
        return self._unary(
            self._admin.RevokeAdapter, request, admin_pb2.RevokeAdapterResponse, timeout
        )

    def pin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.ResidencyEntry:
        request = admin_pb2.AdapterRefRequest(tenant=tenant, adapter=adapter)
        return self._unary(
            self._admin.PinAdapter,
            request,
            admin_pb2.ResidencyEntry,
            timeout,
            self._metadata(adapter),
        )

    def unpin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.ResidencyEntry:
        request = admin_pb2.AdapterRefRequest(tenant=tenant, adapter=adapter)
        return self._unary(
            self._admin.UnpinAdapter,
            request,
            admin_pb2.ResidencyEntry,
            timeout,
            self._metadata(adapter),
        )

    def prefetch_adapter(
        self, adapter: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.ResidencyEntry:
        request = admin_pb2.AdapterRefRequest(tenant=tenant, adapter=adapter)
        return self._unary(
            self._admin.PrefetchAdapter,
            request,
            admin_pb2.ResidencyEntry,
            timeout,
            self._metadata(adapter),
        )

    def get_residency(
        self,
        tenant: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.GetResidencyResponse:
        """Which adapters are where (engine, disk, store); operators may pass tenant "*".

        One page (`page_size` adapters; 0 = the server's default); pass `next_page_token` back
        as `page_token` for the next, until it is ""."""
        request = _residency_request(tenant, page_size, page_token)
        return self._unary(
            self._admin.GetResidency, request, admin_pb2.GetResidencyResponse, timeout
        )


# --- the asyncio client ---------------------------------------------------------------------


class AsyncGatewayClient(_ClientBase):
    """Asyncio client over a `grpc.aio` channel; the same methods as `GatewayClient`, awaited.

    Use it from one event loop. `generate_stream` returns an async iterator; to stop early and
    cancel the server's generation at once, wrap it in `contextlib.aclosing`.
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
        super().__init__(
            target,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_s=backoff_s,
            wait_for_ready=wait_for_ready,
        )
        credentials = _credentials(tls, root_certificates, client_cert_chain, client_private_key)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- call machinery --

    async def _retrying(
        self, attempt_fn: Callable[[float | None], Awaitable[_R]], timeout: _Timeout
    ) -> _R:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await attempt_fn(deadline.remaining())
            except grpc.RpcError as exc:
                delay = self._retry.delay(exc, attempt, deadline)
                if delay is None:
                    raise _error_from_rpc(exc) from exc
            attempt += 1
            await asyncio.sleep(delay)

    async def _unary(
        self,
        method: Any,
        request: Any,
        response_type: type[_R],
        timeout: _Timeout,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> _R:
        md = self._metadata() if metadata is None else metadata

        async def attempt(remaining: float | None) -> _R:
            response = await method(
                request, metadata=md, timeout=remaining, wait_for_ready=self._wait_for_ready
            )
            return _checked(response, response_type)

        return await self._retrying(attempt, timeout)

    async def _stream(
        self,
        request: inference_pb2.GenerateRequest,
        metadata: tuple[tuple[str, str], ...],
        timeout: _Timeout,
    ) -> AsyncGenerator[StreamDelta, None]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = self._inference.GenerateStream(
                request,
                metadata=metadata,
                timeout=deadline.remaining(),
                wait_for_ready=self._wait_for_ready,
            )
            received = False
            try:
                async for message in call:
                    received = True
                    yield _delta(message)
                return
            except grpc.RpcError as exc:
                delay = None if received else self._retry.delay(exc, attempt, deadline)
                if delay is None:
                    raise _error_from_rpc(exc) from exc
            finally:
                call.cancel()  # a consumer that stops early ends the RPC (no-op when done)
            attempt += 1
            await asyncio.sleep(delay)

    # -- inference --

    async def generate(
        self,
        adapter: str = "",
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        request_id: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> GenerateResult:
        """See `GatewayClient.generate` (sends the `x-lora-adapter` routing header too)."""
        request = _generate_request(
            adapter,
            prompt,
            token_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            request_id=request_id,
        )
        metadata = self._metadata(adapter, request_id)
        response = await self._unary(
            self._inference.Generate, request, inference_pb2.GenerateResponse, timeout, metadata
        )
        return _result(response)

    def generate_stream(
        self,
        adapter: str = "",
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        repetition_penalty: float | None = None,
        request_id: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> AsyncGenerator[StreamDelta, None]:
        """See `GatewayClient.generate_stream`; use with `async for` (not awaited)."""
        request = _generate_request(
            adapter,
            prompt,
            token_ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            request_id=request_id,
        )
        return self._stream(request, self._metadata(adapter, request_id), timeout)

    # -- admin --

    async def upload_adapter(
        self,
        name: str,
        directory: Path | str,
        *,
        tenant: str = "",
        aliases: Sequence[str] = (),
        description: str = "",
        chunk_size: int = 1 << 20,
        progress: Callable[[int, int], None] | None = None,
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.AdapterVersionInfo:
        """See `GatewayClient.upload_adapter`; hashing and reading run in a thread."""
        _check_chunk_size(chunk_size)
        files = await asyncio.to_thread(_scan_adapter_dir, Path(directory))
        header = _upload_header(name, tenant, aliases, description, files)
        metadata = self._metadata()

        async def messages(reader: _UploadReader) -> AsyncIterator[admin_pb2.UploadAdapterRequest]:
            yield header
            async for message in reader.aiter():
                yield message

        async def attempt(remaining: float | None) -> admin_pb2.AdapterVersionInfo:
            reader = _UploadReader(files, chunk_size, progress)
            try:
                response = await self._admin.UploadAdapter(
                    messages(reader),
                    metadata=metadata,
                    timeout=remaining,
                    wait_for_ready=self._wait_for_ready,
                )
            except grpc.RpcError:
                reader.check()
                raise
            finally:
                reader.close()
            reader.check()
            return _checked(response, admin_pb2.AdapterVersionInfo)

        return await self._retrying(attempt, timeout)

    async def list_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.ListAdaptersResponse:
        request = _list_request(tenant, include_shared, page_size, page_token)
        return await self._unary(
            self._admin.ListAdapters, request, admin_pb2.ListAdaptersResponse, timeout
        )

    async def iter_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> AsyncIterator[admin_pb2.AdapterInfo]:
        token = ""
        while True:
            page = await self.list_adapters(
                tenant, include_shared, page_size=page_size, page_token=token, timeout=timeout
            )
            for adapter in page.adapters:
                yield adapter
            token = page.next_page_token
            if not token:
                return

    async def get_adapter(
        self, name: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.AdapterInfo:
        request = admin_pb2.GetAdapterRequest(tenant=tenant, name=name)
        return await self._unary(self._admin.GetAdapter, request, admin_pb2.AdapterInfo, timeout)

    async def set_alias(
        self,
        name: str,
        alias: str,
        version: str,
        *,
        tenant: str = "",
        expected_version: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.AdapterInfo:
        request = admin_pb2.SetAliasRequest(
            tenant=tenant,
            name=name,
            alias=alias,
            version=version,
            expected_version=expected_version,
        )
        return await self._unary(self._admin.SetAlias, request, admin_pb2.AdapterInfo, timeout)

    async def share_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.AdapterInfo:
        request = admin_pb2.ShareAdapterRequest(tenant=tenant, name=name, grantee=grantee)
        return await self._unary(self._admin.ShareAdapter, request, admin_pb2.AdapterInfo, timeout)

    async def unshare_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.AdapterInfo:
        request = admin_pb2.ShareAdapterRequest(tenant=tenant, name=name, grantee=grantee)
        return await self._unary(
            self._admin.UnshareAdapter, request, admin_pb2.AdapterInfo, timeout
        )

    async def compose_adapter(
        self,
        name: str,
        parts: Sequence[tuple[str, float]],
        *,
        tenant: str = "",
        aliases: Sequence[str] = (),
        description: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.AdapterVersionInfo:
        request = admin_pb2.ComposeAdapterRequest(
            tenant=tenant,
            name=name,
            parts=_compose_parts(parts),
            aliases=list(aliases),
            description=description,
        )
        return await self._unary(
            self._admin.ComposeAdapter, request, admin_pb2.AdapterVersionInfo, timeout
        )

    async def revoke_adapter(
        self,
        name: str,
        version: str = "",
        tenant: str = "",
        *,
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.RevokeAdapterResponse:
        request = admin_pb2.RevokeAdapterRequest(tenant=tenant, name=name, version=version)
        return await self._unary(
            self._admin.RevokeAdapter, request, admin_pb2.RevokeAdapterResponse, timeout
        )

    async def pin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.ResidencyEntry:
        request = admin_pb2.AdapterRefRequest(tenant=tenant, adapter=adapter)
        return await self._unary(
            self._admin.PinAdapter,
            request,
            admin_pb2.ResidencyEntry,
            timeout,
            self._metadata(adapter),
        )

    async def unpin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.ResidencyEntry:
        request = admin_pb2.AdapterRefRequest(tenant=tenant, adapter=adapter)
        return await self._unary(
            self._admin.UnpinAdapter,
            request,
            admin_pb2.ResidencyEntry,
            timeout,
            self._metadata(adapter),
        )

    async def prefetch_adapter(
        self, adapter: str, tenant: str = "", *, timeout: _Timeout = _CLIENT_DEFAULT
    ) -> admin_pb2.ResidencyEntry:
        request = admin_pb2.AdapterRefRequest(tenant=tenant, adapter=adapter)
        return await self._unary(
            self._admin.PrefetchAdapter,
            request,
            admin_pb2.ResidencyEntry,
            timeout,
            self._metadata(adapter),
        )

    async def get_residency(
        self,
        tenant: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: _Timeout = _CLIENT_DEFAULT,
    ) -> admin_pb2.GetResidencyResponse:
        request = _residency_request(tenant, page_size, page_token)
        return await self._unary(
            self._admin.GetResidency, request, admin_pb2.GetResidencyResponse, timeout
        )
