"""The gateway's core, free of protobuf: admit → resolve → hold the adapter → generate.

Services translate protobuf to the plain types here and back; this module owns the order of
checks and the per-request bookkeeping (in-flight requests per version, for revocation). The
admin workflows (upload, alias, share, compose, revoke, pin) are the admin core's:
`lora_gateway.adapters`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from adapter_store import AdapterRef, AdapterStore, AdapterVersion
from lora_gateway import errors
from lora_gateway.config import Settings
from lora_gateway.engine.base import (
    Engine,
    FinishReason,
    GenerateParams,
    LoadedAdapter,
    Prompt,
    TokenChunk,
)
from lora_gateway.metrics import Metrics
from lora_gateway.residency import Residency, key_of
from lora_gateway.tenancy import Admission, KeyRing, Principal, Role, Tenants, check_max_tokens

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


@dataclass(frozen=True)
class GenerateCall:
    adapter: AdapterRef | None
    prompt: Prompt
    params: GenerateParams
    request_id: str


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
        #: Key of the per-tenant prefix-cache salts: random per process (the prefix cache is
        #: too), never logged, so a salt cannot be guessed from a tenant's name.
        self._salt_key = secrets.token_bytes(32)

    def cache_salt(self, tenant: str) -> str | None:
        """The tenant's prefix-cache salt (None when `prefix_cache_per_tenant` is off)."""
        if not self.settings.prefix_cache_per_tenant:
            return None
        return hmac.new(self._salt_key, tenant.encode("utf-8"), hashlib.sha256).hexdigest()

    # --- inference --------------------------------------------------------------------------
    async def generate(
        self, principal: Principal, call: GenerateCall
    ) -> AsyncIterator[tuple[Served, TokenChunk]]:
        """Stream (served version, delta) pairs; the last delta carries the finish reason."""
        if self.draining:
            raise errors.Unavailable("server is shutting down")
        tenant = self.keyring.tenant(principal.tenant)
        check_max_tokens(call.params.max_tokens, tenant)
        started = time.perf_counter()
        async with self.admission.slot(principal, tenant, tokens=call.params.max_tokens) as slot:
            version = None
            if call.adapter is not None:
                version = await self.residency.resolve(
                    principal.tenant, call.adapter, any_owner=principal.role is Role.OPERATOR
                )
            served = Served.of(version)
            async with contextlib.AsyncExitStack() as stack:
                loaded = (
                    None
                    if version is None
                    else await stack.enter_async_context(self.residency.use(version, tenant))
                )
                queued = time.perf_counter()
                produced = 0
                prompt = dataclasses.replace(
                    call.prompt, cache_salt=self.cache_salt(principal.tenant)
                )
                async for chunk in self._run(call, prompt, loaded, version):
                    if produced == 0 and self.metrics is not None:
                        self.metrics.queued(queued - started)
                        self.metrics.first_token(principal.tenant, time.perf_counter() - started)
                    produced += len(chunk.token_ids)
                    slot.generated(len(chunk.token_ids))
                    yield served, chunk
                if self.metrics is not None:
                    self.metrics.tokens_out(principal.tenant, produced)

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
