"""The automatic rollback's rules without an engine: which calls count (`CallWindows`) and
when a canary is rolled back (`decide`). Manifests are built by hand; the expected decisions
are worked out here from the documented rules (docs/lifecycle.md "Automatic rollback").
The end-to-end tests are tests/api/test_rollback.py, tests/api/test_evaluations.py and
tests/test_replicas.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from adapter_store.evaluations import CaseResult, EvaluationResult, EvaluationSetRef
from adapter_store.model import AdapterVersion, FileEntry, Manifest, version_sha
from adapter_store.rollback import RollbackPolicy, RollbackRecord
from lora_gateway.metrics import VersionCall
from lora_gateway.rollback import CallWindows, Decision, WindowStats, decide

NOW = 1_000_000.0


def _version(seed: int) -> AdapterVersion:
    files = (FileEntry("adapter_config.json", seed, f"{seed:064x}"),)
    return AdapterVersion(
        tenant="acme",
        name="bot",
        sha=version_sha(files),
        files=files,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        base_model="m",
        dtype="float32",
        created_at="2026-01-01T00:00:00Z",
        created_by="t",
    )


STABLE, CANARY, OTHER = _version(1), _version(2), _version(3)
S, C, OTHER_SHA = STABLE.sha, CANARY.sha, OTHER.sha


def _manifest(policy: RollbackPolicy | None = None, **changes: object) -> Manifest:
    manifest = Manifest(
        tenant="acme",
        name="bot",
        versions={v.sha: v for v in (STABLE, CANARY, OTHER)},
        aliases={"prod": S},
        alias_weights={"prod": {S: 0.8, C: 0.2}},
        alias_stable={"prod": S},
        rollback_policies={"prod": policy or RollbackPolicy(max_error_rate=0.2, min_requests=5)},
    )
    return replace(manifest, **changes)  # type: ignore[arg-type]


def _call(sha: str, code: str = "OK", *, tenant: str = "acme", **changes: object) -> VersionCall:
    call = VersionCall(
        tenant=tenant,
        owner="acme",
        name="bot",
        version=f"sha256:{sha}",
        code=code,
        seconds=0.01,
        ttft_seconds=None,
        completion_tokens=1,
        finish_reason="stop",
    )
    return replace(call, **changes)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _decide(manifest: Manifest, windows: CallWindows, now: float = NOW) -> Decision | None:
    policy = manifest.rollback_policies["prod"]

    def stats(sha: str, since: float) -> WindowStats:
        return windows.stats("acme", "bot", sha, since)

    return decide(manifest, "prod", policy, stats, now)


def test_which_calls_count() -> None:
    """Server-side failures count as errors; the caller's mistakes, a grantee's calls,
    evaluations and versions no policy watches are not counted at all or not as errors."""
    clock = Clock()
    windows = CallWindows(clock=clock)
    manifest = _manifest()
    for code in ("INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE"):
        windows.record(_call(C, code), manifest)
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED"):
        windows.record(_call(C, code), manifest)
    for code in ("DEADLINE_EXCEEDED", "ABORTED", "FAILED_PRECONDITION"):
        windows.record(_call(C, code), manifest)
    windows.record(_call(C, "INTERNAL", finish_reason="length"), manifest)
    assert windows.stats("acme", "bot", C, 0) == WindowStats(requests=13, errors=5, lengths=1)
    windows.record(_call(C, "INTERNAL", tenant="globex"), manifest)  # a grantee's call
    windows.record(_call(C, "INTERNAL", evaluation=True), manifest)  # an evaluation case
    windows.record(_call(OTHER_SHA, "INTERNAL"), manifest)  # in no watched split
    windows.record(_call(C, "INTERNAL"), None)  # no manifest cached
    without = replace(manifest, rollback_policies={})
    windows.record(_call(C, "INTERNAL"), without)  # no policy
    assert windows.stats("acme", "bot", C, 0).requests == 13
    assert windows.stats("acme", "bot", OTHER_SHA, 0).requests == 0
    # The window: calls before `since` do not count; `keep` forgets the others.
    clock.now = NOW + 10
    windows.record(_call(C), manifest)
    assert windows.stats("acme", "bot", C, NOW + 5).requests == 1
    windows.keep({("acme", "bot", S)})
    assert windows.stats("acme", "bot", C, 0).requests == 0
    # At most `most` calls per version.
    small = CallWindows(most=3, clock=clock)
    for _ in range(5):
        small.record(_call(C, "INTERNAL"), manifest)
    assert small.stats("acme", "bot", C, 0).requests == 3


def test_error_rate_rule() -> None:
    windows = CallWindows(clock=Clock())
    manifest = _manifest()
    # Below min_requests (5): nothing, however bad.
    for _ in range(4):
        windows.record(_call(C, "INTERNAL"), manifest)
    assert _decide(manifest, windows) is None
    windows.record(_call(C), manifest)  # 4 errors of 5: 0.8 > 0.2
    assert _decide(manifest, windows) == Decision("prod", C, S, "error_rate", 0.8, 0.2, 5)
    # Not above the stable version's own error rate (the whole engine fails): nothing.
    for _ in range(5):
        windows.record(_call(S, "UNAVAILABLE"), manifest)
    assert _decide(manifest, windows) is None
    # Exactly at the threshold is not above it.
    healthy = CallWindows(clock=Clock())
    for code in ("INTERNAL", "OK", "OK", "OK", "OK"):
        healthy.record(_call(C, code), manifest)
    assert _decide(manifest, healthy) is None


def test_calls_before_the_last_rollback_or_the_window_do_not_count() -> None:
    clock = Clock()
    windows = CallWindows(clock=clock)
    manifest = _manifest()
    for _ in range(5):
        windows.record(_call(C, "INTERNAL"), manifest)
    assert _decide(manifest, windows) is not None
    # The canary was rolled back (on some replica) after these calls, and split again.
    last = RollbackRecord(
        at="", at_us=int((NOW + 1) * 1e6), canary=C, stable=S, reason="error_rate", by="b"
    )
    assert _decide(replace(manifest, rollbacks={"prod": last}), windows, NOW + 2) is None
    # Past the window (300 s by default).
    assert _decide(manifest, windows, NOW + 301) is None


def test_length_rule_evaluation_rule_and_quarantine() -> None:
    windows = CallWindows(clock=Clock())
    policy = RollbackPolicy(max_length_rate=0.5, min_requests=4, min_eval_score=0.9)
    manifest = _manifest(policy)
    for finish in ("length", "length", "stop", "stop"):
        windows.record(_call(C, finish_reason=finish), manifest)
    assert _decide(manifest, windows) is None  # 0.5 is not above 0.5
    windows.record(_call(C, finish_reason="length"), manifest)
    assert _decide(manifest, windows) == Decision("prod", C, S, "length_rate", 0.6, 0.5, 5)
    # The latest evaluation on the current set, below the score.
    fresh = CallWindows(clock=Clock())
    current = EvaluationSetRef("a" * 64, 1, "", "")
    result = EvaluationResult(C, current.sha, 0.5, (CaseResult("x", False),), "", "", "", "", "")
    passed = replace(result, score=1.0)
    scored = replace(manifest, evaluation_set=current, evaluations={C: (result,)})
    assert _decide(scored, fresh) == Decision("prod", C, S, "evaluation", 0.5, 0.9)
    assert _decide(replace(scored, evaluations={C: (result, passed)}), fresh) is None
    old_set = replace(scored, evaluation_set=replace(current, sha="b" * 64))
    assert _decide(old_set, fresh) is None  # a result on another set does not count
    # A quarantined canary, with any policy.
    quarantined = {**manifest.versions, C: replace(CANARY, status="quarantined")}
    decision = _decide(replace(manifest, versions=quarantined), fresh)
    assert decision is not None
    assert decision.reason == "quarantined"


@pytest.mark.parametrize(
    "changes",
    [
        {"alias_stable": {}},  # no stable version: nothing to roll back to
        {"alias_weights": {}, "alias_stable": {}},  # not split
        {"versions": {S: replace(STABLE, status="quarantined"), C: CANARY}},  # stable unusable
    ],
)
def test_nothing_to_roll_back_to(changes: dict[str, object]) -> None:
    windows = CallWindows(clock=Clock())
    manifest = _manifest()
    for _ in range(10):
        windows.record(_call(C, "INTERNAL"), manifest)
    assert _decide(manifest, windows) is not None
    assert _decide(replace(manifest, **changes), windows) is None  # type: ignore[arg-type]
