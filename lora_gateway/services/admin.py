"""Admin service: protobuf ↔ domain translation; the store runs in threads (never on the loop).

Store I/O of every Admin RPC runs in the service's own bounded pool (`admin_store_threads`),
apart from asyncio's default executor (cold loads, revocation) and residency's manifest pool,
and one tenant holds at most half of its threads at once. Listings are paged (`paging`): a page
costs one store listing and at most `page_size` manifest reads, and what is shared with a tenant
comes from its share index, never from a scan of the bucket. A tenant other than an adapter's
owner sees only what it needs of it (`adapter_to_pb`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias, TypeVar

import grpc

from adapter_store import AdapterRef, AdapterVersion, FileEntry, InvalidAdapter, Manifest, Upload
from adapter_store.errors import QuotaExceeded, SpoolFull
from adapter_store.quota import Quota, Usage
from lora_gateway import errors, paging
from lora_gateway.audit import AuditLog
from lora_gateway.gateway import Gateway
from lora_gateway.interceptors import current_principal
from lora_gateway.paging import Cursor, PageTokens
from lora_gateway.residency import ResidencyEntry
from lora_gateway.tenancy import KeyRing, Policy, Principal, Role, TenantConfig
from lora_gateway.v1 import admin_pb2 as pb
from lora_gateway.v1 import admin_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_STATUS = {"active": pb.ADAPTER_STATUS_ACTIVE, "revoked": pb.ADAPTER_STATUS_REVOKED}
_TIER = {
    "engine": pb.RESIDENCY_TIER_ENGINE,
    "disk": pb.RESIDENCY_TIER_DISK,
    "store": pb.RESIDENCY_TIER_STORE,
}


def version_to_pb(version: AdapterVersion, *, full: bool = True) -> pb.AdapterVersionInfo:
    """A version as its owner and operators see it (`full`), or as a grantee does: what it
    needs to use it, without who made it, the owner's description or the parts it came from."""
    info = pb.AdapterVersionInfo(
        tenant=version.tenant,
        name=version.name,
        version=version.version_id,
        files=[
            pb.FileInfo(filename=f.filename, size=f.size, sha256=f.sha256) for f in version.files
        ],
        rank=version.rank,
        alpha=version.alpha,
        target_modules=list(version.target_modules),
        base_model=version.base_model,
        dtype=version.dtype,
        created_at=version.created_at,
        status=_STATUS.get(version.status, pb.ADAPTER_STATUS_UNSPECIFIED),
        use_rslora=version.use_rslora,
    )
    if full:
        info.created_by = version.created_by
        info.description = version.description
        info.composed_from.extend(
            pb.ComposePart(adapter=ref, weight=w) for ref, w in version.composed_from
        )
    return info


def manifest_to_pb(manifest: Manifest, *, full: bool = True) -> pb.AdapterInfo:
    """An adapter with everything (`full`), or a grantee's view: name, versions, aliases."""
    return pb.AdapterInfo(
        tenant=manifest.tenant,
        name=manifest.name,
        versions=[version_to_pb(v, full=full) for _, v in sorted(manifest.versions.items())],
        aliases={alias: f"sha256:{sha}" for alias, sha in manifest.aliases.items()},
        shared_with=sorted(manifest.shared_with) if full else [],
        status=_STATUS.get(manifest.status, pb.ADAPTER_STATUS_UNSPECIFIED),
    )


def adapter_to_pb(manifest: Manifest, principal: Principal) -> pb.AdapterInfo:
    """The owner and operators see everything; any other tenant only what it needs."""
    owner = principal.tenant == manifest.tenant or principal.role is Role.OPERATOR
    return manifest_to_pb(manifest, full=owner)


def usage_to_pb(usage: Usage, tenant: TenantConfig) -> pb.TenantUsage:
    return pb.TenantUsage(
        tenant=usage.tenant,
        stored_bytes=usage.stored_bytes,
        max_stored_bytes=tenant.max_stored_bytes,
        adapters=usage.adapters,
        max_adapters=tenant.max_adapters,
    )


def quota_of(tenant: TenantConfig) -> Quota:
    """The storage quota of a tenant (tenants file: max_stored_bytes, max_adapters)."""
    return Quota(max_stored_bytes=tenant.max_stored_bytes, max_adapters=tenant.max_adapters)


def entry_to_pb(entry: ResidencyEntry) -> pb.ResidencyEntry:
    return pb.ResidencyEntry(
        tenant=entry.version.tenant,
        name=entry.version.name,
        version=entry.version.version_id,
        tier=_TIER[entry.tier],
        pinned=entry.pinned,
        lora_int_id=entry.lora_int_id,
        size_bytes=entry.version.total_bytes,
    )


def parse_ref(text: str) -> AdapterRef:
    try:
        return AdapterRef.parse(text)
    except InvalidAdapter as exc:
        raise errors.InvalidArgument(f"adapter reference: {exc}") from None


def creator(principal: Principal) -> str:
    return f"{principal.tenant}:{principal.key_id}"


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, gateway: Gateway, audit: AuditLog | None) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self.residency = gateway.residency
        self.audit = audit
        threads = gateway.settings.admin_store_threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="admin-store")
        self._slots = asyncio.Semaphore(threads)
        self._per_tenant = max(1, threads // 2)
        self._tenant_slots: dict[str, asyncio.Semaphore] = {}
        self._tokens: tuple[KeyRing, PageTokens] | None = None

    async def _store(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking store I/O in the admin pool: a tenant's calls wait for one of its own
        slots (half the pool), then for a thread; waiting never occupies a thread, and a call
        cancelled while it waits never runs."""
        tenant = current_principal().tenant
        mine = self._tenant_slots.get(tenant)
        if mine is None:
            mine = self._tenant_slots[tenant] = asyncio.Semaphore(self._per_tenant)
        async with mine, self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def _page_tokens(self) -> PageTokens:
        keyring = self.gateway.keyring.current
        if self._tokens is None or self._tokens[0] is not keyring:
            self._tokens = (keyring, PageTokens(keyring.derive_key("admin page tokens v1")))
        return self._tokens[1]

    def _allow(self, rpc: str, tenant: str, name: str = "", version: str = "") -> None:
        if self.audit is not None:
            self.audit.record(
                principal=current_principal(),
                rpc=rpc,
                tenant=tenant,
                adapter=name,
                version=version,
                decision="allow",
                code="OK",
            )

    def _tenant(self, requested: str) -> str:
        return Policy.effective_tenant_for_adapter(current_principal(), requested)

    def _quota(self, tenant: str) -> Quota:
        return quota_of(self.gateway.keyring.tenant(tenant))

    def _refused(self, exc: BaseException) -> None:
        """Count a refusal by the spool budget or a storage quota (metrics)."""
        metrics = self.gateway.metrics
        if metrics is not None and isinstance(exc, SpoolFull | QuotaExceeded):
            metrics.refused("spool" if isinstance(exc, SpoolFull) else "quota")

    async def _usage(self, tenant: str) -> pb.TenantUsage | None:
        """The tenant's storage usage, for callers of that tenant and operators only."""
        principal = current_principal()
        if tenant != principal.tenant and principal.role is not Role.OPERATOR:
            return None
        usage = await self._store(self.store.usage, tenant)
        return usage_to_pb(usage, self.gateway.keyring.tenant(tenant))

    # --- upload -------------------------------------------------------------------------------
    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context: Context
    ) -> pb.AdapterVersionInfo:
        timeout = self.gateway.settings.upload_timeout_s
        try:
            async with asyncio.timeout(timeout):
                version = await self._upload(request_iterator)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"upload did not finish within {timeout:g}s") from None
        self._allow("UploadAdapter", version.tenant, version.name, version.version_id)
        if self.gateway.settings.prefetch_on_upload:
            principal = current_principal()
            limits = (
                None
                if principal.role is Role.OPERATOR
                else self.gateway.keyring.tenant(principal.tenant)
            )
            await self.residency.prefetch(version, limits)
        return version_to_pb(version)

    async def _next_message(
        self, stream: AsyncIterator[pb.UploadAdapterRequest], started: float, received: int
    ) -> pb.UploadAdapterRequest | None:
        """The next message, or None at the end; DeadlineExceeded if the stream is too slow.

        After `upload_rate_grace_s`, the stream must have delivered `upload_min_rate_bytes_s`
        per second on average: the wait for the next message ends when the bytes received so
        far stop being enough, so a stream that drips or goes silent is closed at once.
        """
        settings = self.gateway.settings
        rate = settings.upload_min_rate_bytes_s
        if rate <= 0:
            return await anext(stream, None)
        loop = asyncio.get_running_loop()
        allowed_until = started + settings.upload_rate_grace_s + received / rate
        try:
            async with asyncio.timeout_at(allowed_until):
                return await anext(stream, None)
        except TimeoutError:
            elapsed = loop.time() - started
            raise errors.DeadlineExceeded(
                f"upload too slow: {received} bytes in {elapsed:.1f}s, below the minimum of "
                f"{rate} bytes/s after {settings.upload_rate_grace_s:g}s"
            ) from None

    async def _upload(self, requests: AsyncIterator[pb.UploadAdapterRequest]) -> AdapterVersion:
        principal = current_principal()
        started = asyncio.get_running_loop().time()
        received = 0
        stream = aiter(requests)
        first = await self._next_message(stream, started, received)
        if first is None or first.WhichOneof("msg") != "header":
            raise errors.InvalidArgument("the first UploadAdapter message must be the header")
        header = first.header
        tenant = self._tenant(header.tenant)
        declared = [FileEntry(f.filename, f.size, f.sha256) for f in header.files]
        # Decided from the header, before any byte is spooled: the caller's tenant's cap on
        # uploads in progress, the owner's quota, the spool budget (begin_upload).
        with self.gateway.admission.upload(
            principal, self.gateway.keyring.tenant(principal.tenant)
        ):
            try:
                upload: Upload = await self._store(
                    self.store.begin_upload,
                    tenant,
                    header.name,
                    declared,
                    created_by=creator(principal),
                    aliases=tuple(header.aliases),
                    description=header.description,
                    quota=self._quota(tenant),
                )
            except (SpoolFull, QuotaExceeded) as exc:
                self._refused(exc)
                raise
            try:
                while (message := await self._next_message(stream, started, received)) is not None:
                    if message.WhichOneof("msg") != "chunk":
                        raise errors.InvalidArgument("only one header per upload")
                    await self._store(upload.write, message.chunk.filename, message.chunk.data)
                    received += len(message.chunk.data)
                version = await self._store(upload.commit)
            except BaseException as exc:
                self._refused(exc)
                await asyncio.shield(self._store(upload.abort))
                raise
        self.residency.forget(tenant, header.name)
        return version

    # --- reads --------------------------------------------------------------------------------
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        """The tenant's own adapters, then (include_shared) those shared with it, paged."""
        principal = current_principal()
        tenant = Policy.effective_tenant_for_listing(principal, request.tenant)
        limit = paging.page_size(request.page_size)
        scope = f"{tenant}/{int(request.include_shared)}"
        tokens = self._page_tokens()
        cursor = tokens.parse(request.page_token, "ListAdapters", scope) or Cursor("own")
        if cursor.phase == "own":
            page = await self._store(
                self.store.adapter_page, tenant, after=cursor.after, limit=limit
            )
            if page.next_after is not None:
                following: Cursor | None = Cursor("own", page.next_after)
            else:
                following = Cursor("shared") if request.include_shared else None
        elif cursor.phase == "shared" and request.include_shared:
            page = await self._store(
                self.store.shared_page, tenant, after=cursor.after, limit=limit
            )
            following = None if page.next_after is None else Cursor("shared", page.next_after)
        else:
            raise errors.InvalidArgument(paging.INVALID_TOKEN_TEXT)
        return pb.ListAdaptersResponse(
            adapters=[adapter_to_pb(m, principal) for m in page.items],
            next_page_token=_token(tokens, "ListAdapters", scope, following),
            usage=await self._usage(tenant),
        )

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: Context) -> pb.AdapterInfo:
        tenant = self._tenant(request.tenant)
        manifest = await self._store(self.store.get_manifest, tenant, request.name)
        info = adapter_to_pb(manifest, current_principal())
        usage = await self._usage(tenant)
        if usage is not None:
            info.usage.CopyFrom(usage)
        return info

    # --- writes -------------------------------------------------------------------------------
    async def _changed(self, rpc: str, manifest: Manifest, version: str = "") -> pb.AdapterInfo:
        await self.residency.apply_manifest(manifest)
        self._allow(rpc, manifest.tenant, manifest.name, version)
        return manifest_to_pb(manifest)

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.AdapterInfo:
        tenant = self._tenant(request.tenant)
        manifest = await self._store(
            self.store.set_alias,
            tenant,
            request.name,
            request.alias,
            request.version,
            request.expected_version or None,
        )
        return await self._changed("SetAlias", manifest, request.version)

    async def ShareAdapter(
        self, request: pb.ShareAdapterRequest, context: Context
    ) -> pb.AdapterInfo:
        tenant = self._tenant(request.tenant)
        manifest = await self._store(self.store.share, tenant, request.name, request.grantee)
        self.residency.forget_shares(request.grantee)
        return await self._changed("ShareAdapter", manifest)

    async def UnshareAdapter(
        self, request: pb.ShareAdapterRequest, context: Context
    ) -> pb.AdapterInfo:
        tenant = self._tenant(request.tenant)
        manifest = await self._store(self.store.unshare, tenant, request.name, request.grantee)
        self.residency.forget_shares(request.grantee)
        return await self._changed("UnshareAdapter", manifest)

    async def ComposeAdapter(
        self, request: pb.ComposeAdapterRequest, context: Context
    ) -> pb.AdapterVersionInfo:
        principal = current_principal()
        tenant = self._tenant(request.tenant)
        if not request.parts:
            raise errors.InvalidArgument("compose needs at least one part")
        parts = [(parse_ref(p.adapter), float(p.weight)) for p in request.parts]
        with self.gateway.admission.upload(
            principal, self.gateway.keyring.tenant(principal.tenant)
        ):
            try:
                version = await self._store(
                    self.store.compose,
                    tenant,
                    request.name,
                    parts,
                    created_by=creator(principal),
                    aliases=tuple(request.aliases),
                    description=request.description,
                    quota=self._quota(tenant),
                )
            except BaseException as exc:
                self._refused(exc)
                raise
        self.residency.forget(tenant, request.name)
        self._allow("ComposeAdapter", tenant, request.name, version.version_id)
        return version_to_pb(version)

    async def RevokeAdapter(
        self, request: pb.RevokeAdapterRequest, context: Context
    ) -> pb.RevokeAdapterResponse:
        tenant = self._tenant(request.tenant)
        shas, aborted = await self.gateway.revoke(tenant, request.name, request.version or None)
        self._allow("RevokeAdapter", tenant, request.name, ",".join(shas))
        return pb.RevokeAdapterResponse(
            revoked_versions=[f"sha256:{s}" for s in shas], aborted_requests=aborted
        )

    # --- residency ----------------------------------------------------------------------------
    async def _owned_version(
        self, request: pb.AdapterRefRequest
    ) -> tuple[AdapterVersion, TenantConfig | None]:
        """The version a pin, unpin or prefetch acts on, and the limits that apply to it.

        Only the owner tenant (or an operator) may change where its adapter lives: a grantee
        can use a shared adapter but not pin it. Naming another tenant's adapter is answered
        like a missing one, before any lookup (nothing tells whether it exists or is shared).
        Operators act without the tenant's caps (None), as for the configured warm set.
        """
        principal = current_principal()
        tenant = self._tenant(request.tenant)
        ref = parse_ref(request.adapter)
        operator = principal.role is Role.OPERATOR
        if not operator and ref.owner not in (None, tenant):
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        version = await self.residency.resolve(tenant, ref, any_owner=operator)
        if not operator and version.tenant != principal.tenant:
            raise errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        return version, None if operator else self.gateway.keyring.tenant(principal.tenant)

    async def PinAdapter(
        self, request: pb.AdapterRefRequest, context: Context
    ) -> pb.ResidencyEntry:
        version, limits = await self._owned_version(request)
        entry = await self.residency.pin(version, limits)
        self._allow("PinAdapter", version.tenant, version.name, version.version_id)
        return entry_to_pb(entry)

    async def UnpinAdapter(
        self, request: pb.AdapterRefRequest, context: Context
    ) -> pb.ResidencyEntry:
        version, _ = await self._owned_version(request)
        entry = await self.residency.unpin(version)
        self._allow("UnpinAdapter", version.tenant, version.name, version.version_id)
        return entry_to_pb(entry)

    async def PrefetchAdapter(
        self, request: pb.AdapterRefRequest, context: Context
    ) -> pb.ResidencyEntry:
        version, limits = await self._owned_version(request)
        entry = await self.residency.prefetch(version, limits)
        self._allow("PrefetchAdapter", version.tenant, version.name, version.version_id)
        return entry_to_pb(entry)

    async def GetResidency(
        self, request: pb.GetResidencyRequest, context: Context
    ) -> pb.GetResidencyResponse:
        """Where each live version of the tenant's adapters is, paged by adapter."""
        principal = current_principal()
        if request.tenant == "*":
            if principal.role is not Role.OPERATOR:
                raise errors.PermissionDenied("permission denied")
            scope = "*"
        else:
            scope = Policy.effective_tenant_for_listing(principal, request.tenant)
        limit = paging.page_size(request.page_size)
        tokens = self._page_tokens()
        cursor = tokens.parse(request.page_token, "GetResidency", scope)
        if scope == "*":
            manifests, following = await self._every_tenant(cursor or Cursor("next:"), limit)
        else:
            page = await self._store(
                self.store.adapter_page, scope, after=cursor.after if cursor else "", limit=limit
            )
            manifests = page.items
            following = None if page.next_after is None else Cursor("", page.next_after)
        cache = self.residency.cache
        return pb.GetResidencyResponse(
            entries=[
                entry_to_pb(self.residency.entry(version))
                for manifest in manifests
                for _, version in sorted(manifest.versions.items())
            ],
            engine_capacity=self.residency.capacity,
            disk_budget_bytes=cache.budget_bytes,
            disk_used_bytes=cache.used_bytes,
            next_page_token=_token(tokens, "GetResidency", scope, following),
        )

    async def _every_tenant(
        self, cursor: Cursor, limit: int
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
                tenants = await self._store(self.store.tenant_page, after=position, limit=1)
                budget -= 1
                if not tenants.items:
                    if tenants.next_after is None:
                        return manifests, None
                    position = tenants.next_after  # a key outside the layout: skip it
                    continue
                tenant, after, position = tenants.items[0], "", f"{tenants.items[0]}/"
                continue
            page = await self._store(self.store.adapter_page, tenant, after=after, limit=budget)
            budget -= max(1, page.examined)
            manifests.extend(page.items)
            if page.next_after is None:
                tenant, after = None, ""
            else:
                after = page.next_after
        if tenant is None:
            return manifests, Cursor(f"next:{position}")
        return manifests, Cursor(f"in:{position}", after)


def _token(tokens: PageTokens, rpc: str, scope: str, cursor: Cursor | None) -> str:
    return "" if cursor is None else tokens.issue(rpc, scope, cursor)
