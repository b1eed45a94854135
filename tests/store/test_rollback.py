"""Automatic rollback in the store: which version of a split is stable, the policy and its
checks, the conditional rollback write (two writers at once make one move), the scheduled
evaluation's claim, and the JSON (manifests without any of it read and write as before).

Runs on both backends (a local folder, SeaweedFS over HTTP) where a write's condition matters.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from adapter_store import InvalidAdapter, Manifest, Registry
from adapter_store.errors import IntegrityError
from adapter_store.evaluations import CaseResult, EvaluationResult
from adapter_store.model import AdapterVersion
from adapter_store.rollback import RollbackPolicy, RollbackRecord
from tests.conftest import AdapterFactory

POLICY = RollbackPolicy(max_error_rate=0.2, min_requests=5, window_s=60.0)


def _three(registry: Registry, make: AdapterFactory) -> list[AdapterVersion]:
    """v1 (alias prod), v2, v3 of acme/bot."""
    return [
        registry.upload_dir(
            "acme", "bot", make(seed=seed), created_by="t", aliases=("prod",) if seed == 1 else ()
        )
        for seed in (1, 2, 3)
    ]


def _record(stable: str, canary: str, split: dict[str, float], by: str = "a") -> RollbackRecord:
    return RollbackRecord(
        at="2026-01-01T00:00:00Z",
        at_us=1_767_225_600_000_000,
        canary=canary,
        stable=stable,
        split=split,
        reason="error_rate",
        value=0.5,
        threshold=0.2,
        requests=10,
        by=by,
    )


def test_the_stable_version_is_the_one_before_the_split(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    r = local_registry
    v1, v2, v3 = (v.sha for v in _three(r, make_test_adapter))
    assert r.set_alias_weights("acme", "bot", "prod", {v1: 0.9, v2: 0.1}).alias_stable == {
        "prod": v1
    }
    # Weight moves between the same versions (even past half) keep it; a third version too.
    assert r.set_alias_weights("acme", "bot", "prod", {v1: 0.2, v2: 0.8}).alias_stable == {
        "prod": v1
    }
    split3 = {v1: 0.5, v2: 0.25, v3: 0.25}
    assert r.set_alias_weights("acme", "bot", "prod", split3).alias_stable == {"prod": v1}
    # A split without it has none, nor does one that stays without it.
    assert r.set_alias_weights("acme", "bot", "prod", {v2: 0.5, v3: 0.5}).alias_stable == {}
    assert r.set_alias_weights("acme", "bot", "prod", {v2: 0.6, v3: 0.4}).alias_stable == {}
    # A plain alias again (SetAlias, all weight on one version) has none.
    r.set_alias("acme", "bot", "prod", v2)
    assert r.set_alias_weights("acme", "bot", "prod", {v2: 0.7, v3: 0.3}).alias_stable == {
        "prod": v2
    }
    assert r.set_alias_weights("acme", "bot", "prod", {v3: 1.0}).alias_stable == {}
    # A split made where there was no alias has no stable version.
    assert r.set_alias_weights("acme", "bot", "fresh", {v1: 0.5, v2: 0.5}).alias_stable == {}
    # Revoking the stable version, an upload moving the alias, removing it: gone.
    r.set_alias("acme", "bot", "a", v1)
    r.set_alias_weights("acme", "bot", "a", {v1: 0.5, v2: 0.5})
    r.set_alias("acme", "bot", "b", v2)
    r.set_alias_weights("acme", "bot", "b", {v2: 0.5, v3: 0.5})
    r.set_alias("acme", "bot", "c", v3)
    r.set_alias_weights("acme", "bot", "c", {v3: 0.5, v1: 0.5})
    assert r.get_manifest("acme", "bot").alias_stable == {"a": v1, "b": v2, "c": v3}
    r.remove_alias("acme", "bot", "c")
    r.upload_dir("acme", "bot", make_test_adapter(seed=4), created_by="t", aliases=("b",))
    assert r.get_manifest("acme", "bot").alias_stable == {"a": v1}
    r.revoke("acme", "bot", v1)
    assert r.get_manifest("acme", "bot").alias_stable == {}


def test_a_manifest_without_rollback_fields_reads_and_writes_as_before(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    v1, v2, _ = (v.sha for v in _three(local_registry, make_test_adapter))
    plain = local_registry.get_manifest("acme", "bot")
    raw = json.loads(plain.to_json())
    assert not {"alias_stable", "rollback_policies", "rollbacks", "evaluation_claims"} & set(raw)
    assert Manifest.from_json(plain.to_json()).to_json() == plain.to_json()
    local_registry.set_alias_weights("acme", "bot", "prod", {v1: 0.9, v2: 0.1})
    manifest = local_registry.set_rollback_policy("acme", "bot", "prod", POLICY)
    raw = json.loads(manifest.to_json())
    assert raw["alias_stable"] == {"prod": v1}
    assert raw["rollback_policies"] == {
        "prod": {
            "max_error_rate": 0.2,
            "min_requests": 5,
            "window_s": 60.0,
            "eval_interval_s": 3600.0,
        }
    }
    again = Manifest.from_json(manifest.to_json())
    assert (again.alias_stable, again.rollback_policies) == ({"prod": v1}, {"prod": POLICY})
    # Read strictly: a stable version outside its split, a policy out of range.
    bad = dict(raw, alias_stable={"prod": "f" * 64})
    with pytest.raises(IntegrityError, match="not in its split"):
        Manifest.from_json(json.dumps(bad).encode())
    bad = dict(raw, rollback_policies={"prod": {"max_error_rate": 2.0}})
    with pytest.raises(IntegrityError, match="max_error_rate"):
        Manifest.from_json(json.dumps(bad).encode())


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, "at least one of"),
        ({"max_error_rate": 1.0}, "max_error_rate must be in [0, 1)"),
        ({"max_error_rate": -0.1}, "max_error_rate must be in [0, 1)"),
        ({"max_error_rate": float("nan")}, "finite"),
        ({"max_error_rate": True}, "max_error_rate must be a number"),
        ({"max_length_rate": 1.5}, "max_length_rate must be in [0, 1)"),
        ({"min_eval_score": 0.0}, "min_eval_score must be in (0, 1]"),
        ({"min_eval_score": 1.01}, "min_eval_score must be in (0, 1]"),
        ({"max_error_rate": 0.1, "min_requests": -1}, "min_requests must be in [1, 100000]"),
        ({"max_error_rate": 0.1, "min_requests": 10**6}, "min_requests must be in [1, 100000]"),
        ({"max_error_rate": 0.1, "min_requests": 2.5}, "min_requests must be an integer"),
        ({"max_error_rate": 0.1, "window_s": -5}, "window_s must be in (0, 86400]"),
        ({"max_error_rate": 0.1, "window_s": 86401}, "window_s must be in (0, 86400]"),
        ({"min_eval_score": 0.5, "eval_interval_s": 30}, "eval_interval_s must be in [60, "),
        ({"min_eval_score": 0.5, "eval_interval_s": float("inf")}, "finite"),
    ],
)
def test_bad_policy_values_are_named(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidAdapter, match=f"rollback policy: .*{_escape(reason)}"):
        RollbackPolicy.check(min_eval_interval_s=60.0, **fields)  # type: ignore[arg-type]


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_defaults_fill_zero_counts_and_durations() -> None:
    policy = RollbackPolicy.check(max_error_rate=0.0)
    assert (policy.min_requests, policy.window_s, policy.eval_interval_s) == (20, 300.0, 3600.0)
    assert policy.describe() == "error rate > 0 over 300s (>= 20 calls)"


def test_a_refused_policy_changes_nothing(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    _three(local_registry, make_test_adapter)
    before = local_registry.get_manifest("acme", "bot")
    for alias in ("../x", "sha256:" + "a" * 64, ""):
        with pytest.raises(InvalidAdapter):
            local_registry.set_rollback_policy("acme", "bot", alias, POLICY)
    with pytest.raises(InvalidAdapter):
        local_registry.set_rollback_policy("acme", "bot", "prod", {"max_error_rate": 0.1})  # type: ignore[arg-type]
    after = local_registry.get_manifest("acme", "bot")
    assert (after.to_json(), after.etag) == (before.to_json(), before.etag)
    # Set, then removed; removing again writes nothing.
    local_registry.set_rollback_policy("acme", "bot", "prod", POLICY)
    removed = local_registry.set_rollback_policy("acme", "bot", "prod", None)
    assert removed.rollback_policies == {}
    assert local_registry.set_rollback_policy("acme", "bot", "prod", None).etag == removed.etag


def test_rollback_is_conditional_and_two_writers_make_one_move(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    v1, v2, v3 = (v.sha for v in _three(registry, make_test_adapter))
    split = {v1: 0.5, v2: 0.5}
    registry.set_alias_weights("acme", "bot", "prod", split)
    # No policy: nothing moves.
    _, done = registry.rollback("acme", "bot", "prod", split, _record(v1, v2, split))
    assert not done
    registry.set_rollback_policy("acme", "bot", "prod", POLICY)
    # A split other than the one decided on (the tenant changed it): nothing written.
    stale = {v1: 0.9, v2: 0.1}
    before = registry.get_manifest("acme", "bot")
    manifest, done = registry.rollback("acme", "bot", "prod", stale, _record(v1, v2, stale))
    assert not done
    assert manifest.etag == before.etag
    # Two replicas deciding at once: one move; the loser re-reads and sees it done.
    outcomes: list[bool] = []
    start = threading.Barrier(2)

    def replica(by: str) -> None:
        start.wait()
        outcomes.append(
            registry.rollback("acme", "bot", "prod", split, _record(v1, v2, split, by))[1]
        )

    threads = [threading.Thread(target=replica, args=(by,)) for by in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False, True]
    after = registry.get_manifest("acme", "bot")
    assert after.split("prod") == {v1: 1.0}
    assert after.alias_weights == {}
    assert after.alias_stable == {}
    assert after.rollback_policies == {"prod": POLICY}  # the policy stays for the next canary
    record = after.rollbacks["prod"]
    assert (record.canary, record.stable, record.split, record.reason) == (
        v2,
        v1,
        split,
        "error_rate",
    )
    assert record.by in ("a", "b")
    assert Manifest.from_json(after.to_json()).rollbacks == after.rollbacks
    # A stable version that is not active is no target.
    registry.set_alias_weights("acme", "bot", "prod", {v1: 0.5, v3: 0.5})
    registry.quarantine("acme", "bot", v1, "test")
    _, done = registry.rollback("acme", "bot", "prod", {v1: 0.5, v3: 0.5}, _record(v1, v3, {}))
    assert not done


def test_one_evaluation_claim_per_interval(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    v1, v2, v3 = (v.sha for v in _three(registry, make_test_adapter))
    registry.set_alias_weights("acme", "bot", "prod", {v1: 0.5, v2: 0.5})
    # No evaluation set: nothing to claim.
    assert not registry.claim_evaluation("acme", "bot", v2, interval_s=60, by="a")[1]
    data = b'{"cases":[]}'
    registry.put_evaluation_set("acme", "bot", data, cases=1, uploaded_by="t")
    # Not a canary (the stable version, a version in no split): never claimed.
    assert not registry.claim_evaluation("acme", "bot", v1, interval_s=60, by="a")[1]
    assert not registry.claim_evaluation("acme", "bot", v3, interval_s=60, by="a")[1]
    manifest, taken = registry.claim_evaluation("acme", "bot", v2, interval_s=60, by="a")
    assert taken
    assert manifest.evaluation_claims[v2].by == "a"
    # Another replica within the interval: not taken, nothing written.
    again, taken = registry.claim_evaluation("acme", "bot", v2, interval_s=60, by="b")
    assert not taken
    assert again.etag == manifest.etag
    # Past the interval (0 here), taken again.
    assert registry.claim_evaluation("acme", "bot", v2, interval_s=0, by="b")[1]
    # A result on the current set that finished within the interval: not taken either (v3,
    # the canary of another alias, never claimed yet); one that finished before it: taken.
    registry.set_alias("acme", "bot", "beta", v1)
    registry.set_alias_weights("acme", "bot", "beta", {v1: 0.5, v3: 0.5})
    current = registry.get_manifest("acme", "bot").evaluation_set
    assert current is not None
    now = datetime.now(UTC)
    result = EvaluationResult(
        version=v3,
        set_sha=current.sha,
        score=1.0,
        cases=(CaseResult("c", True),),
        engine="e",
        base_model="m",
        started_at=_rfc3339(now),
        finished_at=_rfc3339(now),
        evaluated_by="t",
    )
    registry.add_evaluation("acme", "bot", result)
    assert not registry.claim_evaluation("acme", "bot", v3, interval_s=3600, by="c")[1]
    registry.add_evaluation("acme", "bot", replace(result, finished_at=_rfc3339(now - HOURS_2)))
    assert registry.claim_evaluation("acme", "bot", v3, interval_s=3600, by="c")[1]
    # Claims of versions that are no canary any more are dropped at the next claim.
    registry.set_alias("acme", "bot", "prod", v1)
    manifest = registry.get_manifest("acme", "bot")
    assert set(manifest.evaluation_claims) == {v2, v3}
    manifest, taken = registry.claim_evaluation("acme", "bot", v3, interval_s=0, by="a")
    assert taken
    assert set(manifest.evaluation_claims) == {v3}


HOURS_2 = timedelta(hours=2)


def _rfc3339(when: datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")
