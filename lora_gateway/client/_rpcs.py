"""Each RPC once, for both clients: its arguments checked, its request built, and how to read
its answer. A client method is one line over these: `self._call(_rpcs.get_adapter(...))`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from google.protobuf.message import Message

from lora_gateway import errors
from lora_gateway.client import _convert
from lora_gateway.client._convert import message
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
from lora_gateway.v1 import admin_pb2, inference_pb2

_T = TypeVar("_T")


@dataclass(frozen=True)
class Rpc(Generic[_T]):
    """One call, ready to send: the stub method, the request (the first message of a client
    stream), and how to read each message of the answer."""

    method: str
    request: Message
    response_type: type[Message]
    convert: Callable[[Any], _T]
    service: Literal["Admin", "Inference"] = "Admin"
    #: The reference that the routing header is taken from.
    adapter: str | None = None
    request_id: str = ""

    def result(self, response: object) -> _T:
        if not isinstance(response, self.response_type):
            raise errors.GatewayError(f"unexpected response type {type(response).__name__}")
        return self.convert(response)


def _check_page(page_size: int, page_token: str) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or not 0 <= page_size < 2**31:
        raise errors.InvalidArgument("page_size must be an integer >= 0 (0 = the server's default)")
    if not isinstance(page_token, str):
        raise errors.InvalidArgument("page_token must be a string")


# --- inference --------------------------------------------------------------------------------


def generate(
    adapter: str,
    prompt: Prompt | None,
    options: GenerateOptions | None,
    token_ids: Sequence[int] | None,
    request_id: str,
    routing_key: str = "",
) -> Rpc[GenerateResult]:
    return Rpc(
        "Generate",
        _convert.generate_request(adapter, prompt, token_ids, options, request_id, routing_key),
        inference_pb2.GenerateResponse,
        _convert.generate_result,
        service="Inference",
        adapter=adapter,
        request_id=request_id,
    )


def tokenize(adapter: str, prompt: Prompt, routing_key: str = "") -> Rpc[TokenizeResult]:
    return Rpc(
        "Tokenize",
        _convert.tokenize_request(adapter, prompt, routing_key),
        inference_pb2.TokenizeResponse,
        _convert.tokenize_result,
        service="Inference",
    )


def streamed(unary: Rpc[GenerateResult]) -> Rpc[StreamDelta]:
    """The same request, as GenerateStream: one `StreamDelta` per message."""
    return Rpc(
        "GenerateStream",
        unary.request,
        inference_pb2.GenerateStreamResponse,
        _convert.stream_delta,
        service="Inference",
        adapter=unary.adapter,
        request_id=unary.request_id,
    )


# --- admin ------------------------------------------------------------------------------------


def upload_adapter(first: admin_pb2.UploadAdapterRequest) -> Rpc[AdapterVersion]:
    """`first` is the header; the client streams the chunks after it."""
    return Rpc("UploadAdapter", first, admin_pb2.AdapterVersionInfo, _convert.adapter_version)


def list_adapters(
    tenant: str, include_shared: bool, page_size: int, page_token: str
) -> Rpc[AdapterPage]:
    _check_page(page_size, page_token)
    request = message(
        admin_pb2.ListAdaptersRequest,
        tenant=tenant,
        include_shared=include_shared,
        page_size=page_size,
        page_token=page_token,
    )
    return Rpc("ListAdapters", request, admin_pb2.ListAdaptersResponse, _convert.adapter_page)


def get_adapter(name: str, tenant: str) -> Rpc[Adapter]:
    request = message(admin_pb2.GetAdapterRequest, tenant=tenant, name=name)
    return Rpc("GetAdapter", request, admin_pb2.AdapterInfo, _convert.adapter)


def set_alias(
    name: str,
    alias: str,
    version: str,
    tenant: str,
    expected_version: str,
    require_eval_min_score: float | None = None,
) -> Rpc[Adapter]:
    request = message(
        admin_pb2.SetAliasRequest,
        tenant=tenant,
        name=name,
        alias=alias,
        version=version,
        expected_version=expected_version,
    )
    if require_eval_min_score is not None:
        request.require_eval_min_score = _score(require_eval_min_score)
    return Rpc("SetAlias", request, admin_pb2.AdapterInfo, _convert.adapter)


def _score(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.InvalidArgument("require_eval_min_score must be a number in (0, 1]")
    return float(value)


def set_alias_weights(
    name: str,
    alias: str,
    weights: Mapping[str, float],
    tenant: str,
    expected: Mapping[str, float] | None,
    require_eval_min_score: float | None = None,
) -> Rpc[Adapter]:
    request = message(
        admin_pb2.SetAliasWeightsRequest,
        tenant=tenant,
        name=name,
        alias=alias,
        weights=_convert.alias_weights(weights, "weights").weights,
    )
    if expected is not None:
        request.expected.CopyFrom(_convert.alias_weights(expected, "expected"))
    if require_eval_min_score is not None:
        request.require_eval_min_score = _score(require_eval_min_score)
    return Rpc("SetAliasWeights", request, admin_pb2.AdapterInfo, _convert.adapter)


def share_adapter(name: str, grantee: str, tenant: str, *, share: bool) -> Rpc[Adapter]:
    request = message(admin_pb2.ShareAdapterRequest, tenant=tenant, name=name, grantee=grantee)
    method = "ShareAdapter" if share else "UnshareAdapter"
    return Rpc(method, request, admin_pb2.AdapterInfo, _convert.adapter)


def compose_adapter(
    name: str,
    parts: Sequence[tuple[str, float]],
    tenant: str,
    aliases: Sequence[str],
    description: str,
) -> Rpc[AdapterVersion]:
    request = message(
        admin_pb2.ComposeAdapterRequest,
        tenant=tenant,
        name=name,
        parts=_convert.compose_parts(parts),
        aliases=_convert.names(aliases),
        description=description,
    )
    return Rpc("ComposeAdapter", request, admin_pb2.AdapterVersionInfo, _convert.adapter_version)


def revoke_adapter(name: str, version: str, tenant: str) -> Rpc[RevokeResult]:
    request = message(admin_pb2.RevokeAdapterRequest, tenant=tenant, name=name, version=version)
    return Rpc("RevokeAdapter", request, admin_pb2.RevokeAdapterResponse, _convert.revoke_result)


#: SetRetentionRequest.keep_last is an int32.
_KEEP_LAST_MAX = 2**31 - 1


def set_retention(name: str, keep_last: int | None, tenant: str) -> Rpc[RetentionResult]:
    """`keep_last` None removes the policy (keep_all). The server refuses `keep_last` < 1
    (INVALID_ARGUMENT); what the request cannot carry is refused here, before sending."""
    if keep_last is not None and (
        isinstance(keep_last, bool)
        or not isinstance(keep_last, int)
        or not -_KEEP_LAST_MAX <= keep_last <= _KEEP_LAST_MAX
    ):
        raise errors.InvalidArgument(
            f"keep_last must be an integer from 1 to {_KEEP_LAST_MAX} (or None: keep every version)"
        )
    request = message(
        admin_pb2.SetRetentionRequest,
        tenant=tenant,
        name=name,
        keep_last=keep_last or 0,
        keep_all=keep_last is None,
    )
    return Rpc("SetRetention", request, admin_pb2.SetRetentionResponse, _convert.retention_result)


def residency_op(method: str, adapter: str, tenant: str) -> Rpc[ResidencyEntry]:
    """PinAdapter, UnpinAdapter or PrefetchAdapter (routed by the adapter, like Generate)."""
    request = message(admin_pb2.AdapterRefRequest, tenant=tenant, adapter=adapter)
    convert = _convert.residency_entry
    return Rpc(method, request, admin_pb2.ResidencyEntry, convert, adapter=adapter)


def get_residency(tenant: str, page_size: int, page_token: str) -> Rpc[Residency]:
    _check_page(page_size, page_token)
    request = message(
        admin_pb2.GetResidencyRequest, tenant=tenant, page_size=page_size, page_token=page_token
    )
    return Rpc("GetResidency", request, admin_pb2.GetResidencyResponse, _convert.residency)


# --- evaluations ------------------------------------------------------------------------------


def put_evaluation_set(name: str, set_json: str, tenant: str) -> Rpc[EvaluationSetInfo]:
    request = message(
        admin_pb2.PutEvaluationSetRequest, tenant=tenant, name=name, set_json=set_json
    )
    return Rpc("PutEvaluationSet", request, admin_pb2.EvaluationSetInfo, _convert.evaluation_set)


def evaluate_adapter(name: str, version: str, set_sha256: str, tenant: str) -> Rpc[Evaluation]:
    request = message(
        admin_pb2.EvaluateAdapterRequest,
        tenant=tenant,
        name=name,
        version=version,
        set_sha256=set_sha256,
    )
    return Rpc("EvaluateAdapter", request, admin_pb2.EvaluationResult, _convert.evaluation)


def get_evaluations(name: str, version: str, tenant: str) -> Rpc[Evaluations]:
    request = message(admin_pb2.GetEvaluationsRequest, tenant=tenant, name=name, version=version)
    return Rpc("GetEvaluations", request, admin_pb2.EvaluationsInfo, _convert.evaluations)


def set_alias_policy(name: str, alias: str, min_score: float, tenant: str) -> Rpc[Evaluations]:
    request = message(
        admin_pb2.SetAliasPolicyRequest,
        tenant=tenant,
        name=name,
        alias=alias,
        require_eval_min_score=_score(min_score),
    )
    return Rpc("SetAliasPolicy", request, admin_pb2.EvaluationsInfo, _convert.evaluations)


# --- automatic rollback -----------------------------------------------------------------------


def set_rollback_policy(
    name: str,
    alias: str,
    tenant: str,
    max_error_rate: float | None,
    max_length_rate: float | None,
    min_requests: int,
    window_s: float,
    min_eval_score: float | None,
    eval_interval_s: float,
) -> Rpc[Adapter]:
    policy = _convert.rollback_policy_pb(
        max_error_rate, max_length_rate, min_requests, window_s, min_eval_score, eval_interval_s
    )
    request = message(
        admin_pb2.SetRollbackPolicyRequest, tenant=tenant, name=name, alias=alias, policy=policy
    )
    return Rpc("SetRollbackPolicy", request, admin_pb2.AdapterInfo, _convert.adapter)


def remove_rollback_policy(name: str, alias: str, tenant: str) -> Rpc[Adapter]:
    request = message(
        admin_pb2.SetRollbackPolicyRequest, tenant=tenant, name=name, alias=alias, remove=True
    )
    return Rpc("SetRollbackPolicy", request, admin_pb2.AdapterInfo, _convert.adapter)
