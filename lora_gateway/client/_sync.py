"""`GatewayClient`: the blocking client, thin over `_rpcs` (requests and results) and
`_transport` (metadata, deadline, retries)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

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

_R = TypeVar("_R")


class GatewayClient(ClientBase[grpc.Channel]):
    """Blocking client over a `grpc` channel. Thread-safe; use one per process and target.

    `target` is host:port. `api_key` travels as `authorization: Bearer <key>`. TLS is used when
    `tls` is set or certificates are given (`root_certificates` to verify the server, the
    client certificate chain and private key for mTLS). `timeout` is the default deadline of a
    call in seconds (None: no deadline); every method takes its own `timeout` too. UNAVAILABLE
    is retried `max_retries` times (backoff from `backoff_s`) within the deadline.
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        return grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)

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

    def _retrying(self, attempt: Callable[[float | None], _R], timeout: Timeout) -> _R:
        attempts = self._attempts(timeout)
        while True:
            try:
                return attempt(attempts.remaining())
            except grpc.RpcError as exc:
                delay = attempts.backoff(exc)
            time.sleep(delay)

    def _call(self, rpc: Rpc[_R], timeout: Timeout) -> _R:
        method = self._stub_method(rpc)
        return self._retrying(
            lambda left: rpc.result(method(rpc.request, **self._call_kwargs(rpc, left))), timeout
        )

    def _stream(
        self, rpc: Rpc[StreamDelta], timeout: Timeout
    ) -> Generator[StreamDelta, None, None]:
        attempts = self._attempts(timeout)
        method = self._stub_method(rpc)
        while True:
            call = method(rpc.request, **self._call_kwargs(rpc, attempts.remaining()))
            received = False
            try:
                for message in call:
                    received = True
                    yield rpc.result(message)
                return
            except grpc.RpcError as exc:
                delay = attempts.backoff(exc, retryable=not received)
            finally:
                call.cancel()  # a consumer that stops early ends the RPC (no-op when done)
            time.sleep(delay)

    # -- inference --

    def generate(
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
        """Generate a completion for `prompt` (or `token_ids`) with `adapter` ("" = base model).

        `prompt` is text, or a conversation (a sequence of `ChatMessage`, or of
        {"role", "content"} dicts) that the server renders with the model's chat template.

        `adapter` is a reference: "name", "name@alias", "name@sha256:<hex>" or "owner/name[@..]"
        for an adapter shared with the caller. Its `owner/name` part is also sent as the
        `x-lora-adapter` routing header, which a front proxy hashes on. `options` (sampling,
        length, stops, structured output, logprobs) default to the server's defaults;
        `request_id` is echoed in its logs. `routing_key` (e.g. a conversation id) chooses the
        version of a weighted alias, the same one for the same key while the weights are
        unchanged ("" = a fresh choice per request); `result.adapter.version` names it.
        """
        rpc = _rpcs.generate(adapter, prompt, options, token_ids, request_id, routing_key)
        return self._call(rpc, timeout)

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
    ) -> Generator[StreamDelta, None, None]:
        """Like `generate`, as an iterator of deltas; the last one carries finish_reason and usage.

        Arguments are checked now; the call starts at the first `next()`. The timeout covers the
        whole stream. Stopping early (`break`, then `close()` or garbage collection of the
        iterator; `contextlib.closing` makes it immediate) cancels the server's generation.
        """
        unary = _rpcs.generate(adapter, prompt, options, token_ids, request_id, routing_key)
        rpc = _rpcs.streamed(unary)
        return self._stream(rpc, timeout)

    def tokenize(
        self,
        adapter: str = "",
        prompt: Prompt = "",
        *,
        routing_key: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> TokenizeResult:
        """Token ids of `prompt` (text, or a conversation rendered with the chat template of
        `adapter`, "" = the base model's) as Generate would send it, their count, the rendered
        text and the model's context length: for budgeting tokens before a call."""
        return self._call(_rpcs.tokenize(adapter, prompt, routing_key), timeout)

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
        chat_template: Path | str | None = None,
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AdapterVersion:
        """Upload a PEFT adapter folder as a new version of `name` (`latest` points at it).

        The folder holds adapter_config.json and adapter_model.safetensors, and optionally the
        adapter's own chat template as chat_template.jinja (as PEFT saves it), or give that
        file as `chat_template` (it replaces one in the folder). A README.md is ignored; any
        other file raises InvalidArgument before anything is sent. The server checks the
        template (UTF-8, at most `chat_template_max_bytes`, compiles and renders in its
        sandbox) and renders this version's chat prompts with it. Every file is declared with
        its size and sha256, then streamed in `chunk_size` pieces.
        `progress(bytes_sent, total_bytes)` is called after each chunk; on a retry it starts
        again from 0. An UNAVAILABLE upload is retried from the start: identical content is the
        same version, so a repeat after a lost reply is harmless.
        """
        upload = _upload.prepare(
            name, directory, tenant, aliases, description, chunk_size, chat_template
        )
        rpc = _rpcs.upload_adapter(upload.first)

        def attempt(left: float | None) -> AdapterVersion:
            with upload.attempt(progress) as reader:
                messages = itertools.chain([upload.first], reader)
                response = self._admin.UploadAdapter(messages, **self._call_kwargs(rpc, left))
            return rpc.result(response)

        return self._retrying(attempt, timeout)

    def list_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AdapterPage:
        """One page of adapters (`page_size` 0 = the server's default); its `next_page_token`
        is "" on the last page. `iter_adapters` walks every page."""
        rpc = _rpcs.list_adapters(tenant, include_shared, page_size, page_token)
        return self._call(rpc, timeout)

    def iter_adapters(
        self,
        tenant: str = "",
        include_shared: bool = False,
        *,
        page_size: int = 0,
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Iterator[Adapter]:
        """Every adapter, page after page (`timeout` applies to each page's call)."""
        token = ""
        while True:
            rpc = _rpcs.list_adapters(tenant, include_shared, page_size, token)
            page = self._call(rpc, timeout)
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    def get_adapter(
        self, name: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        """Versions (in sha256 order), aliases, grants and (for the owner) usage of one adapter."""
        return self._call(_rpcs.get_adapter(name, tenant), timeout)

    def set_alias(
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
        """Point `alias` at `version` ("sha256:<hex>" or another alias): promote, roll back.

        With `expected_version`, only if the alias points there now (compare and set). With
        `require_eval_min_score` (in (0, 1]), only if the version's evaluation on the current
        set scored at least that (FAILED_PRECONDITION naming the failures otherwise)."""
        rpc = _rpcs.set_alias(
            name, alias, version, tenant, expected_version, require_eval_min_score
        )
        return self._call(rpc, timeout)

    def set_alias_weights(
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
        """Split `alias` between versions, a canary: {"sha256:<hex>" or a plain alias: weight},
        weights > 0 summing to 1, e.g. {v7: 0.9, v8: 0.1}. Each request then gets one of them,
        sticky per `routing_key`. All weight on one version ({v8: 1.0}) ends the canary.

        With `expected` ({"sha256:<hex>": weight}, as `Adapter.alias_weights` showed it; a
        plain alias is {its version: 1.0}; {} = the alias must not exist), only if the split
        is that now (compare and set). `require_eval_min_score`: as in `set_alias`, for each
        version the alias does not hold yet."""
        rpc = _rpcs.set_alias_weights(
            name, alias, weights, tenant, expected, require_eval_min_score
        )
        return self._call(rpc, timeout)

    def share_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        """Let tenant `grantee` use the adapter (read-only, as `owner/name`)."""
        return self._call(_rpcs.share_adapter(name, grantee, tenant, share=True), timeout)

    def unshare_adapter(
        self, name: str, grantee: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        return self._call(_rpcs.share_adapter(name, grantee, tenant, share=False), timeout)

    def compose_adapter(
        self,
        name: str,
        parts: Sequence[tuple[str, float]],
        *,
        tenant: str = "",
        aliases: Sequence[str] = (),
        description: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> AdapterVersion:
        """New version of `name` = sum of weight x part, parts given as (reference, weight)."""
        rpc = _rpcs.compose_adapter(name, parts, tenant, aliases, description)
        return self._call(rpc, timeout)

    def revoke_adapter(
        self, name: str, version: str = "", tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> RevokeResult:
        """Revoke one version ("sha256:<hex>") or, with version "", the whole adapter."""
        return self._call(_rpcs.revoke_adapter(name, version, tenant), timeout)

    def set_retention(
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
        return self._call(_rpcs.set_retention(name, keep_last, tenant), timeout)

    def pin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> ResidencyEntry:
        """Keep the version `adapter` names loaded in the engine (never evicted)."""
        return self._call(_rpcs.residency_op("PinAdapter", adapter, tenant), timeout)

    def unpin_adapter(
        self, adapter: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> ResidencyEntry:
        return self._call(_rpcs.residency_op("UnpinAdapter", adapter, tenant), timeout)

    def prefetch_adapter(
        self, adapter: str, tenant: str = "", *, timeout: Timeout = CLIENT_DEFAULT
    ) -> ResidencyEntry:
        """Load the version `adapter` names into the engine now."""
        return self._call(_rpcs.residency_op("PrefetchAdapter", adapter, tenant), timeout)

    def get_residency(
        self,
        tenant: str = "",
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: Timeout = CLIENT_DEFAULT,
    ) -> Residency:
        """Which adapters are where (engine, disk, store); operators may pass tenant "*".

        One page (`page_size` adapters; 0 = the server's default); pass `next_page_token` back
        as `page_token` for the next, until it is ""."""
        return self._call(_rpcs.get_residency(tenant, page_size, page_token), timeout)

    # --- evaluations and gated promotion -------------------------------------------------------

    def put_evaluation_set(
        self, name: str, set_json: str, *, tenant: str = "", timeout: Timeout = CLIENT_DEFAULT
    ) -> EvaluationSetInfo:
        """Upload the adapter's evaluation set (JSON, docs/lifecycle.md); it becomes the
        current set. INVALID_ARGUMENT with the reason for a set that is not valid."""
        return self._call(_rpcs.put_evaluation_set(name, set_json, tenant), timeout)

    def evaluate_adapter(
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
        return self._call(_rpcs.evaluate_adapter(name, version, set_sha256, tenant), timeout)

    def get_evaluations(
        self, name: str, version: str = "", *, tenant: str = "", timeout: Timeout = CLIENT_DEFAULT
    ) -> Evaluations:
        """The current set, the stored results (only `version`'s when given) and the alias
        policies."""
        return self._call(_rpcs.get_evaluations(name, version, tenant), timeout)

    def set_alias_policy(
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
        return self._call(_rpcs.set_alias_policy(name, alias, min_score, tenant), timeout)

    # --- automatic rollback (docs/lifecycle.md) -----------------------------------------------
    def set_rollback_policy(
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
        return self._call(rpc, timeout)

    def remove_rollback_policy(
        self, name: str, alias: str, *, tenant: str = "", timeout: Timeout = CLIENT_DEFAULT
    ) -> Adapter:
        """Remove `alias`'s rollback policy: its canaries are no longer rolled back."""
        return self._call(_rpcs.remove_rollback_policy(name, alias, tenant), timeout)
