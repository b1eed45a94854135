"""Admin service: protobuf ↔ domain translation only (parse → `adapters.Adapters` → to_pb).

Each RPC parses its request into domain values, calls the admin core with the caller's
principal, and turns the result into protobuf. The workflows, the store pool, residency
invalidation and the audit of each action live in `lora_gateway.adapters`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeAlias

import grpc

from adapter_store import AdapterVersion, FileEntry, Manifest
from adapter_store.evaluations import EvaluationResult, EvaluationSetRef
from adapter_store.rollback import RollbackPolicy
from lora_gateway import errors
from lora_gateway.adapters import (
    Adapters,
    TenantUsage,
    UploadChunk,
    UploadHeader,
    UploadMessage,
    sees_everything,
)
from lora_gateway.evaluation import results_of
from lora_gateway.interceptors import current_principal
from lora_gateway.metrics import VersionSummary
from lora_gateway.residency import ResidencyEntry
from lora_gateway.tenancy import Principal
from lora_gateway.v1 import admin_pb2 as pb
from lora_gateway.v1 import admin_pb2_grpc as pb_grpc

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_STATUS = {"active": pb.ADAPTER_STATUS_ACTIVE, "revoked": pb.ADAPTER_STATUS_REVOKED}
_TIER = {
    "engine": pb.RESIDENCY_TIER_ENGINE,
    "disk": pb.RESIDENCY_TIER_DISK,
    "store": pb.RESIDENCY_TIER_STORE,
}


# --- to_pb -------------------------------------------------------------------------------------
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
    info = pb.AdapterInfo(
        tenant=manifest.tenant,
        name=manifest.name,
        versions=[version_to_pb(v, full=full) for _, v in sorted(manifest.versions.items())],
        aliases={alias: f"sha256:{sha}" for alias, sha in manifest.aliases.items()},
        shared_with=sorted(manifest.shared_with) if full else [],
        status=_STATUS.get(manifest.status, pb.ADAPTER_STATUS_UNSPECIFIED),
        alias_weights={
            alias: weights_to_pb(weights) for alias, weights in manifest.alias_weights.items()
        },
        keep_last=manifest.keep_last or 0,
    )
    if full:
        add_rollbacks(info, manifest)
    return info


def add_rollbacks(info: pb.AdapterInfo, manifest: Manifest) -> None:
    """The automatic rollback's fields of an adapter: stable versions, policies, records."""
    info.alias_stable.update({a: f"sha256:{s}" for a, s in manifest.alias_stable.items()})
    for alias, policy in manifest.rollback_policies.items():
        info.rollback_policies[alias].CopyFrom(rollback_policy_to_pb(policy))
    for alias, record in manifest.rollbacks.items():
        info.rollbacks[alias].CopyFrom(
            pb.RollbackRecord(
                at=record.at,
                canary=f"sha256:{record.canary}",
                stable=f"sha256:{record.stable}",
                split={f"sha256:{sha}": w for sha, w in record.split.items()},
                reason=record.reason,
                value=record.value,
                threshold=record.threshold,
                requests=record.requests,
                replica=record.by,
            )
        )


def rollback_policy_to_pb(policy: RollbackPolicy) -> pb.RollbackPolicy:
    message = pb.RollbackPolicy(
        min_requests=policy.min_requests,
        window_s=policy.window_s,
        eval_interval_s=policy.eval_interval_s,
    )
    if policy.max_error_rate is not None:
        message.max_error_rate = policy.max_error_rate
    if policy.max_length_rate is not None:
        message.max_length_rate = policy.max_length_rate
    if policy.min_eval_score is not None:
        message.min_eval_score = policy.min_eval_score
    return message


def weights_to_pb(weights: Mapping[str, float]) -> pb.AliasWeights:
    return pb.AliasWeights(weights={f"sha256:{sha}": w for sha, w in weights.items()})


def adapter_to_pb(manifest: Manifest, principal: Principal) -> pb.AdapterInfo:
    """The owner and operators see everything; any other tenant only what it needs."""
    return manifest_to_pb(manifest, full=sees_everything(principal, manifest.tenant))


def serving_to_pb(summary: VersionSummary) -> pb.VersionServing:
    message = pb.VersionServing(
        version=summary.version,
        window_seconds=summary.window_seconds,
        requests=summary.requests,
        errors=summary.errors,
        error_codes=summary.error_codes,
        finish_reasons=summary.finish_reasons,
        completion_tokens=summary.completion_tokens,
    )
    if summary.latency_p50_seconds is not None:
        message.latency_p50_seconds = summary.latency_p50_seconds
    if summary.latency_p99_seconds is not None:
        message.latency_p99_seconds = summary.latency_p99_seconds
    if summary.ttft_p50_seconds is not None:
        message.ttft_p50_seconds = summary.ttft_p50_seconds
    return message


def usage_to_pb(usage: TenantUsage) -> pb.TenantUsage:
    return pb.TenantUsage(
        tenant=usage.tenant,
        stored_bytes=usage.stored_bytes,
        max_stored_bytes=usage.max_stored_bytes,
        adapters=usage.adapters,
        max_adapters=usage.max_adapters,
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


# --- from_pb -----------------------------------------------------------------------------------
def upload_message_from_pb(message: pb.UploadAdapterRequest) -> UploadMessage:
    kind = message.WhichOneof("msg")
    if kind == "header":
        header = message.header
        return UploadHeader(
            tenant=header.tenant,
            name=header.name,
            files=tuple(FileEntry(f.filename, f.size, f.sha256) for f in header.files),
            aliases=tuple(header.aliases),
            description=header.description,
        )
    if kind == "chunk":
        return UploadChunk(message.chunk.filename, message.chunk.data)
    return None


async def _upload_messages(
    requests: AsyncIterator[pb.UploadAdapterRequest],
) -> AsyncIterator[UploadMessage]:
    async for message in requests:
        yield upload_message_from_pb(message)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, adapters: Adapters) -> None:
        self.adapters = adapters

    async def UploadAdapter(
        self, request_iterator: AsyncIterator[pb.UploadAdapterRequest], context: Context
    ) -> pb.AdapterVersionInfo:
        messages = _upload_messages(request_iterator)
        return version_to_pb(await self.adapters.upload(current_principal(), messages))

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: Context
    ) -> pb.ListAdaptersResponse:
        principal = current_principal()
        page = await self.adapters.list_adapters(
            principal,
            request.tenant,
            include_shared=request.include_shared,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListAdaptersResponse(
            adapters=[adapter_to_pb(m, principal) for m in page.adapters],
            next_page_token=page.next_page_token,
            usage=None if page.usage is None else usage_to_pb(page.usage),
        )

    async def GetAdapter(self, request: pb.GetAdapterRequest, context: Context) -> pb.AdapterInfo:
        principal = current_principal()
        detail = await self.adapters.get_adapter(principal, request.tenant, request.name)
        info = adapter_to_pb(detail.manifest, principal)
        if detail.usage is not None:
            info.usage.CopyFrom(usage_to_pb(detail.usage))
        info.serving.extend(serving_to_pb(s) for s in detail.serving)
        return info

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.AdapterInfo:
        manifest = await self.adapters.set_alias(
            current_principal(),
            request.tenant,
            request.name,
            request.alias,
            request.version,
            request.expected_version or None,
            require_eval_min_score=_min_score(request),
        )
        return manifest_to_pb(manifest)

    async def SetAliasWeights(
        self, request: pb.SetAliasWeightsRequest, context: Context
    ) -> pb.AdapterInfo:
        manifest = await self.adapters.set_alias_weights(
            current_principal(),
            request.tenant,
            request.name,
            request.alias,
            dict(request.weights),
            dict(request.expected.weights) if request.HasField("expected") else None,
            require_eval_min_score=_min_score(request),
        )
        return manifest_to_pb(manifest)

    async def ShareAdapter(
        self, request: pb.ShareAdapterRequest, context: Context
    ) -> pb.AdapterInfo:
        manifest = await self.adapters.share(
            current_principal(), request.tenant, request.name, request.grantee
        )
        return manifest_to_pb(manifest)

    async def UnshareAdapter(
        self, request: pb.ShareAdapterRequest, context: Context
    ) -> pb.AdapterInfo:
        manifest = await self.adapters.unshare(
            current_principal(), request.tenant, request.name, request.grantee
        )
        return manifest_to_pb(manifest)

    async def ComposeAdapter(
        self, request: pb.ComposeAdapterRequest, context: Context
    ) -> pb.AdapterVersionInfo:
        version = await self.adapters.compose(
            current_principal(),
            request.tenant,
            request.name,
            [(p.adapter, p.weight) for p in request.parts],
            aliases=tuple(request.aliases),
            description=request.description,
        )
        return version_to_pb(version)

    async def RevokeAdapter(
        self, request: pb.RevokeAdapterRequest, context: Context
    ) -> pb.RevokeAdapterResponse:
        revoked = await self.adapters.revoke(
            current_principal(), request.tenant, request.name, request.version or None
        )
        return pb.RevokeAdapterResponse(
            revoked_versions=[f"sha256:{s}" for s in revoked.shas],
            aborted_requests=revoked.aborted,
        )

    async def SetRetention(
        self, request: pb.SetRetentionRequest, context: Context
    ) -> pb.SetRetentionResponse:
        if request.keep_all and request.keep_last:
            raise errors.InvalidArgument("retention: keep_all and keep_last exclude each other")
        done = await self.adapters.set_retention(
            current_principal(),
            request.tenant,
            request.name,
            None if request.keep_all else request.keep_last,
        )
        return pb.SetRetentionResponse(
            adapter=manifest_to_pb(done.manifest),
            retired_versions=[f"sha256:{s}" for s in done.retired],
            aborted_requests=done.aborted,
        )

    async def PinAdapter(
        self, request: pb.AdapterRefRequest, context: Context
    ) -> pb.ResidencyEntry:
        entry = await self.adapters.pin(current_principal(), request.tenant, request.adapter)
        return entry_to_pb(entry)

    async def UnpinAdapter(
        self, request: pb.AdapterRefRequest, context: Context
    ) -> pb.ResidencyEntry:
        entry = await self.adapters.unpin(current_principal(), request.tenant, request.adapter)
        return entry_to_pb(entry)

    async def PrefetchAdapter(
        self, request: pb.AdapterRefRequest, context: Context
    ) -> pb.ResidencyEntry:
        entry = await self.adapters.prefetch(current_principal(), request.tenant, request.adapter)
        return entry_to_pb(entry)

    async def GetResidency(
        self, request: pb.GetResidencyRequest, context: Context
    ) -> pb.GetResidencyResponse:
        page = await self.adapters.get_residency(
            current_principal(),
            request.tenant,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.GetResidencyResponse(
            entries=[entry_to_pb(e) for e in page.entries],
            engine_capacity=page.engine_capacity,
            disk_budget_bytes=page.disk_budget_bytes,
            disk_used_bytes=page.disk_used_bytes,
            next_page_token=page.next_page_token,
        )

    # --- evaluations and gated promotion --------------------------------------------------------
    async def PutEvaluationSet(
        self, request: pb.PutEvaluationSetRequest, context: Context
    ) -> pb.EvaluationSetInfo:
        ref = await self.adapters.put_evaluation_set(
            current_principal(), request.tenant, request.name, request.set_json
        )
        return evaluation_set_to_pb(ref)

    async def EvaluateAdapter(
        self, request: pb.EvaluateAdapterRequest, context: Context
    ) -> pb.EvaluationResult:
        result = await self.adapters.evaluate(
            current_principal(), request.tenant, request.name, request.version, request.set_sha256
        )
        return evaluation_to_pb(result)

    async def GetEvaluations(
        self, request: pb.GetEvaluationsRequest, context: Context
    ) -> pb.EvaluationsInfo:
        manifest, sha = await self.adapters.get_evaluations(
            current_principal(), request.tenant, request.name, request.version
        )
        return evaluations_to_pb(manifest, sha)

    async def SetAliasPolicy(
        self, request: pb.SetAliasPolicyRequest, context: Context
    ) -> pb.EvaluationsInfo:
        manifest = await self.adapters.set_alias_policy(
            current_principal(),
            request.tenant,
            request.name,
            request.alias,
            request.require_eval_min_score,
        )
        return evaluations_to_pb(manifest, None)

    # --- automatic rollback ---------------------------------------------------------------------
    async def SetRollbackPolicy(
        self, request: pb.SetRollbackPolicyRequest, context: Context
    ) -> pb.AdapterInfo:
        if request.remove == request.HasField("policy"):
            raise errors.InvalidArgument(
                "rollback policy: give a policy, or remove (one of them, not both)"
            )
        policy = None if request.remove else self.rollback_policy_from_pb(request.policy)
        manifest = await self.adapters.set_rollback_policy(
            current_principal(), request.tenant, request.name, request.alias, policy
        )
        return manifest_to_pb(manifest)

    def rollback_policy_from_pb(self, message: pb.RollbackPolicy) -> RollbackPolicy:
        def optional(field: str) -> float | None:
            return float(getattr(message, field)) if message.HasField(field) else None  # type: ignore[arg-type]

        return self.adapters.rollback_policy(
            max_error_rate=optional("max_error_rate"),
            max_length_rate=optional("max_length_rate"),
            min_requests=message.min_requests,
            window_s=message.window_s,
            min_eval_score=optional("min_eval_score"),
            eval_interval_s=message.eval_interval_s,
        )


def evaluation_set_to_pb(ref: EvaluationSetRef) -> pb.EvaluationSetInfo:
    return pb.EvaluationSetInfo(
        sha256=ref.sha, cases=ref.cases, uploaded_at=ref.uploaded_at, uploaded_by=ref.uploaded_by
    )


def evaluation_to_pb(result: EvaluationResult) -> pb.EvaluationResult:
    return pb.EvaluationResult(
        version=f"sha256:{result.version}",
        set_sha256=result.set_sha,
        score=result.score,
        passed=result.passed,
        total=len(result.cases),
        cases=[
            pb.EvaluationCaseResult(id=c.id, passed=c.passed, reason=c.reason) for c in result.cases
        ],
        engine=result.engine,
        base_model=result.base_model,
        started_at=result.started_at,
        finished_at=result.finished_at,
        evaluated_by=result.evaluated_by,
    )


def evaluations_to_pb(manifest: Manifest, version: str | None) -> pb.EvaluationsInfo:
    info = pb.EvaluationsInfo(
        results=[evaluation_to_pb(r) for r in results_of(manifest.evaluations, version)],
        alias_policies={
            alias: pb.AliasPolicy(min_score=policy.min_score)
            for alias, policy in manifest.alias_policies.items()
        },
    )
    if manifest.evaluation_set is not None:
        info.current_set.CopyFrom(evaluation_set_to_pb(manifest.evaluation_set))
    return info


def _min_score(request: pb.SetAliasRequest | pb.SetAliasWeightsRequest) -> float | None:
    """The request's `require_eval_min_score`, None when it is not set."""
    if request.HasField("require_eval_min_score"):
        return request.require_eval_min_score
    return None
