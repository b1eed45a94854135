"""The gateway's core, free of protobuf: admit → resolve → hold the adapter → generate.

Services translate protobuf (gRPC) and JSON (the OpenAI-compatible HTTP front) to the plain
types here and back; this module owns the order of checks and the per-request bookkeeping
(in-flight requests per version, for revocation). Both fronts call the same methods, so keys,
permissions, tenancy, limits and metrics are the same whichever one a client speaks. The admin
workflows (upload, alias, share, compose, revoke, pin) are the admin core's:
`lora_gateway.adapters`.

Request features: a prompt is text, token ids or a chat conversation (`ChatPrompt`, rendered
with the chat template by `chat.ChatTemplates` after admission, then tokenized); a structured
output constraint is checked against its limits (`structured.check_constraint`) and logprobs
against `max_logprobs` before admission, so a refused request costs no rate tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from adapter_store import AdapterRef, AdapterStore, AdapterVersion, Manifest
from lora_gateway import errors
from lora_gateway.chat import ChatLimits, ChatMessage, ChatTemplates
from lora_gateway.config import Settings
from lora_gateway.engine.base import (
    Engine,
    FinishReason,
    GenerateParams,
    LoadedAdapter,
    Prompt,
    TokenChunk,
)
from lora_gateway.metrics import Metrics, VersionCall
from lora_gateway.residency import Residency, key_of, owner_of
from lora_gateway.structured import StructuredLimits, check_constraint
from lora_gateway.tenancy import Admission, KeyRing, Principal, Role, Tenants, check_max_tokens
from lora_gateway.usage import Meter

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """The exact adapter version a request ran on (None fields for the base model)."""

    tenant: str = ""
    name: str = ""
    version: str = ""

    @classmethod
    def of(cls, version: AdapterVersion | None) -> Served:
        if version is None:
            return cls()
        return cls(version.tenant, version.name, version.version_id)


@dataclass
class _Outcome:
    """How a call on an adapter version went, for its per-version metrics."""

    code: str = "OK"
    #: Seconds from arrival to the first token (None: no token came).
    ttft: float | None = None
    tokens: int = 0
    finish: str | None = None


def _code_of(exc: BaseException, *, finished: bool) -> str:
    """The status code name a call ended with, as its front will answer it: a caller that
    went away (or stopped reading) is CANCELLED, unless the last token had already come."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "OK" if finished else "CANCELLED"
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    code: str = errors.status_of(exc)[0].name
    return code


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered with the chat template (an adapter version's own when its
    upload carried one, else the base model's) and tokenized before it reaches the engine."""

    messages: tuple[ChatMessage, ...]
    #: Append the template's opening of an assistant turn (transformers' flag; default on).
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class GenerateCall:
    adapter: AdapterRef | None
    prompt: Prompt | ChatPrompt
    params: GenerateParams
    request_id: str
    #: Which version of a weighted alias serves the call: the same key, the same version
    #: while the weights are unchanged (e.g. a conversation's id). "" = the request id.
    routing_key: str = ""
    #: A case of an evaluation (lora_gateway.evaluation), not a client's call: not counted in
    #: the automatic rollback's windows.
    evaluation: bool = False


@dataclass(frozen=True)
class Tokenized:
    """What `Gateway.tokenize` returns."""

    token_ids: list[int]
    #: The prompt text the chat template rendered (None for a text prompt).
    rendered: str | None
    #: The engine's context length: prompt and output together must fit in it.
    max_model_len: int


@dataclass(frozen=True)
class ModelEntry:
    """One model a caller may name: an adapter (own or shared) or the base model."""

    #: What the caller passes as `model`: "name" (own), "owner/name" (shared) or the base name.
    id: str
    #: The owning tenant ("" for the base model).
    owner: str
    #: Seconds since the epoch of the adapter's newest version (0 for the base model).
    created: int = 0


class Gateway:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: AdapterStore,
        residency: Residency,
        keyring: KeyRing | Tenants,
        admission: Admission,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.residency = residency
        #: The tenants in force (reloaded by the server when the tenants file changes).
        self.keyring = keyring if isinstance(keyring, Tenants) else Tenants(keyring)
        self.admission = admission
        self.metrics = metrics
        self.draining = False
        self.structured_limits = StructuredLimits.of(settings)
        #: The chat templates (the base model's from the engine's tokenizer).
        self.chat = ChatTemplates(engine.tokenizer_info(), ChatLimits.of(settings))
        #: Store reads of model listings (the OpenAI front's /v1/models): their own threads.
        self._reads = ThreadPoolExecutor(2, thread_name_prefix="model-list")
        #: Key of the per-tenant prefix-cache salts: random per process (the prefix cache is
        #: too), never logged, so a salt cannot be guessed from a tenant's name.
        self._salt_key = secrets.token_bytes(32)
        #: Called with every finished call on an adapter version and the adapter's cached
        #: manifest (None if not cached), on the event loop; cheap, no I/O (the automatic
        #: rollback's call windows: lora_gateway.rollback).
        self.version_observers: list[Callable[[VersionCall, Manifest | None], None]] = []

    def close(self) -> None:
        self.chat.close()
        self._reads.shutdown(wait=False, cancel_futures=True)

    # --- checks -----------------------------------------------------------------------------
    def check_params(self, params: GenerateParams) -> None:
        """Structured output and logprobs within their limits (InvalidArgument otherwise)."""
        if params.structured is not None:
            check_constraint(params.structured, self.structured_limits)
        most = self.settings.max_logprobs
        for name, value in (
            ("logprobs", params.logprobs),
            ("prompt_logprobs", params.prompt_logprobs),
        ):
            if value is not None and not 0 <= value <= most:
                raise errors.InvalidArgument(
                    f"{name}: at most {most} alternatives per token (max_logprobs), got {value}"
                )

    async def chat_template_of(self, version: AdapterVersion | None) -> str | None:
        """The chat template of `version`: its own (the upload's chat_template.jinja, checked
        at upload, fetched with its files), or None, the base model's, for the base model and
        for versions without one."""
        if version is None:
            return None
        return await self.residency.chat_template(version)

    async def prompt_ids(
        self, prompt: Prompt | ChatPrompt, version: AdapterVersion | None
    ) -> tuple[Prompt, str | None]:
        """A chat prompt rendered and tokenized (its text returned too); other prompts as
        they are. A conversation the context cannot hold is INVALID_ARGUMENT."""
        if isinstance(prompt, Prompt):
            return prompt, None
        template = await self.chat_template_of(version)
        text = await self.chat.render(
            prompt.messages,
            add_generation_prompt=prompt.add_generation_prompt,
            template=template,
            scope="" if version is None else owner_of(key_of(version)),
        )
        ids = await self.engine.tokenize(text, add_special_tokens=False)
        limit = self.engine.max_model_len
        if not ids:
            raise errors.InvalidArgument("messages: the chat template rendered an empty prompt")
        if len(ids) >= limit:
            raise errors.InvalidArgument(
                f"messages: the conversation is {len(ids)} tokens, and the model's context is "
                f"{limit} (max_model_len) for the prompt and the output together"
            )
        return Prompt(token_ids=tuple(ids)), text

    def cache_salt(self, tenant: str) -> str | None:
        """The tenant's prefix-cache salt (None when `prefix_cache_per_tenant` is off)."""
        if not self.settings.prefix_cache_per_tenant:
            return None
        return hmac.new(self._salt_key, tenant.encode("utf-8"), hashlib.sha256).hexdigest()

    # --- inference --------------------------------------------------------------------------
    async def generate(
        self, principal: Principal, call: GenerateCall, usage: Meter | None = None
    ) -> AsyncIterator[tuple[Served, TokenChunk]]:
        """Stream (served version, delta) pairs; the last delta carries the finish reason.

        `usage`, the front's meter of the call, gets the request id, the version served and
        every delta's tokens as they are handed out (the front writes the record)."""
        if usage is not None:
            usage.request_id = call.request_id
            usage.base_model = call.adapter is None
        if self.draining:
            raise errors.Unavailable("server is shutting down")
        tenant = self.keyring.tenant(principal.tenant)
        check_max_tokens(call.params.max_tokens, tenant)
        self.check_params(call.params)
        started = time.perf_counter()
        async with self.admission.slot(principal, tenant, tokens=call.params.max_tokens) as slot:
            version = None
            if call.adapter is not None:
                version = await self.residency.resolve(
                    principal.tenant,
                    call.adapter,
                    any_owner=principal.role is Role.OPERATOR,
                    routing_key=call.routing_key or call.request_id,
                )
            served = Served.of(version)
            if usage is not None:
                usage.served(served.tenant, served.name, served.version)
            outcome = _Outcome()
            try:
                ready, _ = await self.prompt_ids(call.prompt, version)
                async with contextlib.AsyncExitStack() as stack:
                    loaded = (
                        None
                        if version is None
                        else await stack.enter_async_context(self.residency.use(version, tenant))
                    )
                    queued = time.perf_counter()
                    produced = 0
                    salt = self.cache_salt(principal.tenant)
                    prompt = dataclasses.replace(ready, cache_salt=salt)
                    async for chunk in self._run(call, prompt, loaded, version):
                        if outcome.ttft is None:
                            outcome.ttft = time.perf_counter() - started
                        if produced == 0 and self.metrics is not None:
                            self.metrics.queued(queued - started)
                            self.metrics.first_token(principal.tenant, outcome.ttft)
                        produced += len(chunk.token_ids)
                        outcome.tokens = produced
                        if chunk.finish_reason is not None:
                            outcome.finish = chunk.finish_reason.value
                        slot.generated(len(chunk.token_ids))
                        if usage is not None:
                            reason = chunk.finish_reason
                            usage.delta(
                                len(chunk.token_ids),
                                chunk.prompt_tokens,
                                None if reason is None else reason.value,
                            )
                        yield served, chunk
                    if self.metrics is not None:
                        self.metrics.tokens_out(principal.tenant, produced)
            except BaseException as exc:
                outcome.code = _code_of(exc, finished=outcome.finish is not None)
                raise
            finally:
                if version is not None:
                    self._version_done(
                        principal.tenant, version, outcome, started, evaluation=call.evaluation
                    )

    def _version_done(
        self,
        tenant: str,
        version: AdapterVersion,
        outcome: _Outcome,
        started: float,
        *,
        evaluation: bool = False,
    ) -> None:
        """Record a call on `version` in the per-version metrics and hand it to the
        `version_observers`, once, whatever its end (no I/O: the aliases come from the cached
        manifest)."""
        if self.metrics is None and not self.version_observers:
            return
        manifest = self.residency.manifests.cached.get((version.tenant, version.name))
        call = VersionCall(
            tenant=tenant,
            owner=version.tenant,
            name=version.name,
            version=version.version_id,
            code=outcome.code,
            seconds=time.perf_counter() - started,
            ttft_seconds=outcome.ttft,
            completion_tokens=outcome.tokens,
            finish_reason=outcome.finish,
            evaluation=evaluation,
        )
        for observe in self.version_observers:
            try:
                observe(call, manifest)
            except Exception:  # an observer's bug must not change how the call ended
                log.exception("a version observer failed")
        if self.metrics is None:
            return
        aliased: set[str] = set()
        if manifest is not None:
            aliased.update(manifest.aliases.values())
            for split in manifest.alias_weights.values():
                aliased.update(split)
        self.metrics.version_done(call, {f"sha256:{sha}" for sha in aliased})

    async def _run(
        self,
        call: GenerateCall,
        prompt: Prompt,
        adapter: LoadedAdapter | None,
        version: AdapterVersion | None,
    ) -> AsyncIterator[TokenChunk]:
        async for chunk in self.engine.generate(call.request_id, prompt, call.params, adapter):
            if chunk.finish_reason is FinishReason.ABORT:
                if version is not None and self.residency.is_blocked(key_of(version)):
                    raise errors.Aborted("request aborted: the adapter version was revoked")
                raise errors.Unavailable("request aborted by the server")
            yield chunk

    # --- tokenize and models ----------------------------------------------------------------
    async def tokenize(
        self,
        principal: Principal,
        adapter: AdapterRef | None,
        prompt: Prompt | ChatPrompt,
        routing_key: str = "",
    ) -> Tokenized:
        """Token ids of a prompt as `generate` would send it to the engine. An adapter is
        resolved with the same visibility rules (another tenant's is NOT_FOUND like a missing
        one), never loaded: it only chooses the chat template. A weighted alias resolves by
        `routing_key` as in `generate` ("" without one: its primary version)."""
        if self.draining:
            raise errors.Unavailable("server is shutting down")
        version = None
        if adapter is not None:
            version = await self.residency.resolve(
                principal.tenant,
                adapter,
                any_owner=principal.role is Role.OPERATOR,
                routing_key=routing_key or None,
            )
        ready, rendered = await self.prompt_ids(prompt, version)
        if ready.token_ids is not None:
            ids = list(ready.token_ids)
        else:
            assert ready.text is not None
            ids = await self.engine.tokenize(ready.text)
        return Tokenized(ids, rendered, self.engine.max_model_len)

    async def models(self, principal: Principal, base_name: str) -> list[ModelEntry]:
        """What `principal` may name as a model: the base model, its tenant's live adapters,
        then those shared with it (from its share index), each part sorted by name, read a page
        at a time, at most `openai_max_models` adapters."""
        if self.draining:
            raise errors.Unavailable("server is shutting down")
        most = self.settings.openai_max_models
        entries = [ModelEntry(base_name, "")]
        tenant = principal.tenant
        for shared in (False, True):
            after: str | None = ""
            part: list[ModelEntry] = []
            while after is not None and len(entries) + len(part) <= most:
                read = self.store.shared_page if shared else self.store.adapter_page
                page = await self._read(read, tenant, after=after, limit=min(200, most))
                for manifest in page.items:
                    if len(entries) + len(part) > most:
                        break
                    name = f"{manifest.tenant}/{manifest.name}" if shared else manifest.name
                    part.append(ModelEntry(name, manifest.tenant, _created(manifest)))
                after = page.next_after
            entries.extend(sorted(part, key=lambda entry: entry.id))
        return entries

    async def _read(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reads, functools.partial(fn, *args, **kwargs))


def _created(manifest: Manifest) -> int:
    """Seconds since the epoch of the manifest's newest version (0 when unknown)."""
    from datetime import datetime

    stamps = []
    for version in manifest.versions.values():
        try:
            stamps.append(datetime.fromisoformat(version.created_at.replace("Z", "+00:00")))
        except (AttributeError, ValueError):
            continue
    return int(max(stamps).timestamp()) if stamps else 0
