"""Automatic rollback of canaries, as the manifest stores it: policies, stable versions, records.

The gateway (`lora_gateway.rollback`) watches canaries and decides; the store keeps what every
replica must agree on, in the manifest, next to the alias it concerns:

- `Manifest.alias_stable`: alias -> the **stable** version of its split (a sha). A weighted
  alias's stable version is the one the alias pointed at, plainly, when it was first split
  (`SetAliasWeights` on `prod -> v7` with `{v7: 0.9, v8: 0.1}`: v7), kept while later weight
  changes keep it in the split. Every other version of the split is a **canary**. A split made
  without the previous version in it (or from no alias at all) has no stable version, and
  nothing rolls it back.
- `Manifest.rollback_policies`: alias -> `RollbackPolicy` (when the canary is rolled back).
- `Manifest.rollbacks`: alias -> the last automatic rollback (`RollbackRecord`).
- `Manifest.evaluation_claims`: version sha -> `EvaluationClaim`, which replica runs the
  version's scheduled evaluation now (so that replicas do not each run it).

A rollback is one conditional manifest write (`Registry.rollback`): it moves all weight back to
the stable version only if the alias's split is still the one the replica decided on, so two
replicas deciding at once make one move, and a newer change by the tenant is never overridden.

All four are optional in the JSON: manifests written before them read and write as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from adapter_store.errors import IntegrityError, InvalidAdapter
from adapter_store.stored import json_object, json_sha, json_str

__all__ = [
    "DEFAULT_EVAL_INTERVAL_S",
    "DEFAULT_MIN_REQUESTS",
    "DEFAULT_WINDOW_S",
    "MAX_EVAL_INTERVAL_S",
    "MAX_MIN_REQUESTS",
    "MAX_WINDOW_S",
    "REASONS",
    "EvaluationClaim",
    "RollbackPolicy",
    "RollbackRecord",
    "canaries",
    "parse_claims",
    "parse_policies",
    "parse_records",
    "parse_stable",
    "timestamp_us",
]

#: Defaults of a policy's fields left at 0 in a request.
DEFAULT_MIN_REQUESTS = 20
DEFAULT_WINDOW_S = 300.0
DEFAULT_EVAL_INTERVAL_S = 3600.0
#: Upper bounds of a policy's fields.
MAX_MIN_REQUESTS = 100_000
MAX_WINDOW_S = 86_400.0
MAX_EVAL_INTERVAL_S = 7 * 86_400.0
#: Why a canary was rolled back (the `reason` label of lora_gateway_rollbacks_total).
REASONS = ("error_rate", "length_rate", "evaluation", "quarantined")


def _bad(text: str) -> InvalidAdapter:
    return InvalidAdapter(f"rollback policy: {text}")


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{what} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise _bad(f"{what} must be a finite number, got {number!r}")
    return number


def _rate(value: object, what: str) -> float | None:
    if value is None:
        return None
    rate = _number(value, what)
    if not 0.0 <= rate < 1.0:
        raise _bad(f"{what} must be in [0, 1) (the canary is rolled back above it), got {rate:g}")
    return rate


@dataclass(frozen=True)
class RollbackPolicy:
    """When a canary of the alias is rolled back to the alias's stable version.

    Rate rules count the canary's calls of the last `window_s` seconds (the owner tenant's, on
    the replica that decides) and apply from `min_requests` of them on; the evaluation rule
    re-runs the adapter's current evaluation set on the canary every `eval_interval_s`."""

    #: Roll back when the share of the canary's calls that failed on the server's side
    #: (INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE) is above this, and above the stable
    #: version's share over the same window. In [0, 1); None: no such rule.
    max_error_rate: float | None = None
    #: Roll back when the share of the canary's calls that finished by `length` (its
    #: max_tokens) is above this. In [0, 1); None: no such rule.
    max_length_rate: float | None = None
    #: The fewest calls in the window before a rate rule applies.
    min_requests: int = DEFAULT_MIN_REQUESTS
    #: Seconds of calls the rates are measured over.
    window_s: float = DEFAULT_WINDOW_S
    #: Roll back when the canary's latest evaluation on the current set scored below this.
    #: In (0, 1]; None: no such rule (and no scheduled evaluation).
    min_eval_score: float | None = None
    #: Seconds between scheduled evaluations of a canary.
    eval_interval_s: float = DEFAULT_EVAL_INTERVAL_S

    @classmethod
    def check(
        cls,
        *,
        max_error_rate: object = None,
        max_length_rate: object = None,
        min_requests: object = 0,
        window_s: object = 0,
        min_eval_score: object = None,
        eval_interval_s: object = 0,
        min_eval_interval_s: float = 0.0,
    ) -> RollbackPolicy:
        """A policy from request values (0 for a count or a duration: its default), each
        checked (InvalidAdapter naming the field and its range otherwise). `eval_interval_s`
        must be at least `min_eval_interval_s` (the gateway's floor)."""
        error = _rate(max_error_rate, "max_error_rate")
        length = _rate(max_length_rate, "max_length_rate")
        score = None
        if min_eval_score is not None:
            score = _number(min_eval_score, "min_eval_score")
            if not 0.0 < score <= 1.0:
                raise _bad(f"min_eval_score must be in (0, 1], got {score:g}")
        if error is None and length is None and score is None:
            raise _bad("give at least one of max_error_rate, max_length_rate, min_eval_score")
        if isinstance(min_requests, bool) or not isinstance(min_requests, int):
            raise _bad("min_requests must be an integer")
        requests = min_requests or DEFAULT_MIN_REQUESTS
        if not 1 <= requests <= MAX_MIN_REQUESTS:
            raise _bad(f"min_requests must be in [1, {MAX_MIN_REQUESTS}], got {requests}")
        window = _number(window_s, "window_s") or DEFAULT_WINDOW_S
        if not 0.0 < window <= MAX_WINDOW_S:
            raise _bad(f"window_s must be in (0, {MAX_WINDOW_S:g}] seconds, got {window:g}")
        interval = _number(eval_interval_s, "eval_interval_s") or DEFAULT_EVAL_INTERVAL_S
        floor = max(min_eval_interval_s, 0.0)
        if not floor <= interval <= MAX_EVAL_INTERVAL_S or interval <= 0:
            raise _bad(
                f"eval_interval_s must be in [{floor:g}, {MAX_EVAL_INTERVAL_S:g}] seconds "
                f"(rollback_min_eval_interval_s is the floor), got {interval:g}"
            )
        return cls(error, length, requests, window, score, interval)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "min_requests": self.min_requests,
            "window_s": self.window_s,
            "eval_interval_s": self.eval_interval_s,
        }
        for key in ("max_error_rate", "max_length_rate", "min_eval_score"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    @classmethod
    def from_dict(cls, raw: object) -> RollbackPolicy:
        obj = json_object(raw, "rollback policy")
        try:
            return cls.check(
                max_error_rate=obj.get("max_error_rate"),
                max_length_rate=obj.get("max_length_rate"),
                min_requests=obj.get("min_requests"),
                window_s=obj.get("window_s"),
                min_eval_score=obj.get("min_eval_score"),
                eval_interval_s=obj.get("eval_interval_s"),
            )
        except InvalidAdapter as exc:
            raise IntegrityError(f"stored manifest: {exc}") from None

    def describe(self) -> str:
        """ "error rate > 0.2 or length rate > 0.5 over 300s (>= 20 calls); evaluation score
        < 0.9 (every 3600s)" """
        return describe_policy(self)


@dataclass(frozen=True)
class RollbackRecord:
    """One automatic rollback: what moved, why, measured against what, and who decided."""

    #: When (RFC 3339 UTC, and microseconds since the epoch: the floor of the next window).
    at: str
    at_us: int
    #: The canary that crossed the rule, and the stable version all weight went back to (hex).
    canary: str
    stable: str
    #: The alias's split before the move: {sha: weight}.
    split: dict[str, float] = field(default_factory=dict)
    #: One of REASONS.
    reason: str = "error_rate"
    #: The measured value (a rate or a score) and the policy's threshold it crossed.
    value: float = 0.0
    threshold: float = 0.0
    #: The canary's calls in the window (rate rules; 0 otherwise).
    requests: int = 0
    #: The replica that decided (its host name): the gateway itself, never a key.
    by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "at_us": self.at_us,
            "canary": self.canary,
            "stable": self.stable,
            "split": dict(sorted(self.split.items())),
            "reason": self.reason,
            "value": self.value,
            "threshold": self.threshold,
            "requests": self.requests,
            "by": self.by,
        }

    @classmethod
    def from_dict(cls, raw: object) -> RollbackRecord:
        obj = json_object(raw, "rollback record")
        split = json_object(obj.get("split"), "rollback record split")
        reason = obj.get("reason")
        if reason not in REASONS:
            raise IntegrityError("stored manifest: a rollback record has an unknown reason")
        return cls(
            at=json_str(obj, "at", "rollback"),
            at_us=_int(obj, "at_us"),
            canary=json_sha(obj.get("canary"), "rollback"),
            stable=json_sha(obj.get("stable"), "rollback"),
            split={json_sha(sha, "rollback"): _float(w, "split") for sha, w in split.items()},
            reason=str(reason),
            value=_float(obj.get("value"), "value"),
            threshold=_float(obj.get("threshold"), "threshold"),
            requests=_int(obj, "requests"),
            by=json_str(obj, "by", "rollback"),
        )

    def describe(self) -> str:
        """ "error_rate 0.5 > 0.2 (16 calls) on sha256:<12>…" """
        op = "<" if self.reason == "evaluation" else ">"
        text = f"{self.reason} {self.value:.3g} {op} {self.threshold:g}"
        if self.requests:
            text += f" ({self.requests} calls)"
        return f"{text} on sha256:{self.canary[:12]}…"


@dataclass(frozen=True)
class EvaluationClaim:
    """A replica runs the version's scheduled evaluation: taken at `at_us` (µs since the
    epoch) by `by` (a host name); others leave it alone for the policy's interval."""

    at_us: int
    by: str

    def to_dict(self) -> dict[str, Any]:
        return {"at_us": self.at_us, "by": self.by}


def parse_stable(raw: object, alias_weights: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """The stored `alias_stable`: each a weighted alias's version."""
    parsed: dict[str, str] = {}
    for alias, sha in json_object(raw, "alias_stable").items():
        if alias not in alias_weights or sha not in alias_weights[alias]:
            raise IntegrityError(
                f"stored manifest: the stable version of {str(alias)[:80]!r} is not in its split"
            )
        parsed[alias] = sha
    return parsed


def parse_policies(raw: object) -> dict[str, RollbackPolicy]:
    return {
        str(alias): RollbackPolicy.from_dict(policy)
        for alias, policy in json_object(raw, "rollback_policies").items()
    }


def parse_records(raw: object) -> dict[str, RollbackRecord]:
    return {
        str(alias): RollbackRecord.from_dict(record)
        for alias, record in json_object(raw, "rollbacks").items()
    }


def parse_claims(raw: object) -> dict[str, EvaluationClaim]:
    parsed: dict[str, EvaluationClaim] = {}
    for sha, claim in json_object(raw, "evaluation_claims").items():
        obj = json_object(claim, "evaluation claim")
        parsed[json_sha(sha, "rollback")] = EvaluationClaim(
            at_us=_int(obj, "at_us"), by=json_str(obj, "by", "rollback")
        )
    return parsed


def canaries(split: Iterable[str], stable: str | None) -> list[str]:
    """The canaries of a split: every version but the stable one (none without a stable)."""
    return [] if stable is None else sorted(sha for sha in split if sha != stable)


def timestamp_us(text: str) -> int:
    """An RFC 3339 time (e.g. an evaluation's `finished_at`) in µs since the epoch; 0 when it
    does not parse (so such a result counts as old)."""
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1_000_000)
    except ValueError:
        return 0


def _int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IntegrityError(f"stored manifest: rollback field {key!r} has the wrong type")
    return value


def _float(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IntegrityError(f"stored manifest: rollback field {key!r} has the wrong type")
    return float(value)


class _PolicyFields(Protocol):
    """A rollback policy's fields: this module's `RollbackPolicy`, or the SDK's."""

    @property
    def max_error_rate(self) -> float | None: ...
    @property
    def max_length_rate(self) -> float | None: ...
    @property
    def min_requests(self) -> int: ...
    @property
    def window_s(self) -> float: ...
    @property
    def min_eval_score(self) -> float | None: ...
    @property
    def eval_interval_s(self) -> float: ...


def describe_policy(policy: _PolicyFields) -> str:
    """A policy in one line (`RollbackPolicy.describe`; the CLI prints the SDK's the same way)."""
    rates = []
    if policy.max_error_rate is not None:
        rates.append(f"error rate > {policy.max_error_rate:g}")
    if policy.max_length_rate is not None:
        rates.append(f"length rate > {policy.max_length_rate:g}")
    parts = []
    if rates:
        parts.append(
            f"{' or '.join(rates)} over {policy.window_s:g}s (>= {policy.min_requests} calls)"
        )
    if policy.min_eval_score is not None:
        parts.append(
            f"evaluation score < {policy.min_eval_score:g} (every {policy.eval_interval_s:g}s)"
        )
    return "; ".join(parts)
