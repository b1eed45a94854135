"""Per-version metrics bookkeeping (`metrics.VersionSeries`), without an engine: the label
bound, versions leaving the set, and GetAdapter's recent summary. The end-to-end checks
through the real gateway are in tests/api/test_version_metrics.py."""

from __future__ import annotations

from collections.abc import Collection

from lora_gateway.metrics import Metrics, VersionCall
from tests.support.metrics import sample

OWNER, NAME = "acme", "bot"
ADAPTER = "acme/bot"
REQUESTS = "lora_gateway_version_requests_total"


def version(i: int) -> str:
    return f"sha256:{i:064x}"


def call(v: str, *, tenant: str = "acme", code: str = "OK", seconds: float = 0.1) -> VersionCall:
    ok = code == "OK"
    return VersionCall(
        tenant=tenant,
        owner=OWNER,
        name=NAME,
        version=v,
        code=code,
        seconds=seconds,
        ttft_seconds=seconds / 2 if ok else None,
        completion_tokens=3 if ok else 0,
        finish_reason="length" if ok else None,
    )


def counts(m: Metrics, adapter: str = ADAPTER) -> dict[str, float]:
    """version label -> requests, summed over tenants and codes, from the registry's samples."""
    out: dict[str, float] = {}
    for family in m.registry.collect():
        for s in family.samples:
            if s.name == REQUESTS and s.labels["adapter"] == adapter:
                out[s.labels["version"]] = out.get(s.labels["version"], 0) + s.value
    return out


def series_versions(m: Metrics) -> set[str]:
    """Every `version` label value of every lora_gateway_version_* series."""
    return {
        s.labels["version"]
        for family in m.registry.collect()
        if family.name.startswith("lora_gateway_version_")
        for s in family.samples
    }


def test_the_version_label_bound_holds_and_counts_sum() -> None:
    most = 3
    m = Metrics(process_metrics=False, version_metrics_max=most, version_metrics_window_s=60)
    aliased = {version(0)}
    made = 0
    for i in range(20):
        for _ in range(2):
            m.version_done(call(version(i)), aliased, now=float(made))
            made += 1
            assert len(series_versions(m)) <= most + len(aliased) + 1
    seen = counts(m)
    assert sum(seen.values()) == made == 40
    # the aliased version, the first `most` others, and "other" for the 16 that came later
    assert seen == {
        version(0): 2,
        version(1): 2,
        version(2): 2,
        version(3): 2,
        "other": 32,
    }
    assert m.versions.labelled(OWNER, NAME) == {version(i) for i in range(4)}


def test_versions_leave_the_set_and_lose_their_series() -> None:
    m = Metrics(process_metrics=False, version_metrics_max=1, version_metrics_window_s=60)
    none: Collection[str] = ()
    assert m.version_done(call(version(1)), none, now=0) == version(1)
    assert m.version_done(call(version(2)), none, now=10) == "other"  # the one slot is taken
    # Version 1 idle for more than the window: it leaves, version 2 takes the slot.
    assert m.version_done(call(version(2)), none, now=70) == version(2)
    assert counts(m) == {"other": 1, version(2): 1}
    assert sample(m, REQUESTS, tenant="acme", adapter=ADAPTER, version=version(1), code="OK") == 0
    assert version(1) not in series_versions(m)
    # An aliased version has a label beyond the slots; when the alias moves off it, the least
    # recently served unaliased version beyond the slots leaves (not the one serving now).
    assert m.version_done(call(version(3)), {version(3)}, now=80) == version(3)
    assert m.version_done(call(version(2)), none, now=90) == version(2)
    assert counts(m) == {"other": 1, version(2): 2}
    # A whole adapter idle for the window is swept when another one records a call.
    other = VersionCall("acme", OWNER, "other-bot", version(9), "OK", 0.1, 0.05, 1, "stop")
    m.version_done(other, (), now=200)
    assert counts(m) == {}
    assert m.versions.labelled(OWNER, NAME) == set()
    assert counts(m, "acme/other-bot") == {version(9): 1}


def test_the_summary_is_per_caller_tenant_and_windowed() -> None:
    m = Metrics(process_metrics=False, version_metrics_max=4, version_metrics_window_s=60)
    v = version(1)
    for i in range(1, 101):  # latencies 0.01 .. 1.00 s
        m.version_done(call(v, seconds=i / 100), (), now=100.0)
    m.version_done(call(v, code="INVALID_ARGUMENT", seconds=0.001), (), now=100.0)
    m.version_done(call(v, tenant="globex"), (), now=100.0)
    m.version_done(call(version(2)), (), now=10.0)  # outside the window at t=100
    (mine,) = m.version_summary(OWNER, NAME, "acme", now=100.0)
    assert mine.version == v
    assert (mine.requests, mine.errors) == (101, 1)
    assert mine.error_codes == {"INVALID_ARGUMENT": 1}
    assert mine.finish_reasons == {"length": 100}
    assert mine.completion_tokens == 300
    # nearest rank over the 101 latencies (0.001, 0.01 .. 1.00): 51st and 100th
    assert mine.latency_p50_seconds == 0.50
    assert mine.latency_p99_seconds == 0.99
    assert mine.ttft_p50_seconds == 0.25  # the OK calls: 0.005 .. 0.5 s, 50th
    assert mine.window_seconds == 60
    every = {s.version: s.requests for s in m.version_summary(OWNER, NAME, None, now=100.0)}
    assert every == {v: 102}
    assert m.version_summary(OWNER, NAME, "initech", now=100.0) == []
    # The ring keeps the last 512 calls of a version and tenant: the window shrinks to them.
    for i in range(600):
        m.version_done(call(v, tenant="initech"), (), now=100.0 + i / 100)
    (capped,) = m.version_summary(OWNER, NAME, "initech", now=106.0)
    assert capped.requests == 512
    assert capped.window_seconds < 60
