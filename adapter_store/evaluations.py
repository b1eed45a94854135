"""Evaluation sets, evaluation results and alias promotion policies, as the manifest stores them.

The store keeps three things per adapter (the gateway's `lora_gateway.evaluation` parses and
runs the sets; the store only records and gates):

- `Manifest.evaluation_set`: which set is current (`EvaluationSetRef`: its sha256, case count,
  who uploaded it and when). The set itself is an object of its own next to the manifest
  (`keys.evaluation_set_key`, named by its sha256, never by a user string), so that a manifest,
  which every replica caches, stays small whatever the set holds.
- `Manifest.evaluations`: version sha -> the results of every evaluation of that version, in
  the order they ran (`EvaluationResult`). Appended to, never rewritten: a second evaluation
  adds a result, and at most `MAX_RESULTS_PER_VERSION` are kept (more is refused).
- `Manifest.alias_policies`: alias -> `AliasPolicy` (the minimum score a version needs, on the
  current set, before the alias may point at it).

`gate` is the one rule of gated promotion: `Registry.set_alias` and `set_alias_weights` call it
inside their conditional write, so the check and the move see the same manifest.

All three are optional in the JSON: manifests written before evaluations read as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adapter_store.errors import EvaluationRequired, IntegrityError
from adapter_store.stored import json_object, json_sha, json_str

__all__ = [
    "MAX_CASES",
    "MAX_REASON_CHARS",
    "MAX_RESULTS_PER_VERSION",
    "AliasPolicy",
    "CaseResult",
    "EvaluationResult",
    "EvaluationSetRef",
    "check_case_id",
    "check_min_score",
    "gate",
    "parse_alias_policies",
    "parse_evaluations",
]

#: Most cases of one evaluation set (the gateway may lower it, never raise it).
MAX_CASES = 64
#: A case's reason is cut to this many characters.
MAX_REASON_CHARS = 160
#: Results kept per version; an evaluation beyond them is refused (results are immutable).
MAX_RESULTS_PER_VERSION = 32
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class EvaluationSetRef:
    """The current evaluation set of an adapter (its bytes: `keys.evaluation_set_key`)."""

    sha: str
    cases: int
    uploaded_at: str
    uploaded_by: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha": self.sha,
            "cases": self.cases,
            "uploaded_at": self.uploaded_at,
            "uploaded_by": self.uploaded_by,
        }

    @classmethod
    def from_dict(cls, raw: object) -> EvaluationSetRef:
        obj = json_object(raw, "evaluation_set")
        cases = obj.get("cases")
        if not isinstance(cases, int) or isinstance(cases, bool) or not 0 < cases <= MAX_CASES:
            raise IntegrityError("stored manifest: evaluation_set has a bad case count")
        return cls(
            sha=json_sha(obj.get("sha"), "evaluation"),
            cases=cases,
            uploaded_at=json_str(obj, "uploaded_at", "evaluation"),
            uploaded_by=json_str(obj, "uploaded_by", "evaluation"),
        )


@dataclass(frozen=True)
class CaseResult:
    """One case of an evaluation: its id, whether it passed, and why not (short)."""

    id: str
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "passed": self.passed, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: object) -> CaseResult:
        obj = json_object(raw, "evaluation case")
        passed = obj.get("passed")
        if not isinstance(passed, bool):
            raise IntegrityError("stored manifest: an evaluation case has no pass/fail")
        return cls(
            id=json_str(obj, "id", "evaluation"),
            passed=passed,
            reason=json_str(obj, "reason", "evaluation"),
        )


@dataclass(frozen=True)
class EvaluationResult:
    """One evaluation of one version on one set: immutable once stored."""

    #: The version evaluated (64 hex) and the set it ran (64 hex).
    version: str
    set_sha: str
    #: passed / total, in [0, 1].
    score: float
    cases: tuple[CaseResult, ...]
    #: The engine and base model it ran on (e.g. "vllm 0.32.0", the model's name).
    engine: str
    base_model: str
    started_at: str
    finished_at: str
    #: Tenant and key label of the caller that ran it (never a key).
    evaluated_by: str

    @property
    def passed(self) -> int:
        return sum(1 for case in self.cases if case.passed)

    @property
    def failures(self) -> list[CaseResult]:
        return [case for case in self.cases if not case.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "set_sha": self.set_sha,
            "score": self.score,
            "cases": [case.to_dict() for case in self.cases],
            "engine": self.engine,
            "base_model": self.base_model,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "evaluated_by": self.evaluated_by,
        }

    @classmethod
    def from_dict(cls, raw: object) -> EvaluationResult:
        obj = json_object(raw, "evaluation")
        score = obj.get("score")
        if (
            isinstance(score, bool)
            or not isinstance(score, int | float)
            or not math.isfinite(score)
            or not 0.0 <= score <= 1.0
        ):
            raise IntegrityError("stored manifest: an evaluation score is not in [0, 1]")
        cases = obj.get("cases")
        if not isinstance(cases, list) or not cases:
            raise IntegrityError("stored manifest: an evaluation has no cases")
        return cls(
            version=json_sha(obj.get("version"), "evaluation"),
            set_sha=json_sha(obj.get("set_sha"), "evaluation"),
            score=float(score),
            cases=tuple(CaseResult.from_dict(case) for case in cases),
            engine=json_str(obj, "engine", "evaluation"),
            base_model=json_str(obj, "base_model", "evaluation"),
            started_at=json_str(obj, "started_at", "evaluation"),
            finished_at=json_str(obj, "finished_at", "evaluation"),
            evaluated_by=json_str(obj, "evaluated_by", "evaluation"),
        )


@dataclass(frozen=True)
class AliasPolicy:
    """What an alias requires of a version before it may point at it."""

    #: The minimum score on the adapter's current evaluation set, in (0, 1].
    min_score: float

    def to_dict(self) -> dict[str, Any]:
        return {"min_score": self.min_score}


def check_min_score(value: object) -> float:
    """A required score: a finite number in (0, 1]; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a minimum score is a number in (0, 1]")
    score = float(value)
    if not math.isfinite(score) or not 0.0 < score <= 1.0:
        raise ValueError(f"a minimum score is a number in (0, 1], got {score!r}")
    return score


def check_case_id(value: object) -> str:
    """A case id: 1-64 ASCII letters, digits, '.', '_' or '-' (ValueError otherwise)."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(
            "a case id is 1-64 ASCII letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return value


def parse_evaluations(raw: object, known: Iterable[str]) -> dict[str, tuple[EvaluationResult, ...]]:
    """The stored `evaluations`: version sha (one the manifest knows, live or revoked) -> its
    results, each naming that version."""
    obj = json_object(raw, "evaluations")
    shas = set(known)
    parsed: dict[str, tuple[EvaluationResult, ...]] = {}
    for sha, results in obj.items():
        if sha not in shas:
            raise IntegrityError("stored manifest: evaluations of an unknown version")
        if not isinstance(results, list) or not 0 < len(results) <= MAX_RESULTS_PER_VERSION:
            raise IntegrityError("stored manifest: evaluations of a version are malformed")
        items = tuple(EvaluationResult.from_dict(result) for result in results)
        if any(result.version != sha for result in items):
            raise IntegrityError("stored manifest: an evaluation is filed under another version")
        parsed[sha] = items
    return parsed


def parse_alias_policies(raw: object) -> dict[str, AliasPolicy]:
    parsed: dict[str, AliasPolicy] = {}
    for alias, policy in json_object(raw, "alias_policies").items():
        try:
            parsed[alias] = AliasPolicy(
                check_min_score(json_object(policy, "policy").get("min_score"))
            )
        except ValueError:
            raise IntegrityError("stored manifest: an alias policy has a bad min_score") from None
    return parsed


def gate(
    *,
    name: str,
    alias: str,
    shas: Iterable[str],
    current_set: EvaluationSetRef | None,
    evaluations: Mapping[str, tuple[EvaluationResult, ...]],
    required: float | None,
    policy: AliasPolicy | None,
) -> None:
    """Refuse (EvaluationRequired, naming the failures) unless every version of `shas` has a
    passing evaluation on the current set: its latest result on that set scores at least the
    larger of `required` (the request's) and the alias's `policy`. Nothing is required when
    both are None."""
    floors = [f for f in (required, policy.min_score if policy else None) if f is not None]
    targets = sorted(set(shas))
    if not floors or not targets:
        return
    floor = max(floors)
    why = f"alias {alias!r} of {name!r} requires an evaluation score >= {floor:g}"
    if policy is not None and policy.min_score >= floor:
        why += " (its policy)"
    if current_set is None:
        raise EvaluationRequired(f"{why}: the adapter has no evaluation set (no evaluation)")
    problems: list[str] = []
    for sha in targets:
        runs = [r for r in evaluations.get(sha, ()) if r.set_sha == current_set.sha]
        if not runs:
            problems.append(
                f"sha256:{sha[:12]}…: no evaluation on the current set {current_set.sha[:12]}…"
            )
            continue
        latest = runs[-1]
        if latest.score < floor:
            failed = ", ".join(f"{c.id} ({c.reason})" for c in latest.failures[:8])
            more = len(latest.failures) - 8
            problems.append(
                f"sha256:{sha[:12]}…: scored {latest.score:g} ({latest.passed}/"
                f"{len(latest.cases)}); failed {failed}{f' and {more} more' if more > 0 else ''}"
            )
    if problems:
        raise EvaluationRequired(f"{why}: " + "; ".join(problems))
