"""What the SDK returns: plain frozen dataclasses, never protobuf messages.

Inference: `GenerateResult` (a whole completion), `StreamDelta` (one message of a stream) and
`ServedAdapter` (the exact version that served). Admin: `AdapterVersion`, `Adapter`,
`AdapterPage` (one page of a listing, with the caller's `TenantUsage`), `VersionServing` (a
version's recent calls, in `get_adapter`'s answer), `RevokeResult`, `RetentionResult`,
`ResidencyEntry` and `Residency` (one page); evaluations: `EvaluationSetInfo`,
`Evaluation` (one result, with its `EvaluationCase`s) and `Evaluations` (what is stored).
Field names are those of the API (admin.proto),
statuses and tiers are string enums (`AdapterStatus.ACTIVE == "active"`), sequences are tuples.
`_convert.py` builds them from the protobuf answers, in one place.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "Adapter",
    "AdapterFile",
    "AdapterPage",
    "AdapterStatus",
    "AdapterVersion",
    "ComposePart",
    "Evaluation",
    "EvaluationCase",
    "EvaluationSetInfo",
    "Evaluations",
    "GenerateResult",
    "Residency",
    "ResidencyEntry",
    "ResidencyTier",
    "RetentionResult",
    "RevokeResult",
    "ServedAdapter",
    "StreamDelta",
    "TenantUsage",
    "VersionServing",
]


# --- inference --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedAdapter:
    """The exact adapter version that served a request."""

    tenant: str
    name: str
    #: "sha256:<64 hex>".
    version: str


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position."""

    token_id: int
    logprob: float
    token: str


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (None for the first prompt token) and the
    most likely tokens at its position, best first (`logprobs` / `prompt_logprobs` of them)."""

    token_id: int
    logprob: float | None
    token: str
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenizeResult:
    """Token ids of a prompt as Generate sends it to the engine."""

    token_ids: list[int]
    count: int
    #: The text the chat template rendered ("" for a text prompt).
    rendered: str
    #: The model's context length: the prompt and max_tokens together must fit in it.
    max_model_len: int


@dataclass(frozen=True)
class GenerateResult:
    """A whole completion."""

    text: str
    token_ids: list[int]
    #: "length" (max_tokens), "stop" (EOS, stop string or token) or "abort".
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: None for the base model.
    adapter: ServedAdapter | None
    #: The server-assigned request id.
    request_id: str
    #: One per generated token when the `logprobs` option was set (else empty).
    logprobs: tuple[TokenLogprob, ...] = ()
    #: One per prompt token when the `prompt_logprobs` option was set (else empty).
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class StreamDelta:
    """One message of a stream: the text and token ids new since the previous one."""

    text: str
    token_ids: list[int]
    #: Set on the last message only: "length", "stop" or "abort".
    finish_reason: str | None
    #: Set on the last message only.
    prompt_tokens: int | None
    completion_tokens: int | None
    #: Set on the first message only (None for the base model).
    adapter: ServedAdapter | None
    #: Set on the first message only ("" otherwise).
    request_id: str
    #: One per token of `token_ids` when the `logprobs` option was set.
    logprobs: tuple[TokenLogprob, ...] = ()
    #: On the first message, when the `prompt_logprobs` option was set.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


# --- adapters ---------------------------------------------------------------------------------


class AdapterStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    #: Sent by no current server; a newer server's status unknown to this client reads so too.
    UNSPECIFIED = "unspecified"


@dataclass(frozen=True)
class AdapterFile:
    filename: str
    size: int
    #: Hex digest of the file's bytes (no "sha256:" prefix).
    sha256: str


@dataclass(frozen=True)
class ComposePart:
    """One weighted part of a composed version: `weight` x the version `adapter` named."""

    adapter: str
    weight: float


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable, content-addressed version of an adapter.

    A tenant the adapter is shared with sees what it needs to use it: `created_by`,
    `description` and `composed_from` are empty for it.
    """

    tenant: str
    name: str
    #: "sha256:<64 hex>".
    version: str
    files: tuple[AdapterFile, ...]
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model: str
    #: safetensors dtype of the weights ("F32", "BF16", ...).
    dtype: str
    #: RFC 3339, UTC.
    created_at: str
    created_by: str
    status: AdapterStatus
    description: str
    composed_from: tuple[ComposePart, ...]

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def chat_template(self) -> AdapterFile | None:
        """The version's own chat template file (chat_template.jinja), None without one (its
        chat prompts then use the base model's template)."""
        return next((f for f in self.files if f.filename == "chat_template.jinja"), None)


@dataclass(frozen=True)
class TenantUsage:
    """A tenant's stored adapters against its quotas (tenants file: max_stored_bytes,
    max_adapters)."""

    tenant: str
    #: Bytes of every live version.
    stored_bytes: int
    max_stored_bytes: int
    #: Live adapters (names).
    adapters: int
    max_adapters: int


@dataclass(frozen=True)
class VersionServing:
    """A version's recent inference calls on the replica that answered `get_adapter`: those
    of the caller's tenant (an operator: of every tenant), over `window_seconds`."""

    #: "sha256:<hex>", or "other" (versions without per-version metrics of their own).
    version: str
    window_seconds: float
    requests: int
    #: Calls that ended with a status other than OK.
    errors: int
    #: Status code name -> calls that ended with it (errors only).
    error_codes: Mapping[str, int]
    #: "stop" or "length" -> calls that finished with it.
    finish_reasons: Mapping[str, int]
    #: None when no call measured it.
    latency_p50_seconds: float | None
    latency_p99_seconds: float | None
    ttft_p50_seconds: float | None
    completion_tokens: int

    @property
    def error_rate(self) -> float:
        """`errors / requests` (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Adapter:
    """An adapter: its versions (in sha256 order), aliases and grants."""

    tenant: str
    name: str
    versions: tuple[AdapterVersion, ...]
    #: alias -> "sha256:<hex>"; `latest` moves with every upload.
    aliases: Mapping[str, str]
    #: Tenants it is shared with (empty in a grantee's view).
    shared_with: tuple[str, ...]
    status: AdapterStatus
    #: `get_adapter` only: the owner's usage and quota, for callers of that tenant and
    #: operators; None otherwise.
    usage: TenantUsage | None
    #: Weighted aliases (canaries) only: alias -> {"sha256:<hex>": weight}. `aliases` names
    #: their primary version (the most weight).
    alias_weights: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: `get_adapter` only: each version's recent calls (sorted by version; empty otherwise).
    serving: tuple[VersionServing, ...] = ()
    #: The retention policy: keep the newest `keep_last` versions plus every aliased one
    #: (0: no policy, every version is kept). `set_retention` sets it.
    keep_last: int = 0
    #: Automatic rollback (the owner's view only): weighted alias -> its stable version
    #: ("sha256:<hex>"; the other versions of its split are canaries), alias -> its rollback
    #: policy, alias -> its last automatic rollback.
    alias_stable: Mapping[str, str] = field(default_factory=dict)
    rollback_policies: Mapping[str, RollbackPolicy] = field(default_factory=dict)
    rollbacks: Mapping[str, Rollback] = field(default_factory=dict)


@dataclass(frozen=True)
class RollbackPolicy:
    """When a canary of an alias is rolled back to its stable version (`set_rollback_policy`).

    The rates are over the canary's calls by the owner tenant in the last `window_s` seconds,
    from `min_requests` calls on; None: no such rule."""

    max_error_rate: float | None
    max_length_rate: float | None
    min_requests: int
    window_s: float
    min_eval_score: float | None
    eval_interval_s: float


@dataclass(frozen=True)
class Rollback:
    """One automatic rollback of an alias."""

    #: RFC 3339 UTC.
    at: str
    #: The canary that crossed the policy, and the stable version all weight went back to.
    canary: str
    stable: str
    #: The alias's split before: {"sha256:<hex>": weight}.
    split: Mapping[str, float]
    #: error_rate, length_rate, evaluation or quarantined.
    reason: str
    #: The measured rate or score, and the policy's threshold it crossed.
    value: float
    threshold: float
    #: The canary's calls in the window (rate rules; 0 otherwise).
    requests: int
    #: The replica that decided (its host name).
    replica: str


@dataclass(frozen=True)
class AdapterPage:
    """One page of `list_adapters`; `next_page_token` is "" on the last."""

    adapters: tuple[Adapter, ...]
    next_page_token: str
    #: The listed tenant's usage and quota (None when the server sent none).
    usage: TenantUsage | None


@dataclass(frozen=True)
class RevokeResult:
    #: The versions this call revoked (empty when they were revoked already).
    revoked_versions: tuple[str, ...]
    #: In-flight requests on them that were aborted (on this replica).
    aborted_requests: int


@dataclass(frozen=True)
class RetentionResult:
    """What `set_retention` did: the adapter with its policy (`adapter.keep_last`), and the
    versions it retired (revoked: served nowhere after the propagation bound)."""

    adapter: Adapter
    #: "sha256:<hex>" of each version this call retired (empty when none was due).
    retired_versions: tuple[str, ...]
    #: In-flight requests on them that were aborted (on the replica that answered).
    aborted_requests: int


# --- residency --------------------------------------------------------------------------------


class ResidencyTier(enum.StrEnum):
    """Where an adapter version is: in the engine, on the local disk cache, or only stored."""

    ENGINE = "engine"
    DISK = "disk"
    STORE = "store"
    UNSPECIFIED = "unspecified"


@dataclass(frozen=True)
class ResidencyEntry:
    tenant: str
    name: str
    #: "sha256:<64 hex>".
    version: str
    tier: ResidencyTier
    pinned: bool
    #: The engine's id of the loaded version; 0 when it is not in the engine.
    lora_int_id: int
    size_bytes: int


@dataclass(frozen=True)
class Residency:
    """One page of `get_residency`; the figures are the replica's."""

    entries: tuple[ResidencyEntry, ...]
    #: Adapters the engine holds at once (max_loras).
    engine_capacity: int
    disk_budget_bytes: int
    disk_used_bytes: int
    #: "" on the last page.
    next_page_token: str


# --- evaluations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationSetInfo:
    """An adapter's evaluation set as stored: its sha256 names it."""

    #: 64 hex digits.
    sha256: str
    cases: int
    uploaded_at: str
    uploaded_by: str


@dataclass(frozen=True)
class EvaluationCase:
    id: str
    passed: bool
    #: Why it failed ("" when it passed).
    reason: str


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of one version: immutable once stored."""

    #: "sha256:<64 hex>" of the version.
    version: str
    set_sha256: str
    #: passed / total.
    score: float
    passed: int
    total: int
    cases: tuple[EvaluationCase, ...]
    engine: str
    base_model: str
    started_at: str
    finished_at: str
    evaluated_by: str

    @property
    def failures(self) -> tuple[EvaluationCase, ...]:
        return tuple(case for case in self.cases if not case.passed)


@dataclass(frozen=True)
class Evaluations:
    """`get_evaluations`: the current set (None: none uploaded), the stored results (oldest
    first per version) and the alias policies (alias -> minimum score)."""

    current_set: EvaluationSetInfo | None
    results: tuple[Evaluation, ...]
    alias_policies: Mapping[str, float]
