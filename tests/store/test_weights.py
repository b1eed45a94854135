"""Weighted aliases (canaries) in the store: validation, the manifest's JSON, the split and its
stickiness, the end of a canary, revocation, and compare-and-set under concurrent writers.

Expected splits come from the binomial distribution (mean n*p, sd sqrt(n*p*(1-p))), never from
the code under test.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from adapter_store import (
    AdapterNotFound,
    AdapterRef,
    Conflict,
    InvalidAdapter,
    Limits,
    Manifest,
    Registry,
)
from adapter_store.errors import IntegrityError, Quarantined
from adapter_store.local import LocalBackend
from adapter_store.model import AdapterVersion, BaseModelSpec, pick_weighted, route_point
from tests.conftest import AdapterFactory

#: Allowed distance of a realised count from its binomial mean, in standard deviations: a
#: correct split fails about once in 150,000 runs; a split that ignores the weights fails.
SIGMAS = 4.5


def within_binomial(count: int, n: int, p: float) -> bool:
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= SIGMAS * sd


def ref(text: str) -> AdapterRef:
    return AdapterRef.parse(text)


@pytest.fixture
def three(local_registry: Registry, make_test_adapter: AdapterFactory) -> list[AdapterVersion]:
    """Versions v1, v2, v3 of acme/bot; `prod` on v1, `latest` on v3."""
    versions = []
    for seed in (1, 2, 3):
        aliases = ("prod",) if seed == 1 else ()
        versions.append(
            local_registry.upload_dir(
                "acme", "bot", make_test_adapter(seed=seed), created_by="t", aliases=aliases
            )
        )
    return versions


def test_weights_are_stored_and_read_back(
    local_registry: Registry, three: list[AdapterVersion]
) -> None:
    v1, v2, _ = three
    manifest = local_registry.set_alias_weights(
        "acme", "bot", "prod", {v1.version_id: 0.9, v2.sha: 0.1}
    )
    assert manifest.alias_weights == {"prod": {v1.sha: 0.9, v2.sha: 0.1}}
    assert manifest.aliases["prod"] == v1.sha  # the primary: what older readers serve
    assert manifest.split("prod") == {v1.sha: 0.9, v2.sha: 0.1}
    assert manifest.split("latest") == {three[2].sha: 1.0}
    stored = local_registry.get_manifest("acme", "bot")
    assert stored.alias_weights == manifest.alias_weights
    raw = json.loads(stored.to_json())
    assert raw["aliases"]["prod"] == v1.sha  # aliases stays a plain map of strings
    assert raw["alias_weights"] == {"prod": {v1.sha: 0.9, v2.sha: 0.1}}
    # A plain alias (or a weighted alias) named as a version resolves to its sha now.
    manifest = local_registry.set_alias_weights("acme", "bot", "beta", {"latest": 0.5, v1.sha: 0.5})
    assert manifest.alias_weights["beta"] == {three[2].sha: 0.5, v1.sha: 0.5}


def test_a_manifest_without_weights_reads_as_before(three: list[AdapterVersion]) -> None:
    plain = Manifest(
        tenant="acme",
        name="bot",
        versions={v.sha: v for v in three},
        aliases={"prod": three[0].sha},
    )
    data = plain.to_json()
    assert b"alias_weights" not in data  # byte for byte what a writer before canaries wrote
    assert Manifest.from_json(data) == plain


def test_corrupt_weights_are_reported(three: list[AdapterVersion]) -> None:
    v1, v2, v3 = three
    good = {
        "tenant": "acme",
        "name": "bot",
        "status": "active",
        "format": 1,
        "versions": {v.sha: v.to_dict() for v in three},
        "aliases": {"prod": v1.sha},
        "shared_with": [],
        "revoked": [],
    }
    cases: list[object] = [
        [],
        {"prod": {v1.sha: 1.0}},  # one version: should have been plain
        {"prod": {v1.sha: 0.9, "f" * 64: 0.1}},  # no such version
        {"prod": {v1.sha: 0.9, v2.sha: "0.1"}},
        {"prod": {v1.sha: 1.1, v2.sha: -0.1}},
        {"prod": {v1.sha: 0.5, v2.sha: 0.4}},  # sum 0.9
        {"prod": {v1.sha: 0.1, v2.sha: 0.9}},  # aliases does not name the primary
        {"canary": {v1.sha: 0.9, v3.sha: 0.1}},  # not in aliases at all
    ]
    Manifest.from_json(
        json.dumps({**good, "alias_weights": {"prod": {v1.sha: 0.9, v2.sha: 0.1}}}).encode()
    )
    for weights in cases:
        with pytest.raises(IntegrityError):
            Manifest.from_json(json.dumps({**good, "alias_weights": weights}).encode())


def test_bad_weights_are_refused_and_change_nothing(
    spec: BaseModelSpec, tmp_path: Path, make_test_adapter: AdapterFactory
) -> None:
    registry = Registry(
        LocalBackend(tmp_path / "store"), spec, Limits(max_alias_versions=3), spool_dir=tmp_path
    )
    versions = [
        registry.upload_dir("acme", "bot", make_test_adapter(seed=s), created_by="t")
        for s in (1, 2, 3, 4, 5)
    ]
    v1, v2, v3, v4, v5 = (v.sha for v in versions)
    registry.set_alias("acme", "bot", "prod", v1)
    registry.set_alias_weights("acme", "bot", "canary", {v1: 0.5, v2: 0.5})
    registry.revoke("acme", "bot", v5)
    registry.quarantine("acme", "bot", v4, "test")
    before = registry.get_manifest("acme", "bot")
    invalid = [
        {},
        {v1: 0.9, v2: 0.05},  # sum 0.95
        {v1: 0.5, v2: 0.5 + 2e-6},
        {v1: 1.0, v2: 0.0},
        {v1: 1.1, v2: -0.1},
        {v1: math.nan, v2: 0.5},
        {v1: math.inf},
        {v1: 0.25, v2: 0.25, v3: 0.25, "latest": 0.25},  # four versions, the limit is 3
        {v1: 0.5, "prod": 0.5},  # prod is v1: named twice
        {v1: 0.5, "canary": 0.5},  # a weighted alias is no version
        {v1: 0.5, "bad name!": 0.5},
        {v1: 0.5, f"sha256:{v2.upper()}": 0.5},
    ]
    for weights in invalid:
        with pytest.raises(InvalidAdapter):
            registry.set_alias_weights("acme", "bot", "prod", weights)  # type: ignore[arg-type]
    with pytest.raises(InvalidAdapter):
        registry.set_alias_weights("acme", "bot", v1, {v1: 1.0})  # an alias that looks like a sha
    for missing in (v5, "f" * 64, "nope"):  # revoked, never existed, no such alias
        with pytest.raises(AdapterNotFound):
            registry.set_alias_weights("acme", "bot", "prod", {v1: 0.9, missing: 0.1})
    with pytest.raises(Quarantined):
        registry.set_alias_weights("acme", "bot", "prod", {v1: 0.9, v4: 0.1})
    with pytest.raises(AdapterNotFound):
        registry.set_alias_weights("acme", "nobody", "prod", {v1: 1.0})
    after = registry.get_manifest("acme", "bot")
    assert after.to_json() == before.to_json()
    assert after.etag == before.etag
    # Float sums within the tolerance are fine.
    registry.set_alias_weights("acme", "bot", "prod", {v1: 0.7, v2: 0.2, v3: 0.1})


def test_the_split_matches_the_weights_and_is_sticky(three: list[AdapterVersion]) -> None:
    v1, v2, v3 = three
    weights = {v1.sha: 0.6, v2.sha: 0.3, v3.sha: 0.1}
    manifest = Manifest(
        tenant="acme",
        name="bot",
        versions={v.sha: v for v in three},
        aliases={"prod": v1.sha},
        alias_weights={"prod": weights},
    )
    n = 6000
    picked = [
        manifest.resolve(ref("bot@prod"), caller="acme", routing_key=f"session-{i}").sha
        for i in range(n)
    ]
    for sha, p in weights.items():
        assert within_binomial(picked.count(sha), n, p), (picked.count(sha), n, p)
    # Sticky: the same key, the same version, every time; another caller tenant draws anew.
    for i in range(20):
        key = f"session-{i}"
        again = {
            manifest.resolve(ref("bot@prod"), caller="acme", routing_key=key).sha for _ in range(20)
        }
        assert again == {picked[i]}
    other = [
        manifest.resolve(ref("acme/bot@prod"), caller="globex", routing_key=f"session-{i}").sha
        for i in range(n)
    ]
    assert other != picked
    # No routing key (compose parts, pins, the warm set): the primary version.
    assert manifest.resolve(ref("bot@prod")).sha == v1.sha
    # An exact version and other aliases are untouched by the weights.
    assert manifest.resolve(ref(f"bot@{v3.version_id}"), routing_key="x").sha == v3.sha


def test_raising_the_canary_only_moves_keys_onto_it(three: list[AdapterVersion]) -> None:
    stable, canary = sorted(v.sha for v in three[:2])
    for low, high in ((0.1, 0.3), (0.3, 0.9)):
        for i in range(2000):
            point = route_point("acme", "acme", "bot", "prod", str(i))
            before = pick_weighted({stable: 1 - low, canary: low}, point)
            after = pick_weighted({stable: 1 - high, canary: high}, point)
            assert before == after or after == canary


def test_one_version_ends_the_canary(
    local_registry: Registry, three: list[AdapterVersion], make_test_adapter: AdapterFactory
) -> None:
    v1, v2, v3 = three
    r = local_registry
    r.set_alias_weights("acme", "bot", "prod", {v1.sha: 0.9, v2.sha: 0.1})
    manifest = r.set_alias_weights("acme", "bot", "prod", {v2.sha: 1.0})
    assert manifest.alias_weights == {}
    assert manifest.aliases["prod"] == v2.sha
    assert b"alias_weights" not in r.get_manifest("acme", "bot").to_json()
    # SetAlias ends it too; a compare-and-set on a weighted alias expects no single version.
    r.set_alias_weights("acme", "bot", "prod", {v1.sha: 0.9, v2.sha: 0.1})
    with pytest.raises(Conflict, match="not the expected"):
        r.set_alias("acme", "bot", "prod", v2.sha, expected=v1.sha)
    manifest = r.set_alias("acme", "bot", "prod", v2.sha)
    assert (manifest.alias_weights, manifest.aliases["prod"]) == ({}, v2.sha)
    # An upload moving `latest` (and its aliases) makes them plain.
    r.set_alias_weights("acme", "bot", "latest", {v1.sha: 0.5, v3.sha: 0.5})
    r.set_alias_weights("acme", "bot", "prod", {v1.sha: 0.5, v3.sha: 0.5})
    v4 = r.upload_dir("acme", "bot", make_test_adapter(seed=4), created_by="t")
    manifest = r.get_manifest("acme", "bot")
    assert manifest.aliases["latest"] == v4.sha
    assert list(manifest.alias_weights) == ["prod"]
    # Removing the alias removes its weights.
    assert r.remove_alias("acme", "bot", "prod").alias_weights == {}


def test_revoking_a_weighted_version(local_registry: Registry, three: list[AdapterVersion]) -> None:
    v1, v2, v3 = three
    r = local_registry
    r.set_alias_weights("acme", "bot", "prod", {v1.sha: 0.5, v2.sha: 0.3, v3.sha: 0.2})
    r.set_alias_weights("acme", "bot", "pair", {v1.sha: 0.9, v2.sha: 0.1})
    r.revoke("acme", "bot", v2.sha)
    manifest = r.get_manifest("acme", "bot")
    # The rest keep their proportions; a pair left with one version is plain.
    assert manifest.alias_weights.keys() == {"prod"}
    assert manifest.split("prod") == pytest.approx({v1.sha: 0.5 / 0.7, v3.sha: 0.2 / 0.7})
    assert manifest.aliases["pair"] == v1.sha
    r.revoke("acme", "bot", v1.sha)
    manifest = r.get_manifest("acme", "bot")
    assert (manifest.alias_weights, manifest.aliases["prod"]) == ({}, v3.sha)
    assert "pair" not in manifest.aliases


def test_concurrent_weight_writes_with_expected_lose_nothing(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    """Writers on the same alias each move 0.01 of the weight to the canary by compare-and-set
    (read the split, write with it as `expected`, retry on Conflict): every move must count."""
    stable = registry.upload_dir("acme", "bot", make_test_adapter(seed=1), created_by="t").sha
    canary = registry.upload_dir("acme", "bot", make_test_adapter(seed=2), created_by="t").sha
    registry.set_alias_weights("acme", "bot", "prod", {stable: 0.95, canary: 0.05})
    writers, moves = 4, 5
    conflicts = [0]
    failures: list[BaseException] = []
    start = threading.Barrier(writers)

    def writer() -> None:
        start.wait()
        try:
            for _ in range(moves):
                while True:
                    split = registry.get_manifest("acme", "bot").split("prod")
                    share = split[canary] + 0.01
                    try:
                        registry.set_alias_weights(
                            "acme",
                            "bot",
                            "prod",
                            {stable: 1 - share, canary: share},
                            expected=split,
                        )
                        break
                    except Conflict:
                        conflicts[0] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    split = registry.get_manifest("acme", "bot").split("prod")
    assert split[canary] == pytest.approx(0.05 + writers * moves * 0.01, abs=1e-9)
    # The expectation is checked: a stale one is refused and changes nothing.
    with pytest.raises(Conflict):
        registry.set_alias_weights(
            "acme", "bot", "prod", {stable: 0.5, canary: 0.5}, expected={stable: 0.95, canary: 0.05}
        )
    with pytest.raises(Conflict):
        registry.set_alias_weights("acme", "bot", "prod", {stable: 1.0}, expected={})
    assert registry.get_manifest("acme", "bot").split("prod") == split
    # {} expects no alias: a create-if-absent.
    registry.set_alias_weights("acme", "bot", "fresh", {stable: 1.0}, expected={})
