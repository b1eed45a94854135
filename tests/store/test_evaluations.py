"""The store's side of evaluations (adapter_store.evaluations): the manifest fields, the set
objects, append-only results and the gate inside the alias writes (a local folder store; the
gateway's side runs end to end in tests/api/test_evaluations.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from adapter_store import Manifest, Registry
from adapter_store.errors import (
    AdapterNotFound,
    CapacityExceeded,
    EvaluationRequired,
    IntegrityError,
    InvalidAdapter,
)
from adapter_store.evaluations import (
    MAX_RESULTS_PER_VERSION,
    CaseResult,
    EvaluationResult,
)
from tests.conftest import AdapterFactory


def result(sha: str, set_sha: str, passed: list[bool]) -> EvaluationResult:
    cases = tuple(
        CaseResult(f"c{i}", ok, "" if ok else "expected 'a', got 'b'")
        for i, ok in enumerate(passed)
    )
    return EvaluationResult(
        version=sha,
        set_sha=set_sha,
        score=sum(passed) / len(passed),
        cases=cases,
        engine="engine",
        base_model="base",
        started_at="2026-01-01T00:00:00Z",
        finished_at="2026-01-01T00:00:01Z",
        evaluated_by="acme:admin",
    )


@pytest.fixture
def two(local_registry: Registry, make_test_adapter: AdapterFactory) -> tuple[str, str]:
    a = local_registry.upload_dir("acme", "bot", make_test_adapter(seed=1), created_by="t")
    b = local_registry.upload_dir("acme", "bot", make_test_adapter(seed=2), created_by="t")
    return a.sha, b.sha


def test_manifest_without_evaluations_reads_and_writes_as_before(
    local_registry: Registry, two: tuple[str, str]
) -> None:
    manifest = local_registry.get_manifest("acme", "bot")
    stored = json.loads(manifest.to_json())
    assert not {"evaluation_set", "evaluations", "alias_policies"} & set(stored)
    again = Manifest.from_json(manifest.to_json())
    assert (again.evaluation_set, again.evaluations, again.alias_policies) == (None, {}, {})


def test_set_object_results_and_policies_round_trip(
    local_registry: Registry, two: tuple[str, str], tmp_path: Path
) -> None:
    a, b = two
    data = b'{"cases":[{"check":{"exact":"x"},"id":"c0","max_tokens":4,"prompt":"p"}]}'
    sha = hashlib.sha256(data).hexdigest()
    manifest = local_registry.put_evaluation_set("acme", "bot", data, cases=1, uploaded_by="u")
    assert manifest.evaluation_set is not None
    assert manifest.evaluation_set.sha == sha
    key = f"tenants/acme/adapters/bot/evaluation-sets/{sha}.json"
    assert local_registry.backend.get(key)[0] == data
    assert local_registry.evaluation_set("acme", "bot", sha) == data
    first = result(a, sha, [True, False])
    local_registry.add_evaluation("acme", "bot", first)
    second = result(a, sha, [True, True])
    local_registry.add_evaluation("acme", "bot", second)
    local_registry.set_alias_policy("acme", "bot", "prod", 0.5)
    read = local_registry.get_manifest("acme", "bot")
    assert read.evaluations == {a: (first, second)}  # appended, the first unchanged
    assert read.alias_policies["prod"].min_score == 0.5
    assert Manifest.from_json(read.to_json()).evaluations == read.evaluations
    # Tampered bytes are refused, never parsed.
    local_registry.backend.put(key, data + b" ")
    with pytest.raises(IntegrityError, match="does not match"):
        local_registry.evaluation_set("acme", "bot", sha)
    # A stored result filed under another version is refused when read.
    raw = json.loads(read.to_json())
    raw["evaluations"][b] = raw["evaluations"].pop(a)
    with pytest.raises(IntegrityError, match="another version"):
        Manifest.from_json(json.dumps(raw).encode())


def test_results_are_capped_and_need_a_live_version(
    local_registry: Registry, two: tuple[str, str]
) -> None:
    a, b = two
    set_sha = "e" * 64
    for _ in range(MAX_RESULTS_PER_VERSION):
        local_registry.add_evaluation("acme", "bot", result(a, set_sha, [True]))
    before = local_registry.get_manifest("acme", "bot").evaluations
    with pytest.raises(CapacityExceeded, match="never rewritten"):
        local_registry.add_evaluation("acme", "bot", result(a, set_sha, [True]))
    assert local_registry.get_manifest("acme", "bot").evaluations == before
    local_registry.revoke("acme", "bot", b)
    with pytest.raises(AdapterNotFound):
        local_registry.add_evaluation("acme", "bot", result(b, set_sha, [True]))


def test_gate_in_the_alias_writes(local_registry: Registry, two: tuple[str, str]) -> None:
    a, b = two
    with pytest.raises(EvaluationRequired, match="no evaluation set"):
        local_registry.set_alias("acme", "bot", "prod", a, require_eval_min_score=1.0)
    manifest = local_registry.put_evaluation_set(
        "acme", "bot", b'{"cases":[]}', cases=1, uploaded_by="u"
    )
    assert manifest.evaluation_set is not None
    set_sha = manifest.evaluation_set.sha
    local_registry.add_evaluation("acme", "bot", result(a, set_sha, [True, True]))
    local_registry.add_evaluation("acme", "bot", result(b, set_sha, [True, False]))
    local_registry.add_evaluation("acme", "bot", result(b, "f" * 64, [True, True]))  # old set
    local_registry.set_alias("acme", "bot", "prod", a, require_eval_min_score=1.0)
    with pytest.raises(EvaluationRequired, match=r"scored 0.5 \(1/2\); failed c1"):
        local_registry.set_alias("acme", "bot", "prod", b, require_eval_min_score=1.0)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(InvalidAdapter, match="require_eval_min_score"):
            local_registry.set_alias("acme", "bot", "prod", b, require_eval_min_score=bad)
    # With a policy, weights that add B are refused; once B is in, shifting is not gated.
    local_registry.set_alias_weights("acme", "bot", "prod", {a: 0.9, b: 0.1})
    local_registry.set_alias_policy("acme", "bot", "prod", 1.0)
    local_registry.set_alias_weights("acme", "bot", "prod", {a: 0.5, b: 0.5})
    local_registry.set_alias_weights("acme", "bot", "prod", {a: 1.0})
    with pytest.raises(EvaluationRequired, match="its policy"):
        local_registry.set_alias_weights("acme", "bot", "prod", {a: 0.9, b: 0.1})
    assert local_registry.get_manifest("acme", "bot").split("prod") == {a: 1.0}
    local_registry.set_alias_policy("acme", "bot", "prod", None)
    local_registry.set_alias("acme", "bot", "prod", b)


def test_whole_revoke_deletes_the_sets(
    local_registry: Registry, two: tuple[str, str], make_test_adapter: AdapterFactory
) -> None:
    local_registry.put_evaluation_set("acme", "bot", b'{"cases":[]}', cases=1, uploaded_by="u")
    local_registry.set_alias_policy("acme", "bot", "prod", 1.0)
    prefix = "tenants/acme/adapters/bot/evaluation-sets/"
    assert len(local_registry.backend.list(prefix)) == 1
    local_registry.revoke("acme", "bot", delete_objects=False)
    assert local_registry.backend.list(prefix) == []
    # An adapter made again under the name starts without the old set or policy.
    local_registry.upload_dir("acme", "bot", make_test_adapter(seed=3), created_by="t")
    again = local_registry.get_manifest("acme", "bot")
    assert (again.evaluation_set, again.alias_policies) == (None, {})
