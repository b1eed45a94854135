"""Protobuf <-> the SDK's types, in one place: requests from arguments and `GenerateOptions`,
results (`results.py`) from answers. Nothing past this module sees a protobuf message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

from google.protobuf.message import Message

from lora_gateway import errors
from lora_gateway.client.options import (
    CONSTRAINT_KINDS,
    ChatMessage,
    GenerateOptions,
    Prompt,
    option_specs,
)
from lora_gateway.client.results import (
    Adapter,
    AdapterFile,
    AdapterPage,
    AdapterStatus,
    AdapterVersion,
    ComposePart,
    Evaluation,
    EvaluationCase,
    Evaluations,
    EvaluationSetInfo,
    GenerateResult,
    Residency,
    ResidencyEntry,
    ResidencyTier,
    RetentionResult,
    RevokeResult,
    Rollback,
    RollbackPolicy,
    ServedAdapter,
    StreamDelta,
    TenantUsage,
    TokenizeResult,
    TokenLogprob,
    TopLogprob,
    VersionServing,
)
from lora_gateway.v1 import admin_pb2, inference_pb2

_M = TypeVar("_M", bound=Message)

_FINISH_REASONS: Final = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}
_STATUS: Final = {
    admin_pb2.ADAPTER_STATUS_ACTIVE: AdapterStatus.ACTIVE,
    admin_pb2.ADAPTER_STATUS_REVOKED: AdapterStatus.REVOKED,
}
_TIER: Final = {
    admin_pb2.RESIDENCY_TIER_ENGINE: ResidencyTier.ENGINE,
    admin_pb2.RESIDENCY_TIER_DISK: ResidencyTier.DISK,
    admin_pb2.RESIDENCY_TIER_STORE: ResidencyTier.STORE,
}
_SAMPLING_FIELDS: Final = frozenset(inference_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
#: Options that go into `SamplingParams.constraint` (the output constraint).
_CONSTRAINT_FIELDS: Final = frozenset(inference_pb2.OutputConstraint.DESCRIPTOR.fields_by_name)


# --- requests ---------------------------------------------------------------------------------


def message(cls: type[_M], **fields: Any) -> _M:
    """`cls(**fields)`; a value of the wrong type is the caller's InvalidArgument."""
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"invalid {cls.__name__}: {exc}") from None


def names(values: Sequence[str]) -> list[str]:
    """A list of names; a single string is one name, not its characters."""
    return [values] if isinstance(values, str) else list(values)


def sampling_params(options: GenerateOptions) -> inference_pb2.SamplingParams:
    """Every option, by name, into `SamplingParams`; None stays unset (the server's default)."""
    sampling = inference_pb2.SamplingParams()
    constrained = any(getattr(options, k) not in (None, (), False) for k in CONSTRAINT_KINDS)
    for spec in option_specs():
        value = getattr(options, spec.name)
        if value is None:
            continue
        if spec.name in _CONSTRAINT_FIELDS:
            if not constrained or value in ((), False):
                continue
            if spec.name == "choice":
                sampling.constraint.choice.choices.extend(value)
            else:
                setattr(sampling.constraint, spec.name, value)
            continue
        if spec.name not in _SAMPLING_FIELDS:
            raise TypeError(f"option {spec.name!r} has no field in the request")
        if spec.repeated:
            getattr(sampling, spec.name).extend(value)
        else:
            setattr(sampling, spec.name, value)
    return sampling


def messages_pb(prompt: Sequence[ChatMessage]) -> inference_pb2.Messages:
    """A conversation; items may also be {"role": ..., "content": ...} mappings."""
    messages = inference_pb2.Messages()
    for index, item in enumerate(prompt):
        if isinstance(item, ChatMessage):
            role, content = item.role, item.content
        elif isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
        else:
            raise errors.InvalidArgument(f"messages[{index}]: a ChatMessage or a role/content dict")
        if not isinstance(role, str) or not isinstance(content, str):
            raise errors.InvalidArgument(f"messages[{index}]: role and content are strings")
        messages.messages.add(role=role, content=content)
    return messages


def generate_request(
    adapter: str,
    prompt: Prompt | None,
    token_ids: Sequence[int] | None,
    options: GenerateOptions | None,
    request_id: str,
    routing_key: str = "",
) -> inference_pb2.GenerateRequest:
    if (prompt is None) == (token_ids is None):
        raise errors.InvalidArgument("give exactly one of prompt or token_ids")
    if options is None:
        options = GenerateOptions()
    elif not isinstance(options, GenerateOptions):
        raise errors.InvalidArgument("options must be a GenerateOptions")
    request = message(
        inference_pb2.GenerateRequest,
        adapter=adapter,
        sampling=sampling_params(options),
        request_id=request_id,
        routing_key=routing_key,
    )
    try:
        if isinstance(prompt, str):
            request.text = prompt
        elif prompt is not None:
            request.messages.CopyFrom(messages_pb(prompt))
        else:
            request.token_ids.ids.extend(token_ids or ())
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"invalid prompt: {exc}") from None
    return request


def tokenize_request(
    adapter: str, prompt: Prompt, routing_key: str = ""
) -> inference_pb2.TokenizeRequest:
    request = message(inference_pb2.TokenizeRequest, adapter=adapter, routing_key=routing_key)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.messages.CopyFrom(messages_pb(prompt))
    return request


def compose_parts(parts: Sequence[tuple[str, float]]) -> list[admin_pb2.ComposePart]:
    if not parts:
        raise errors.InvalidArgument("compose needs at least one part")
    try:
        return [admin_pb2.ComposePart(adapter=ref, weight=float(w)) for ref, w in parts]
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"invalid compose part: {exc}") from None


# --- inference results ------------------------------------------------------------------------


def _served(adapter: inference_pb2.ServedAdapter) -> ServedAdapter | None:
    if not adapter.name:
        return None
    return ServedAdapter(tenant=adapter.tenant, name=adapter.name, version=adapter.version)


def generate_result(response: inference_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_FINISH_REASONS.get(response.finish_reason, ""),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        adapter=_served(response.adapter),
        request_id=response.request_id,
        logprobs=_logprobs(response.logprobs),
        prompt_logprobs=_logprobs(response.prompt_logprobs),
    )


def _logprobs(entries: Sequence[inference_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob if e.HasField("logprob") else None,
            token=e.token,
            top=tuple(TopLogprob(t.token_id, t.logprob, t.token) for t in e.top),
        )
        for e in entries
    )


def tokenize_result(response: inference_pb2.TokenizeResponse) -> TokenizeResult:
    return TokenizeResult(
        token_ids=list(response.token_ids),
        count=response.count,
        rendered=response.rendered,
        max_model_len=response.max_model_len,
    )


def stream_delta(response: inference_pb2.GenerateStreamResponse) -> StreamDelta:
    has_usage = response.HasField("usage")
    return StreamDelta(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_FINISH_REASONS.get(response.finish_reason),
        prompt_tokens=response.usage.prompt_tokens if has_usage else None,
        completion_tokens=response.usage.completion_tokens if has_usage else None,
        adapter=_served(response.adapter),
        request_id=response.request_id,
        logprobs=_logprobs(response.logprobs),
        prompt_logprobs=_logprobs(response.prompt_logprobs),
    )


# --- admin results ----------------------------------------------------------------------------


def adapter_version(info: admin_pb2.AdapterVersionInfo) -> AdapterVersion:
    return AdapterVersion(
        tenant=info.tenant,
        name=info.name,
        version=info.version,
        files=tuple(AdapterFile(f.filename, f.size, f.sha256) for f in info.files),
        rank=info.rank,
        alpha=info.alpha,
        use_rslora=info.use_rslora,
        target_modules=tuple(info.target_modules),
        base_model=info.base_model,
        dtype=info.dtype,
        created_at=info.created_at,
        created_by=info.created_by,
        status=_STATUS.get(info.status, AdapterStatus.UNSPECIFIED),
        description=info.description,
        composed_from=tuple(ComposePart(p.adapter, p.weight) for p in info.composed_from),
    )


def tenant_usage(usage: admin_pb2.TenantUsage) -> TenantUsage:
    return TenantUsage(
        tenant=usage.tenant,
        stored_bytes=usage.stored_bytes,
        max_stored_bytes=usage.max_stored_bytes,
        adapters=usage.adapters,
        max_adapters=usage.max_adapters,
    )


def version_serving(info: admin_pb2.VersionServing) -> VersionServing:
    def optional(field: str) -> float | None:
        return float(getattr(info, field)) if info.HasField(field) else None  # type: ignore[arg-type]

    return VersionServing(
        version=info.version,
        window_seconds=info.window_seconds,
        requests=info.requests,
        errors=info.errors,
        error_codes=dict(sorted(info.error_codes.items())),
        finish_reasons=dict(sorted(info.finish_reasons.items())),
        latency_p50_seconds=optional("latency_p50_seconds"),
        latency_p99_seconds=optional("latency_p99_seconds"),
        ttft_p50_seconds=optional("ttft_p50_seconds"),
        completion_tokens=info.completion_tokens,
    )


def adapter(info: admin_pb2.AdapterInfo) -> Adapter:
    return Adapter(
        tenant=info.tenant,
        name=info.name,
        versions=tuple(adapter_version(v) for v in info.versions),
        aliases=dict(sorted(info.aliases.items())),
        shared_with=tuple(info.shared_with),
        status=_STATUS.get(info.status, AdapterStatus.UNSPECIFIED),
        usage=tenant_usage(info.usage) if info.HasField("usage") else None,
        alias_weights={
            alias: dict(sorted(split.weights.items()))
            for alias, split in sorted(info.alias_weights.items())
        },
        serving=tuple(version_serving(v) for v in info.serving),
        keep_last=info.keep_last,
        alias_stable=dict(sorted(info.alias_stable.items())),
        rollback_policies={
            alias: rollback_policy(policy)
            for alias, policy in sorted(info.rollback_policies.items())
        },
        rollbacks={alias: rollback(record) for alias, record in sorted(info.rollbacks.items())},
    )


def rollback_policy(info: admin_pb2.RollbackPolicy) -> RollbackPolicy:
    def optional(field: str) -> float | None:
        return float(getattr(info, field)) if info.HasField(field) else None  # type: ignore[arg-type]

    return RollbackPolicy(
        max_error_rate=optional("max_error_rate"),
        max_length_rate=optional("max_length_rate"),
        min_requests=info.min_requests,
        window_s=info.window_s,
        min_eval_score=optional("min_eval_score"),
        eval_interval_s=info.eval_interval_s,
    )


def rollback(info: admin_pb2.RollbackRecord) -> Rollback:
    return Rollback(
        at=info.at,
        canary=info.canary,
        stable=info.stable,
        split=dict(sorted(info.split.items())),
        reason=info.reason,
        value=info.value,
        threshold=info.threshold,
        requests=info.requests,
        replica=info.replica,
    )


def rollback_policy_pb(
    max_error_rate: float | None,
    max_length_rate: float | None,
    min_requests: int,
    window_s: float,
    min_eval_score: float | None,
    eval_interval_s: float,
) -> admin_pb2.RollbackPolicy:
    """The policy as sent (unset rules stay unset); the server checks the values."""
    policy = message(
        admin_pb2.RollbackPolicy,
        min_requests=_count(min_requests, "min_requests"),
        window_s=_number(window_s, "window_s"),
        eval_interval_s=_number(eval_interval_s, "eval_interval_s"),
    )
    for field, value in (
        ("max_error_rate", max_error_rate),
        ("max_length_rate", max_length_rate),
        ("min_eval_score", min_eval_score),
    ):
        if value is not None:
            setattr(policy, field, _number(value, field))
    return policy


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise errors.InvalidArgument(f"{what} must be an integer >= 0 (0 = the default)")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.InvalidArgument(f"{what} must be a number")
    return float(value)


def alias_weights(weights: Mapping[str, float], what: str) -> admin_pb2.AliasWeights:
    """{version: weight} as sent; the server checks the versions and the weights."""
    if not isinstance(weights, Mapping):
        raise errors.InvalidArgument(f"{what}: expected a mapping of version -> weight")
    try:
        return admin_pb2.AliasWeights(weights={str(v): float(w) for v, w in weights.items()})
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgument(f"{what}: {exc}") from None


def adapter_page(response: admin_pb2.ListAdaptersResponse) -> AdapterPage:
    return AdapterPage(
        adapters=tuple(adapter(a) for a in response.adapters),
        next_page_token=response.next_page_token,
        usage=tenant_usage(response.usage) if response.HasField("usage") else None,
    )


def revoke_result(response: admin_pb2.RevokeAdapterResponse) -> RevokeResult:
    return RevokeResult(
        revoked_versions=tuple(response.revoked_versions),
        aborted_requests=response.aborted_requests,
    )


def retention_result(response: admin_pb2.SetRetentionResponse) -> RetentionResult:
    return RetentionResult(
        adapter=adapter(response.adapter),
        retired_versions=tuple(response.retired_versions),
        aborted_requests=response.aborted_requests,
    )


def residency_entry(entry: admin_pb2.ResidencyEntry) -> ResidencyEntry:
    return ResidencyEntry(
        tenant=entry.tenant,
        name=entry.name,
        version=entry.version,
        tier=_TIER.get(entry.tier, ResidencyTier.UNSPECIFIED),
        pinned=entry.pinned,
        lora_int_id=entry.lora_int_id,
        size_bytes=entry.size_bytes,
    )


def residency(response: admin_pb2.GetResidencyResponse) -> Residency:
    return Residency(
        entries=tuple(residency_entry(e) for e in response.entries),
        engine_capacity=response.engine_capacity,
        disk_budget_bytes=response.disk_budget_bytes,
        disk_used_bytes=response.disk_used_bytes,
        next_page_token=response.next_page_token,
    )


# --- evaluations --------------------------------------------------------------------------------


def evaluation_set(info: admin_pb2.EvaluationSetInfo) -> EvaluationSetInfo:
    return EvaluationSetInfo(
        sha256=info.sha256,
        cases=info.cases,
        uploaded_at=info.uploaded_at,
        uploaded_by=info.uploaded_by,
    )


def evaluation(result: admin_pb2.EvaluationResult) -> Evaluation:
    return Evaluation(
        version=result.version,
        set_sha256=result.set_sha256,
        score=result.score,
        passed=result.passed,
        total=result.total,
        cases=tuple(EvaluationCase(c.id, c.passed, c.reason) for c in result.cases),
        engine=result.engine,
        base_model=result.base_model,
        started_at=result.started_at,
        finished_at=result.finished_at,
        evaluated_by=result.evaluated_by,
    )


def evaluations(info: admin_pb2.EvaluationsInfo) -> Evaluations:
    return Evaluations(
        current_set=evaluation_set(info.current_set) if info.HasField("current_set") else None,
        results=tuple(evaluation(r) for r in info.results),
        alias_policies={a: p.min_score for a, p in sorted(info.alias_policies.items())},
    )
