"""Admin service: protobuf ↔ domain translation; the store runs in threads (never on the loop)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from adapter_store import AdapterRef, AdapterVersion, FileEntry, InvalidAdapter, Manifest, Upload
from lora_gateway import errors
from lora_gateway.audit import AuditLog
from lora_gateway.gateway import Gateway
from lora_gateway.interceptors import current_principal
from lora_gateway.residency import ResidencyEntry
from lora_gateway.tenancy import Policy, Principal, Role, TenantConfig
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


def version_to_pb(version: AdapterVersion) -> pb.AdapterVersionInfo:
    return pb.AdapterVersionInfo(
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
        created_by=version.created_by,
        status=_STATUS.get(version.status, pb.ADAPTER_STATUS_UNSPECIFIED),
        use_rslora=version.use_rslora,
        description=version.description,
        composed_from=[pb.ComposePart(adapter=ref, weight=w) for ref, w in version.composed_from],
    )


def manifest_to_pb(manifest: Manifest) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        tenant=manifest.tenant,
        name=manifest.name,
        versions=[version_to_pb(v) for _, v in sorted(manifest.versions.items())],
        aliases={alias: f"sha256:{sha}" for alias, sha in manifest.aliases.items()},
        shared_with=sorted(manifest.shared_with),
        status=_STATUS.get(manifest.status, pb.ADAPTER_STATUS_UNSPECIFIED),
    )


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

    async def _store(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

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
        upload: Upload = await self._store(
            self.store.begin_upload,
            tenant,
            header.name,
            declared,
            created_by=creator(principal),
            aliases=tuple(header.aliases),
            description=header.description,
        )
        try:
            while (message := await self._next_message(stream, started, received)) is not None:
                if message.WhichOneof("msg") != "chunk":
                    raise errors.InvalidArgument("only one header per upload")
                await self._store(upload.write, message.chunk.filename, message.chunk.data)
                received += len(message.chunk.data)
            version = await self._store(upload.commit)
        except BaseException:
            await asyncio.shield(self._store(upload.abort))
            raise
        self.residency.forget(tenant, header.name)
        return version

    # --- reads --------------------------------------------------------------------------------
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        principal = current_principal()
        tenant = Policy.effective_tenant_for_listing(principal, request.tenant)
        manifests = await self._store(self.store.list_adapters, tenant)
        if request.include_shared:
            manifests += await self._store(self.store.list_shared_with, tenant)
        return pb.ListAdaptersResponse(adapters=[manifest_to_pb(m) for m in manifests])

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: Context) -> pb.AdapterInfo:
        tenant = self._tenant(request.tenant)
        return manifest_to_pb(await self._store(self.store.get_manifest, tenant, request.name))

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
        return await self._changed("ShareAdapter", manifest)

    async def UnshareAdapter(
        self, request: pb.ShareAdapterRequest, context: Context
    ) -> pb.AdapterInfo:
        tenant = self._tenant(request.tenant)
        manifest = await self._store(self.store.unshare, tenant, request.name, request.grantee)
        return await self._changed("UnshareAdapter", manifest)

    async def ComposeAdapter(
        self, request: pb.ComposeAdapterRequest, context: Context
    ) -> pb.AdapterVersionInfo:
        principal = current_principal()
        tenant = self._tenant(request.tenant)
        if not request.parts:
            raise errors.InvalidArgument("compose needs at least one part")
        parts = [(parse_ref(p.adapter), float(p.weight)) for p in request.parts]
        version = await self._store(
            self.store.compose,
            tenant,
            request.name,
            parts,
            created_by=creator(principal),
            aliases=tuple(request.aliases),
            description=request.description,
        )
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
        principal = current_principal()
        if request.tenant == "*":
            if principal.role is not Role.OPERATOR:
                raise errors.PermissionDenied("permission denied")
            tenants = await self._store(self.store.list_tenants)
        else:
            tenants = [Policy.effective_tenant_for_listing(principal, request.tenant)]
        entries: list[pb.ResidencyEntry] = []
        for tenant in tenants:
            for manifest in await self._store(self.store.list_adapters, tenant):
                for _, version in sorted(manifest.versions.items()):
                    entries.append(entry_to_pb(self.residency.entry(version)))
        cache = self.residency.cache
        return pb.GetResidencyResponse(
            entries=entries,
            engine_capacity=self.residency.capacity,
            disk_budget_bytes=cache.budget_bytes,
            disk_used_bytes=cache.used_bytes,
        )
