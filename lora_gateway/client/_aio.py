"""`AsyncGatewayClient`: the asyncio client, the same methods as `GatewayClient`, awaited. Thin
over `_rpcs` (requests and results) and `_transport` (metadata, deadline, retries)."""

# ASYNC109: `timeout` is the gRPC deadline handed to the call, the grpc.aio convention.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
import grpc.aio

from lora_gateway.client import _rpcs, _upload
from lora_gateway.client._rpcs import Rpc
from lora_gateway.client._transport import CHANNEL_OPTIONS, CLIENT_DEFAULT, ClientBase, Timeout
from lora_gateway.client.options import GenerateOptions, Prompt
from lora_gateway.client.results import (
    Adapter,
    AdapterPage,
    AdapterVersion,
    Evaluation,
    Evaluations,
    EvaluationSetInfo,
    GenerateResult,
    Residency,
    ResidencyEntry,
    RetentionResult,
    RevokeResult,
    StreamDelta,
    TokenizeResult,
)
from lora_gateway.v1 import admin_pb2

_R = TypeVar("_R")


class AsyncGatewayClient(ClientBase[grpc.aio.Channel]):
    """Asyncio client over a `grpc.aio` channel; the same methods as `GatewayClient`, awaited.

    Use it from one event loop. `generate_stream` returns an async iterator; to stop early and
    cancel the server's generation at once, wrap it in `contextlib.aclosing`.
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)

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
        self, attempt: Callable[[float | None], Awaitable[_R]], timeout: Timeout
    ) -> _R:
        attempts = self._attempts(timeout)
        while True:
            try:
                return await attempt(attempts.remaining())
            except grpc.RpcError as exc:
                delay = attempts.backoff(exc)
            await asyncio.sleep(delay)

    async def _call(self, rpc: Rpc[_R], timeout: Timeout) -> _R:
        method = self._stub_method(rpc)

        async def attempt(left: float | None) -> _R:
            return rpc.result(await method(rpc.request, **self._call_kwargs(rpc, left)))

        return await self._retrying(attempt, timeout)

    async def _stream(
        self, rpc: Rpc[StreamDelta], timeout: Timeout
    ) -> AsyncGenerator[StreamDelta, None]:
        attempts = self._attempts(timeout)
        method = self._stub_method(rpc)
        while True:
            call = method(rpc.request, **self._call_kwargs(rpc, attempts.remaining()))
            received = False
            try:
                async for message in call:
                    received = True
                    yield rpc.result(message)
                return
            except grpc.RpcError as exc:
                delay = attempts.backoff(exc, retryable=not received)
            finally:
                call.cancel()  # a consumer that stops early ends the RPC (no-op when done)
            await asyncio.sleep(delay)

    # -- inference --

    async def generate(
        self,
        adapter: str = "",
        prompt: Prompt | None = None,
        options: GenerateOptions | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        request_id: str = "",
        routing_key: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> GenerateResult:
        """See `GatewayClient.generate` (sends the `x-lora-adapter` routing header too)."""
        rpc = _rpcs.generate(adapter, prompt, options, token_ids, request_id, routing_key)
        return await self._call(rpc, timeout)

    def generate_stream(
        self,
        adapter: str = "",
        prompt: Prompt | None = None,
        options: GenerateOptions | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        request_id: str = "",
        routing_key: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AsyncGenerator[StreamDelta, None]:
        """See `GatewayClient.generate_stream`; use with `async for` (not awaited)."""
        unary = _rpcs.generate(adapter, prompt, options, token_ids, request_id, routing_key)
        rpc = _rpcs.streamed(unary)
        return self._stream(rpc, timeout)

    async def tokenize(
        self,
        adapter: str = "",
        prompt: Prompt = "",
        *,
        routing_key: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> TokenizeResult:
        """See `GatewayClient.tokenize`."""
        return await self._call(_rpcs.tokenize(adapter, prompt, routing_key), timeout)

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
        chat_template: Path | str | None = None,
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AdapterVersion:
        """See `GatewayClient.upload_adapter`; hashing and reading run in a thread."""
        upload = await asyncio.to_thread(
            _upload.prepare,
            name,
            directory,
            tenant,
            aliases,
            description,
            chunk_size,
            chat_template,
        )
        rpc = _rpcs.upload_adapter(upload.first)

        async def messages(reader: _upload.Reader) -> AsyncIterator[admin_pb2.UploadAdapterRequest]:
            yield upload.first  # the header
            async for message in reader.aiter():
                yield message

        async def attempt(left: float | None) -> AdapterVersion:
            with upload.attempt(progress) as reader:
                call = self._admin.UploadAdapter(messages(reader), **self._call_kwargs(rpc, left))
                response = await call
            return rpc.result(response)

        return await self._retrying(attempt, timeout)

    async def list_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AdapterPage:
        rpc = _rpcs.list_adapters(tenant, include_shared, page_size, page_token)
        return await self._call(rpc, timeout)

    async def iter_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AsyncIterator[Adapter]:
        token = ""
        while True:
            rpc = _rpcs.list_adapters(tenant, include_shared, page_size, token)
            page = await self._call(rpc, timeout)
            for adapter in page.adapters:
                yield adapter
            token = page.next_page_token
            if not token:
                return

    async def get_adapter(
        self, name: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        return await self._call(_rpcs.get_adapter(name, tenant), timeout)

    async def set_alias(
        self,
        name: str,
        alias: str,
        version: str,
        *,
        tenant: str = "",
        expected_version: str = "",
        require_eval_min_score: float | None = None,
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Adapter:
        """See `GatewayClient.set_alias`."""
        rpc = _rpcs.set_alias(
            name, alias, version, tenant, expected_version, require_eval_min_score
        )
        return await self._call(rpc, timeout)

    async def set_alias_weights(
        self,
        name: str,
        alias: str,
        weights: Mapping[str, float],
        *,
        tenant: str = "",
        expected: Mapping[str, float] | None = None,
        require_eval_min_score: float | None = None,
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Adapter:
        """See `GatewayClient.set_alias_weights`."""
        rpc = _rpcs.set_alias_weights(
            name, alias, weights, tenant, expected, require_eval_min_score
        )
        return await self._call(rpc, timeout)

    async def share_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        return await self._call(_rpcs.share_adapter(name, grantee, tenant, share=True), timeout)

    async def unshare_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        return await self._call(_rpcs.share_adapter(name, grantee, tenant, share=False), timeout)

    async def compose_adapter(
        self,
        name: str,
        parts: Sequence[tuple[str, float]],
        *,
        tenant: str = "",
        aliases: Sequence[str] = (),
        description: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AdapterVersion:
        rpc = _rpcs.compose_adapter(name, parts, tenant, aliases, description)
        return await self._call(rpc, timeout)

    async def revoke_adapter(
        self, name: str, version: str = "", tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> RevokeResult:
        return await self._call(_rpcs.revoke_adapter(name, version, tenant), timeout)

    async def set_retention(
        self,
        name: str,
        keep_last: int | None,
        *,
        tenant: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> RetentionResult:
        """Keep the newest `keep_last` versions (>= 1, by upload time) plus every version an
        alias points at (weighted aliases included); retire (revoke) the others now, and again
        after each upload. None removes the policy (every version is kept from now on).
        `keep_last` < 1 is INVALID_ARGUMENT and changes nothing. `get_adapter(...).keep_last`
        reads the policy (0: none). A retry after UNAVAILABLE is harmless: applying the policy
        again retires nothing more (its `retired_versions` are then empty)."""
        return await self._call(_rpcs.set_retention(name, keep_last, tenant), timeout)

    async def pin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> ResidencyEntry:
        return await self._call(_rpcs.residency_op("PinAdapter", adapter, tenant), timeout)

    async def unpin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> ResidencyEntry:
        return await self._call(_rpcs.residency_op("UnpinAdapter", adapter, tenant), timeout)

    async def prefetch_adapter(
        self, adapter: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> ResidencyEntry:
        return await self._call(_rpcs.residency_op("PrefetchAdapter", adapter, tenant), timeout)

    async def get_residency(
        self,
        tenant: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Residency:
        return await self._call(_rpcs.get_residency(tenant, page_size, page_token), timeout)

    # --- evaluations and gated promotion -------------------------------------------------------

    async def put_evaluation_set(
        self, name: str, set_json: str, *, tenant: str = "", timeout: Timeout = CLIENT_DEFAULT
    ) -> EvaluationSetInfo:
        """Upload the adapter's evaluation set (JSON, docs/lifecycle.md); it becomes the
        current set. INVALID_ARGUMENT with the reason for a set that is not valid."""
        return await self._call(_rpcs.put_evaluation_set(name, set_json, tenant), timeout)

    async def evaluate_adapter(
        self,
        name: str,
        version: str = "",
        *,
        set_sha256: str = "",
        tenant: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Evaluation:
        """Run the current set against `version` ("sha256:<hex>" or an alias; "" = latest) on
        the gateway's engine; the result is stored (appended, never rewritten). A retry after
        UNAVAILABLE may run it twice: both results are kept."""
        return await self._call(_rpcs.evaluate_adapter(name, version, set_sha256, tenant), timeout)

    async def get_evaluations(
        self, name: str, version: str = "", *, tenant: str = "", timeout: Timeout = CLIENT_DEFAULT
    ) -> Evaluations:
        """The current set, the stored results (only `version`'s when given) and the alias
        policies."""
        return await self._call(_rpcs.get_evaluations(name, version, tenant), timeout)

    async def set_alias_policy(
        self,
        name: str,
        alias: str,
        min_score: float,
        *,
        tenant: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Evaluations:
        """Every later move of `alias` needs an evaluation scoring >= `min_score` (0 removes
        the policy)."""
        return await self._call(_rpcs.set_alias_policy(name, alias, min_score, tenant), timeout)

    # --- automatic rollback (docs/lifecycle.md) -----------------------------------------------
    async def set_rollback_policy(
        self,
        name: str,
        alias: str,
        *,
        max_error_rate: float | None = None,
        max_length_rate: float | None = None,
        min_eval_score: float | None = None,
        min_requests: int = 0,
        window_s: float = 0.0,
        eval_interval_s: float = 0.0,
        tenant: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Adapter:
        """Roll `alias`'s canaries back to its stable version by themselves when one's error
        rate or length rate over `window_s` (from `min_requests` calls) is above the given
        maximum, or its evaluation (re-run every `eval_interval_s`) scores below
        `min_eval_score`. Give at least one rule; 0 leaves a count or a duration at its
        default (20 calls, 300 s, 3600 s). Returns the adapter with its policies."""
        rpc = _rpcs.set_rollback_policy(
            name,
            alias,
            tenant,
            max_error_rate,
            max_length_rate,
            min_requests,
            window_s,
            min_eval_score,
            eval_interval_s,
        )
        return await self._call(rpc, timeout)

    async def remove_rollback_policy(
        self, name: str, alias: str, *, tenant: str = "", timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        """Remove `alias`'s rollback policy: its canaries are no longer rolled back."""
        return await self._call(_rpcs.remove_rollback_policy(name, alias, tenant), timeout)
