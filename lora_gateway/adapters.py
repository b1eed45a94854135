"""The admin core, free of protobuf: upload, alias, share, compose, revoke, quarantine, pin.

`Adapters` takes domain values and the caller's `Principal`, and raises `lora_gateway.errors`
types (and the store's, which the interceptor maps the same way); `services/admin.py` only
translates protobuf to these arguments and the results back (parse → core → to_pb).

What follows a manifest write happens here and nowhere else, in this order: the store call, then
this replica's residency is told (`Residency.forget` after an upload or a composition: the
manifest is read again on next use; `apply_manifest` after an alias move, share or unshare, and
`forget_shares` of the grantee; block → abort → unload → purge for a revocation, DESIGN
invariant 7; block and `remember` for a quarantine), then the action is audited.

Store I/O of the admin calls runs in the core's own bounded pool (`admin_store_threads`), apart
from asyncio's default executor (cold loads, revocation) and residency's manifest pool, and one
tenant holds at most half of its threads at once. Listings are paged (`paging`): a page costs one
store listing and at most `page_size` manifest reads, and what is shared with a tenant comes from
its share index, never from a scan of the bucket. A tenant other than an adapter's owner sees
only what it needs of it (`sees_everything`).

Who may act on what: the tenant a call names is decided by `Policy.effective_tenant_for_adapter`
(another tenant's adapter is answered like a missing one) or `effective_tenant_for_listing`; who
may *use* an adapter is the store's one sharing rule (`adapter_store.can_use`, through
`Residency.resolve` and the store's share index); only the owner tenant or an operator changes
where an adapter lives (pin, unpin, prefetch) or sees all of it (`sees_everything`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import grpc

from adapter_store import (
    AdapterRef,
    AdapterVersion,
    FileEntry,
    InvalidAdapter,
    Manifest,
    StoreError,
    Upload,
)
from adapter_store.errors import QuotaExceeded, SpoolFull
from adapter_store.evaluations import MAX_RESULTS_PER_VERSION, EvaluationResult, EvaluationSetRef
from adapter_store.model import utc_now
from adapter_store.quota import Quota
from adapter_store.rollback import RollbackPolicy, RollbackRecord
from lora_gateway import errors, paging
from lora_gateway.audit import AuditLog
from lora_gateway.evaluation import Evaluator, parse_set
from lora_gateway.gateway import Gateway
from lora_gateway.metrics import VersionSummary
from lora_gateway.paging import Cursor, PageTokens
from lora_gateway.residency import ResidencyEntry, key_of
from lora_gateway.tenancy import KeyRing, Policy, Principal, Role, TenantConfig

__all__ = [
    "AdapterDetail",
    "AdapterPage",
    "Adapters",
    "ResidencyPage",
    "Retention",
    "Revoked",
    "TenantUsage",
    "UploadChunk",
    "UploadHeader",
    "UploadMessage",
    "parse_ref",
    "sees_everything",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The `key_id` of `gateway_principal`: not a key (the gateway acting by itself).
GATEWAY_KEY_ID = "gateway"
#: The audit `rpc` of an automatic rollback and of a scheduled evaluation (no principal).
AUTOMATIC_ROLLBACK_RPC = "automatic-rollback"
SCHEDULED_EVALUATION_RPC = "scheduled-evaluation"


# --- domain arguments and results ------------------------------------------------------------
@dataclass(frozen=True)
class UploadHeader:
    """The first message of an upload: where the new version goes and the files it holds."""

    #: The owner tenant ("" = the caller's own).
    tenant: str
    name: str
    files: tuple[FileEntry, ...]
    aliases: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class UploadChunk:
    """Bytes of one declared file, in order."""

    filename: str
    data: bytes


#: One message of an upload stream: the header first, then chunks. None is a message that
#: carries neither (refused like a misplaced one).
UploadMessage: TypeAlias = UploadHeader | UploadChunk | None


@dataclass
class _UploadMeter:
    """One upload's bytes received and the seconds spent waiting for the client's messages."""

    received: int = 0
    waited: float = 0.0


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant stores, against its quota."""

    tenant: str
    stored_bytes: int
    max_stored_bytes: int
    adapters: int
    max_adapters: int


@dataclass(frozen=True)
class AdapterPage:
    """One page of ListAdapters; `usage` only for the tenant's own callers and operators."""

    adapters: list[Manifest]
    next_page_token: str
    usage: TenantUsage | None


@dataclass(frozen=True)
class AdapterDetail:
    """GetAdapter: the manifest, and the owner's usage for its own callers and operators."""

    manifest: Manifest
    usage: TenantUsage | None
    #: Each version's recent calls on this replica: the caller's tenant's (operators: all).
    serving: tuple[VersionSummary, ...] = ()


@dataclass(frozen=True)
class ResidencyPage:
    """One page of GetResidency: where each live version of the listed adapters is."""

    entries: list[ResidencyEntry]
    engine_capacity: int
    disk_budget_bytes: int
    disk_used_bytes: int
    next_page_token: str


@dataclass(frozen=True)
class Retention:
    """What SetRetention did: the manifest with its policy, the versions retired (sha256s),
    and the in-flight requests on them aborted."""

    manifest: Manifest
    retired: list[str]
    aborted: int


@dataclass(frozen=True)
class Revoked:
    """What a revocation did: the sha256s revoked, and the in-flight requests it aborted."""

    shas: list[str]
    aborted: int


# --- small rules -------------------------------------------------------------------------------
def parse_ref(text: str) -> AdapterRef:
    """An adapter reference from user text; INVALID_ARGUMENT with the reason otherwise."""
    try:
        return AdapterRef.parse(text)
    except InvalidAdapter as exc:
        raise errors.InvalidArgument(f"adapter reference: {exc}") from None


def sees_everything(principal: Principal, owner: str) -> bool:
    """The owner tenant and operators see all of an adapter (and its usage); a grantee sees
    what it needs to use it, without who made it, the description or the parts it came from."""
    return principal.tenant == owner or principal.role is Role.OPERATOR


def creator(principal: Principal) -> str:
    """The `created_by` of what the principal makes: tenant and key label, never the key."""
    return f"{principal.tenant}:{principal.key_id}"


def quota_of(tenant: TenantConfig) -> Quota:
    """The storage quota of a tenant (tenants file: max_stored_bytes, max_adapters)."""
    return Quota(max_stored_bytes=tenant.max_stored_bytes, max_adapters=tenant.max_adapters)


class Adapters:
    """Admin workflows on the gateway's store and residency; each call names its principal."""

    def __init__(self, gateway: Gateway, audit: AuditLog | None) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.store = gateway.store
        self.residency = gateway.residency
        self.audit = audit
        threads = gateway.settings.admin_store_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="admin-store")
        self._slots = asyncio.Semaphore(threads)
        self._per_tenant = max(1, threads // 2)
        self._tenant_slots: dict[str, asyncio.Semaphore] = {}
        self._tokens: tuple[KeyRing, PageTokens] | None = None
        self._evaluations: Evaluator | None = None

    # --- plumbing -----------------------------------------------------------------------------
    async def _store(self, principal: Principal, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run blocking store I/O in the admin pool: a tenant's calls wait for one of its own
        slots (half the pool), then for a thread; waiting never occupies a thread, and a call
        cancelled while it waits never runs."""
        tenant = principal.tenant
        mine = self._tenant_slots.get(tenant)
        if mine is None:
            mine = self._tenant_slots[tenant] = asyncio.Semaphore(self._per_tenant)
        async with mine, self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    def _page_tokens(self) -> PageTokens:
        keyring = self.gateway.keyring.current
        if self._tokens is None or self._tokens[0] is not keyring:
            self._tokens = (keyring, PageTokens(keyring.derive_key("admin page tokens v1")))
        return self._tokens[1]

    def _audit(
        self,
        principal: Principal,
        rpc: str,
        tenant: str,
        name: str = "",
        version: str = "",
        detail: str = "",
    ) -> None:
        """The audit record of an action that succeeded (refusals: the interceptor)."""
        if self.audit is not None:
            self.audit.record(
                principal=principal,
                rpc=rpc,
                tenant=tenant,
                adapter=name,
                version=version,
                decision="allow",
                code="OK",
                detail=detail,
            )

    def _limits(self, principal: Principal) -> TenantConfig | None:
        """The caller's tenant's caps on residency (None: operators act without them)."""
        if principal.role is Role.OPERATOR:
            return None
        return self.gateway.keyring.tenant(principal.tenant)

    def _quota(self, tenant: str) -> Quota:
        return quota_of(self.gateway.keyring.tenant(tenant))

    def _refused(self, exc: BaseException) -> None:
        """Count a refusal by the spool budget or a storage quota (metrics)."""
        metrics = self.gateway.metrics
        if metrics is not None and isinstance(exc, SpoolFull | QuotaExceeded):
            metrics.refused("spool" if isinstance(exc, SpoolFull) else "quota")

    async def _usage(self, principal: Principal, tenant: str) -> TenantUsage | None:
        """The tenant's storage usage, for callers of that tenant and operators only."""
        if not sees_everything(principal, tenant):
            return None
        usage = await self._store(principal, self.store.usage, tenant)
        limits = self.gateway.keyring.tenant(tenant)
        return TenantUsage(
            tenant=usage.tenant,
            stored_bytes=usage.stored_bytes,
            max_stored_bytes=limits.max_stored_bytes,
            adapters=usage.adapters,
            max_adapters=limits.max_adapters,
        )

    async def _changed(
        self,
        principal: Principal,
        rpc: str,
        manifest: Manifest,
        version: str = "",
        detail: str = "",
    ) -> Manifest:
        """After a manifest write on this replica: residency takes it, then the audit."""
        await self.residency.apply_manifest(manifest)
        self._audit(principal, rpc, manifest.tenant, manifest.name, version, detail)
        return manifest

    # --- upload -------------------------------------------------------------------------------
    async def upload(
        self, principal: Principal, messages: AsyncIterator[UploadMessage]
    ) -> AdapterVersion:
        """Receive an upload stream (header, then chunks) into a new version.

        The whole upload must finish within `upload_timeout_s` and keep up the minimum rate
        (`_next_message`); either failure is DEADLINE_EXCEEDED and nothing is kept. With
        `prefetch_on_upload` the new version is then loaded like a prefetch by the caller.
        """
        timeout = self.settings.upload_timeout_s
        try:
            async with asyncio.timeout(timeout):
                version = await self._receive(principal, messages)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"upload did not finish within {timeout:g}s") from None
        self._audit(principal, "UploadAdapter", version.tenant, version.name, version.version_id)
        await self._retire_expired(principal, version.tenant, version.name)
        if self.settings.prefetch_on_upload:
            await self.residency.prefetch(version, self._limits(principal))
        return version

    async def _next_message(
        self, stream: AsyncIterator[UploadMessage], meter: _UploadMeter
    ) -> tuple[bool, UploadMessage]:
        """(False, None) at the end, else (True, the next message); DeadlineExceeded if the
        stream is too slow.

        After `upload_rate_grace_s`, the stream must have delivered `upload_min_rate_bytes_s`
        per second on average of the time spent waiting for it: the wait for the next message
        ends when the bytes received so far stop being enough, so a stream that drips or goes
        silent is closed at once. Time the gateway itself spends (store writes, a busy store
        while the upload begins) is not the client's and is not counted.
        """
        rate = self.settings.upload_min_rate_bytes_s
        if rate <= 0:
            return await _next(stream)
        loop = asyncio.get_running_loop()
        allowed = self.settings.upload_rate_grace_s + meter.received / rate - meter.waited
        began = loop.time()
        try:
            async with asyncio.timeout(max(0.0, allowed)):
                return await _next(stream)
        except TimeoutError:
            waited = meter.waited + loop.time() - began
            raise errors.DeadlineExceeded(
                f"upload too slow: {meter.received} bytes in {waited:.1f}s of waiting for the "
                f"client, below the minimum of {rate} bytes/s after "
                f"{self.settings.upload_rate_grace_s:g}s"
            ) from None
        finally:
            meter.waited += loop.time() - began

    async def _receive(
        self, principal: Principal, messages: AsyncIterator[UploadMessage]
    ) -> AdapterVersion:
        meter = _UploadMeter()
        stream = aiter(messages)
        _, header = await self._next_message(stream, meter)
        if not isinstance(header, UploadHeader):
            raise errors.InvalidArgument("the first UploadAdapter message must be the header")
        tenant = Policy.effective_tenant_for_adapter(principal, header.tenant)
        # Decided from the header, before any byte is spooled: the caller's tenant's cap on
        # uploads in progress, the owner's quota, the spool budget (begin_upload).
        with self.gateway.admission.upload(
            principal, self.gateway.keyring.tenant(principal.tenant)
        ):
            try:
                upload: Upload = await self._store(
                    principal,
                    self.store.begin_upload,
                    tenant,
                    header.name,
                    list(header.files),
                    created_by=creator(principal),
                    aliases=header.aliases,
                    description=header.description,
                    quota=self._quota(tenant),
                    # An uploaded chat_template.jinja: compiled and rendered in the sandbox.
                    check_template=self.gateway.chat.check_upload,
                )
            except (SpoolFull, QuotaExceeded) as exc:
                self._refused(exc)
                raise
            try:
                while True:
                    more, message = await self._next_message(stream, meter)
                    if not more:
                        break
                    if not isinstance(message, UploadChunk):
                        raise errors.InvalidArgument("only one header per upload")
                    await self._store(principal, upload.write, message.filename, message.data)
                    meter.received += len(message.data)
                version = await self._store(principal, upload.commit)
            except BaseException as exc:
                self._refused(exc)
                await asyncio.shield(self._store(principal, upload.abort))
                raise
        self.residency.forget(tenant, header.name)
        return version

    # --- reads --------------------------------------------------------------------------------
    async def list_adapters(
        self,
        principal: Principal,
        tenant: str,
        *,
        include_shared: bool,
        page_size: int,
        page_token: str,
    ) -> AdapterPage:
        """The tenant's own adapters, then (include_shared) those shared with it, paged."""
        tenant = Policy.effective_tenant_for_listing(principal, tenant)
        limit = paging.page_size(page_size)
        scope = f"{tenant}/{int(include_shared)}"
        tokens = self._page_tokens()
        cursor = tokens.parse(page_token, "ListAdapters", scope) or Cursor("own")
        if cursor.phase == "own":
            page = await self._store(
                principal, self.store.adapter_page, tenant, after=cursor.after, limit=limit
            )
            if page.next_after is not None:
                following: Cursor | None = Cursor("own", page.next_after)
            else:
                following = Cursor("shared") if include_shared else None
        elif cursor.phase == "shared" and include_shared:
            page = await self._store(
                principal, self.store.shared_page, tenant, after=cursor.after, limit=limit
            )
            following = None if page.next_after is None else Cursor("shared", page.next_after)
        else:
            raise errors.InvalidArgument(paging.INVALID_TOKEN_TEXT)
        return AdapterPage(
            adapters=list(page.items),
            next_page_token=_token(tokens, "ListAdapters", scope, following),
            usage=await self._usage(principal, tenant),
        )

    async def get_adapter(self, principal: Principal, tenant: str, name: str) -> AdapterDetail:
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        manifest = await self._store(principal, self.store.get_manifest, tenant, name)
        return AdapterDetail(
            manifest, await self._usage(principal, tenant), self._serving(principal, manifest)
        )

    def _serving(self, principal: Principal, manifest: Manifest) -> tuple[VersionSummary, ...]:
        """The per-version summary of `manifest`'s adapter. Only the calls of the caller's own
        tenant (an operator: every tenant's), so nothing here depends on a grantee's traffic."""
        metrics = self.gateway.metrics
        if metrics is None:
            return ()
        caller = None if principal.role is Role.OPERATOR else principal.tenant
        return tuple(metrics.version_summary(manifest.tenant, manifest.name, caller))

    async def get_residency(
        self, principal: Principal, tenant: str, *, page_size: int, page_token: str
    ) -> ResidencyPage:
        """Where each live version of the tenant's adapters is, paged by adapter ("*": every
        tenant's, for operators)."""
        if tenant == "*":
            if principal.role is not Role.OPERATOR:
                raise errors.PermissionDenied("permission denied")
            scope = "*"
        else:
            scope = Policy.effective_tenant_for_listing(principal, tenant)
        limit = paging.page_size(page_size)
        tokens = self._page_tokens()
        cursor = tokens.parse(page_token, "GetResidency", scope)
        if scope == "*":
            manifests, following = await self._every_tenant(
                principal, cursor or Cursor("next:"), limit
            )
        else:
            page = await self._store(
                principal,
                self.store.adapter_page,
                scope,
                after=cursor.after if cursor else "",
                limit=limit,
            )
            manifests = list(page.items)
            following = None if page.next_after is None else Cursor("", page.next_after)
        cache = self.residency.cache
        return ResidencyPage(
            entries=[
                self.residency.entry(version)
                for manifest in manifests
                for _, version in sorted(manifest.versions.items())
            ],
            engine_capacity=self.residency.capacity,
            disk_budget_bytes=cache.budget_bytes,
            disk_used_bytes=cache.used_bytes,
            next_page_token=_token(tokens, "GetResidency", scope, following),
        )

    async def _every_tenant(
        self, principal: Principal, cursor: Cursor, limit: int
    ) -> tuple[list[Manifest], Cursor | None]:
        """Up to `limit` adapters across tenants, from `cursor`: phase "in:<position>" while a
        tenant's adapters are being listed (after: the position among them), "next:<position>"
        between tenants (position: in the tenant listing). At most `limit` store listings and
        manifest reads in all."""
        manifests: list[Manifest] = []
        budget = limit
        state, _, position = cursor.phase.partition(":")
        if state not in ("", "in", "next"):
            raise errors.InvalidArgument(paging.INVALID_TOKEN_TEXT)
        tenant = position.removesuffix("/") if state == "in" else None
        after = cursor.after
        while budget > 0:
            if tenant is None:
                tenants = await self._store(
                    principal, self.store.tenant_page, after=position, limit=1
                )
                budget -= 1
                if not tenants.items:
                    if tenants.next_after is None:
                        return manifests, None
                    position = tenants.next_after  # a key outside the layout: skip it
                    continue
                tenant, after, position = tenants.items[0], "", f"{tenants.items[0]}/"
                continue
            page = await self._store(
                principal, self.store.adapter_page, tenant, after=after, limit=budget
            )
            budget -= max(1, page.examined)
            manifests.extend(page.items)
            if page.next_after is None:
                tenant, after = None, ""
            else:
                after = page.next_after
        if tenant is None:
            return manifests, Cursor(f"next:{position}")
        return manifests, Cursor(f"in:{position}", after)

    # --- manifest writes ----------------------------------------------------------------------
    async def set_alias(
        self,
        principal: Principal,
        tenant: str,
        name: str,
        alias: str,
        version: str,
        expected: str | None = None,
        *,
        require_eval_min_score: float | None = None,
    ) -> Manifest:
        """Point `alias` at `version` (only if it points at `expected` now, when given; only
        if the version has a passing evaluation, with `require_eval_min_score` or the alias's
        policy: `adapter_store.evaluations.gate`)."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        manifest = await self._store(
            principal,
            self.store.set_alias,
            tenant,
            name,
            alias,
            version,
            expected,
            require_eval_min_score=require_eval_min_score,
        )
        return await self._changed(
            principal, "SetAlias", manifest, version, _gated(require_eval_min_score)
        )

    async def set_alias_weights(
        self,
        principal: Principal,
        tenant: str,
        name: str,
        alias: str,
        weights: Mapping[str, float],
        expected: Mapping[str, float] | None = None,
        *,
        require_eval_min_score: float | None = None,
    ) -> Manifest:
        """Split `alias` between versions (a canary; `Registry.set_alias_weights` has the
        rules); one version with weight 1 makes it plain. Other replicas take it from the
        manifest, like an alias move. Audited with the versions and the split that resulted.
        Gated like `set_alias` for each version the alias does not hold yet."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        manifest = await self._store(
            principal,
            self.store.set_alias_weights,
            tenant,
            name,
            alias,
            dict(weights),
            None if expected is None else dict(expected),
            require_eval_min_score=require_eval_min_score,
        )
        split = sorted(manifest.split(alias).items())
        versions = ",".join(f"sha256:{sha}" for sha, _ in split)
        detail = f"{alias}: " + ", ".join(f"{sha[:12]}={weight:g}" for sha, weight in split)
        detail += _gated(require_eval_min_score)
        return await self._changed(principal, "SetAliasWeights", manifest, versions, detail)

    async def share(self, principal: Principal, tenant: str, name: str, grantee: str) -> Manifest:
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        manifest = await self._store(principal, self.store.share, tenant, name, grantee)
        self.residency.forget_shares(grantee)
        return await self._changed(principal, "ShareAdapter", manifest)

    async def unshare(self, principal: Principal, tenant: str, name: str, grantee: str) -> Manifest:
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        manifest = await self._store(principal, self.store.unshare, tenant, name, grantee)
        self.residency.forget_shares(grantee)
        return await self._changed(principal, "UnshareAdapter", manifest)

    async def compose(
        self,
        principal: Principal,
        tenant: str,
        name: str,
        parts: Sequence[tuple[str, float]],
        *,
        aliases: Sequence[str] = (),
        description: str = "",
    ) -> AdapterVersion:
        """A new version, the weighted sum of `parts` (adapter reference text, weight)."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        if not parts:
            raise errors.InvalidArgument("compose needs at least one part")
        refs = [(parse_ref(ref), float(weight)) for ref, weight in parts]
        with self.gateway.admission.upload(
            principal, self.gateway.keyring.tenant(principal.tenant)
        ):
            try:
                version = await self._store(
                    principal,
                    self.store.compose,
                    tenant,
                    name,
                    refs,
                    created_by=creator(principal),
                    aliases=tuple(aliases),
                    description=description,
                    quota=self._quota(tenant),
                )
            except BaseException as exc:
                self._refused(exc)
                raise
        self.residency.forget(tenant, name)
        self._audit(principal, "ComposeAdapter", tenant, name, version.version_id)
        await self._retire_expired(principal, tenant, name)
        return version

    async def revoke(
        self, principal: Principal, tenant: str, name: str, version: str | None = None
    ) -> Revoked:
        """Store marks it revoked → in-flight aborted → engine unload → disk cache → objects
        (DESIGN invariant 7); `version` None: the whole adapter.

        A whole adapter is blocked by name as well as by version, so that a load of it still in
        progress on this replica never serves (`Residency.block_name`)."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        started = time.perf_counter()
        # The admin pool, like every admin RPC's store I/O: asyncio's default executor is where
        # cold loads (downloads, validation) of a flooding tenant queue.
        shas = await self._store(
            principal, self.store.revoke, tenant, name, version, delete_objects=False
        )
        aborted = await self._unload_revoked(
            principal, tenant, name, shas, whole=version is None, started=started
        )
        self._audit(principal, "RevokeAdapter", tenant, name, ",".join(shas))
        return Revoked(shas, aborted)

    async def _unload_revoked(
        self,
        principal: Principal,
        tenant: str,
        name: str,
        shas: Sequence[str],
        *,
        whole: bool = False,
        started: float,
    ) -> int:
        """What follows the store's mark of revoked versions on this replica: block → abort →
        unload → purge (DESIGN invariant 7). Returns the requests aborted."""
        keys = [(tenant, name, sha) for sha in shas]
        self.residency.block(keys)
        if whole:
            keys = list(dict.fromkeys([*keys, *self.residency.block_name(tenant, name)]))
        else:
            self.residency.forget(tenant, name)
        aborted = await self.residency.unload(keys)
        await self._store(principal, self.store.purge, tenant, name, list(shas))
        log.info(
            "revoked %d version(s) of %s/%s, aborted %d request(s) in %.3fs",
            len(shas),
            tenant,
            name,
            aborted,
            time.perf_counter() - started,
        )
        return aborted

    # --- retention ----------------------------------------------------------------------------
    async def set_retention(
        self, principal: Principal, tenant: str, name: str, keep_last: int | None
    ) -> Retention:
        """Store the adapter's retention policy (keep the newest `keep_last` versions plus
        every aliased one; None: keep every version) and apply it at once: the versions it
        retires are revoked exactly like RevokeAdapter's (the store marks them, then this
        replica aborts, unloads and purges; other replicas follow the change feed). Refused
        with INVALID_ARGUMENT for `keep_last` < 1, the manifest unchanged. Audited."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        started = time.perf_counter()
        manifest, shas = await self._store(
            principal, self.store.set_retention, tenant, name, keep_last, delete_objects=False
        )
        aborted = 0
        if shas:
            aborted = await self._unload_revoked(principal, tenant, name, shas, started=started)
        await self.residency.apply_manifest(manifest)
        policy = "keep every version" if keep_last is None else f"keep_last={keep_last}"
        self._audit(
            principal,
            "SetRetention",
            tenant,
            name,
            ",".join(f"sha256:{sha}" for sha in shas),
            f"{policy}; retired {len(shas)}",
        )
        return Retention(manifest, shas, aborted)

    async def _retire_expired(self, principal: Principal, tenant: str, name: str) -> None:
        """After an upload or a composition: apply the adapter's retention policy (none: no
        write). A failure is logged, never the upload's: the version is published, and the
        policy applies again at the next upload or SetRetention."""
        started = time.perf_counter()
        try:
            _, shas = await self._store(
                principal, self.store.retire_expired, tenant, name, delete_objects=False
            )
            if shas:
                await self._unload_revoked(principal, tenant, name, shas, started=started)
        except (StoreError, errors.GatewayError) as exc:
            log.warning("retention of %s/%s not applied after an upload: %s", tenant, name, exc)
            return
        if shas:
            self._audit(
                principal,
                "SetRetention",
                tenant,
                name,
                ",".join(f"sha256:{sha}" for sha in shas),
                f"retention after an upload: retired {len(shas)}",
            )

    async def quarantine(
        self, versions: Sequence[AdapterVersion], mismatches: Sequence[str]
    ) -> None:
        """The runtime canary's verdict: refuse the versions here at once, then persist it in
        their manifests (every replica and a restarted process refuse them too), and audit and
        log each one. No principal: the server itself acts."""
        reason = (
            f"the runtime canary found the engine's outputs corrupted after it was loaded "
            f"({utc_now()})"
        )
        self.residency.block((key_of(v) for v in versions), quarantined=reason)
        for version in versions:
            persisted = True
            try:
                manifest = await asyncio.to_thread(
                    self.store.quarantine, version.tenant, version.name, version.sha, reason
                )
                self.residency.remember(manifest)
            except (StoreError, errors.GatewayError):
                persisted = False
                log.exception("could not persist the quarantine; refused on this replica only")
            if self.gateway.metrics is not None:
                self.gateway.metrics.quarantined()
            if self.audit is not None:
                self.audit.record(
                    principal=None,
                    rpc="runtime-canary/quarantine",
                    decision="deny",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                    tenant=version.tenant,
                    adapter=version.name,
                    version=version.version_id,
                    detail=f"quarantined{'' if persisted else ' (not persisted)'}: canary "
                    "mismatch " + ", ".join(mismatches),
                )
            log.error(
                "QUARANTINED adapter version %s/%s@%s: %s",
                version.tenant,
                version.name,
                version.version_id,
                reason,
            )

    # --- residency ----------------------------------------------------------------------------
    async def _owned_version(
        self, principal: Principal, tenant: str, adapter: str
    ) -> AdapterVersion:
        """The version a pin, unpin or prefetch acts on.

        Only the owner tenant (or an operator) may change where its adapter lives: a grantee
        can use a shared adapter but not pin it. Naming another tenant's adapter is answered
        like a missing one, before any lookup (nothing tells whether it exists or is shared).
        """
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        ref = parse_ref(adapter)
        operator = principal.role is Role.OPERATOR
        if not operator and ref.owner not in (None, tenant):
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        version = await self.residency.resolve(tenant, ref, any_owner=operator)
        if not operator and version.tenant != principal.tenant:
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        return version

    async def pin(self, principal: Principal, tenant: str, adapter: str) -> ResidencyEntry:
        """Keep the version in the engine, within the owner's `max_pins` (operators: no cap
        but the engine's)."""
        version = await self._owned_version(principal, tenant, adapter)
        entry = await self.residency.pin(version, self._limits(principal))
        self._audit(principal, "PinAdapter", version.tenant, version.name, version.version_id)
        return entry

    async def unpin(self, principal: Principal, tenant: str, adapter: str) -> ResidencyEntry:
        version = await self._owned_version(principal, tenant, adapter)
        entry = await self.residency.unpin(version)
        self._audit(principal, "UnpinAdapter", version.tenant, version.name, version.version_id)
        return entry

    async def prefetch(self, principal: Principal, tenant: str, adapter: str) -> ResidencyEntry:
        """Load the version into the engine now (it may be evicted later, like any other)."""
        version = await self._owned_version(principal, tenant, adapter)
        entry = await self.residency.prefetch(version, self._limits(principal))
        self._audit(principal, "PrefetchAdapter", version.tenant, version.name, version.version_id)
        return entry

    # --- evaluations and gated promotion (lora_gateway.evaluation) ------------------------------
    def _evaluator(self) -> Evaluator:
        if self._evaluations is None:
            self._evaluations = Evaluator(self.gateway)
        return self._evaluations

    async def put_evaluation_set(
        self, principal: Principal, tenant: str, name: str, set_json: str
    ) -> EvaluationSetRef:
        """Validate the set strictly (INVALID_ARGUMENT with the reason), store it under its
        sha256 and make it the adapter's current set. Audited with its sha256."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        parsed = parse_set(set_json, self.settings)
        manifest = await self._store(
            principal,
            self.store.put_evaluation_set,
            tenant,
            name,
            parsed.canonical,
            cases=len(parsed.cases),
            uploaded_by=creator(principal),
        )
        current = manifest.evaluation_set
        assert current is not None
        await self._changed(
            principal, "PutEvaluationSet", manifest, detail=f"set sha256:{current.sha}"
        )
        return current

    async def evaluate(
        self,
        principal: Principal,
        tenant: str,
        name: str,
        version: str = "",
        set_sha: str = "",
    ) -> EvaluationResult:
        """Run the adapter's current set against `version` (a sha or an alias; "" = latest)
        on this gateway's engine, then append the result to the manifest and audit it.

        Refused: no evaluation set, or not the `set_sha` given (FAILED_PRECONDITION); the
        version has the most results kept already (RESOURCE_EXHAUSTED, before it runs);
        `evaluation_max_concurrent` evaluations running (RESOURCE_EXHAUSTED)."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        selector = version or "latest"
        ref = parse_ref(f"{name}@{selector}")
        manifest = await self._store(principal, self.store.get_manifest, tenant, name)
        target = manifest.resolve(ref)
        current = manifest.evaluation_set
        if current is None:
            raise errors.FailedPrecondition(
                f"adapter {name!r} has no evaluation set: upload one with PutEvaluationSet"
            )
        if set_sha and set_sha.removeprefix("sha256:") != current.sha:
            raise errors.FailedPrecondition(
                f"the current evaluation set of {name!r} is sha256:{current.sha}, not {set_sha}"
            )
        if len(manifest.evaluations.get(target.sha, ())) >= MAX_RESULTS_PER_VERSION:
            raise errors.ResourceExhausted(
                f"version {target.version_id} has {MAX_RESULTS_PER_VERSION} evaluations "
                "already, the most kept (results are never rewritten)"
            )
        result = await self._run_evaluation(principal, target, current, creator(principal))
        self._audit(principal, "EvaluateAdapter", tenant, name, target.version_id, _scored(result))
        return result

    async def _run_evaluation(
        self,
        principal: Principal,
        target: AdapterVersion,
        current: EvaluationSetRef,
        evaluated_by: str,
    ) -> EvaluationResult:
        """Read the set, run it against `target` as `principal` (its tenant's admission and
        limits, one of the evaluator's bounded slots), append the result to the manifest."""
        tenant, name = target.tenant, target.name
        data = await self._store(principal, self.store.evaluation_set, tenant, name, current.sha)
        evaluation_set = parse_set(data, self.settings)
        result = await self._evaluator().run(
            principal, target, evaluation_set, current.sha, evaluated_by
        )
        updated = await self._store(principal, self.store.add_evaluation, tenant, name, result)
        self.residency.remember(updated)
        return result

    async def get_evaluations(
        self, principal: Principal, tenant: str, name: str, version: str = ""
    ) -> tuple[Manifest, str | None]:
        """The manifest, for its evaluation set, results and alias policies, and the sha of
        `version` ("sha256:<hex>", also of a revoked version, or an alias; "" = every version)
        to list the results of. The owner tenant's callers and operators only: another
        tenant's adapter is NOT_FOUND."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        ref = parse_ref(f"{name}@{version}") if version else None
        manifest = await self._store(principal, self.store.get_manifest, tenant, name)
        if ref is None:
            return manifest, None
        sha = ref.version if ref.version is not None else manifest.aliases.get(ref.selector)
        if sha is None:
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        return manifest, sha

    async def set_alias_policy(
        self, principal: Principal, tenant: str, name: str, alias: str, min_score: float
    ) -> Manifest:
        """Every later move of `alias` needs an evaluation scoring >= `min_score` on the
        current set (0 removes the policy). Audited."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        manifest = await self._store(
            principal,
            self.store.set_alias_policy,
            tenant,
            name,
            alias,
            None if min_score == 0 else min_score,
        )
        detail = f"{alias}: min_score {min_score:g}" if min_score else f"{alias}: removed"
        return await self._changed(principal, "SetAliasPolicy", manifest, detail=detail)

    # --- automatic rollback (lora_gateway.rollback decides; adapter_store.rollback stores) -----
    async def set_rollback_policy(
        self,
        principal: Principal,
        tenant: str,
        name: str,
        alias: str,
        policy: RollbackPolicy | None,
    ) -> Manifest:
        """Store when `alias`'s canaries are rolled back to its stable version (None: remove
        the policy; the alias need not exist or be split yet). Other replicas take it from the
        manifest. Audited with the policy."""
        tenant = Policy.effective_tenant_for_adapter(principal, tenant)
        manifest = await self._store(
            principal, self.store.set_rollback_policy, tenant, name, alias, policy
        )
        detail = f"{alias}: " + (policy.describe() if policy is not None else "removed")
        return await self._changed(principal, "SetRollbackPolicy", manifest, detail=detail)

    def rollback_policy(self, **fields: object) -> RollbackPolicy:
        """A policy from request values (`RollbackPolicy.check`, with this gateway's floor on
        `eval_interval_s`); INVALID_ARGUMENT naming the field otherwise."""
        floor = self.settings.rollback_min_eval_interval_s
        return RollbackPolicy.check(min_eval_interval_s=floor, **fields)

    async def auto_rollback(
        self,
        tenant: str,
        name: str,
        alias: str,
        expected: Mapping[str, float],
        record: RollbackRecord,
    ) -> bool:
        """Write an automatic rollback (`Registry.rollback`: only if `alias` is still split as
        `expected`); this replica takes the manifest at once, others from the change feed.
        When this call made the move: counted (lora_gateway_rollbacks_total), audited with
        the policy's rule, the measured value and the threshold, and no principal (the gateway
        itself), and logged. Returns whether it made the move."""
        principal = gateway_principal(tenant)
        manifest, done = await self._store(
            principal, self.store.rollback, tenant, name, alias, dict(expected), record
        )
        await self.residency.apply_manifest(manifest)
        if not done:
            log.info(
                "automatic rollback of %s/%s@%s: the alias changed meanwhile (another replica "
                "moved it, or its tenant did); nothing written",
                tenant,
                name,
                alias,
            )
            return False
        if self.gateway.metrics is not None:
            self.gateway.metrics.rolled_back(tenant, name, record.reason)
        detail = (
            f"{alias}: {record.describe()}; all weight back to sha256:{record.stable[:12]}… "
            f"(stable), decided by replica {record.by}"
        )
        if self.audit is not None:
            self.audit.record(
                principal=None,
                rpc=AUTOMATIC_ROLLBACK_RPC,
                decision="allow",
                code="OK",
                tenant=tenant,
                adapter=name,
                version=f"sha256:{record.stable}",
                detail=detail,
            )
        log.warning("AUTOMATIC ROLLBACK of %s/%s@%s: %s", tenant, name, alias, detail)
        return True

    def evaluation_has_room(self, tenant: str) -> bool:
        """Would an evaluation for `tenant` start now (`evaluation_max_concurrent`)?"""
        return self._evaluator().has_room(tenant)

    async def scheduled_evaluation(
        self, tenant: str, name: str, sha: str, *, interval_s: float, by: str, min_score: float
    ) -> EvaluationResult | None:
        """A canary's scheduled evaluation: claim it in the manifest (`claim_evaluation`: one
        replica per interval), then run the current set exactly like EvaluateAdapter (the
        owner tenant's admission and limits, one of the bounded evaluation slots, one case at a
        time) and append the result; audited without a principal. None when not claimed."""
        principal = gateway_principal(tenant)
        manifest, taken = await self._store(
            principal,
            self.store.claim_evaluation,
            tenant,
            name,
            sha,
            interval_s=interval_s,
            by=by,
        )
        self.residency.remember(manifest)
        target = manifest.versions.get(sha)
        current = manifest.evaluation_set
        if not taken or target is None or target.status != "active" or current is None:
            return None
        metrics = self.gateway.metrics
        try:
            result = await self._run_evaluation(
                principal, target, current, f"gateway:{by} (scheduled)"
            )
        except Exception:
            if metrics is not None:
                metrics.scheduled_evaluation("error")
            raise
        if metrics is not None:
            metrics.scheduled_evaluation("pass" if result.score >= min_score else "fail")
        if self.audit is not None:
            self.audit.record(
                principal=None,
                rpc=SCHEDULED_EVALUATION_RPC,
                decision="allow",
                code="OK",
                tenant=tenant,
                adapter=name,
                version=target.version_id,
                detail=f"{_scored(result)}; rollback policy min_eval_score {min_score:g}",
            )
        return result


def _scored(result: EvaluationResult) -> str:
    """The audit detail of an evaluation."""
    failed = ",".join(case.id for case in result.failures[:8])
    return (
        f"set sha256:{result.set_sha} score {result.score:g} ({result.passed}/"
        f"{len(result.cases)})" + (f" failed {failed}" if failed else "")
    )


def gateway_principal(tenant: str) -> Principal:
    """Who the gateway acts as when it acts by itself for `tenant` (a scheduled evaluation, an
    automatic rollback): that tenant's admission and limits apply, and no key is involved
    (audit records of these actions name no principal at all)."""
    return Principal(tenant=tenant, role=Role.TENANT_ADMIN, key_id=GATEWAY_KEY_ID)


def _gated(required: float | None) -> str:
    """The audit detail of a gated alias move."""
    return "" if required is None else f" (required evaluation score >= {required:g})"


async def _next(stream: AsyncIterator[UploadMessage]) -> tuple[bool, UploadMessage]:
    try:
        return True, await anext(stream)
    except StopAsyncIteration:
        return False, None


def _token(tokens: PageTokens, rpc: str, scope: str, cursor: Cursor | None) -> str:
    return "" if cursor is None else tokens.issue(rpc, scope, cursor)
