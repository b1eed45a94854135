"""`python -m benchmarks --smoke`: every benchmark runs and writes parseable output.

Runs the benchmarks at their tiny sizes in a subprocess (they start their own engine) and checks
that each JSON parses with the keys the report and the docs rely on, that each PNG exists and is
not empty, and that SUMMARY.md has a row per benchmark. It never asserts a speed; it does check
the two correctness counts the benchmarks report (single flight, nothing served after revoke).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.support import processes

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = (
    "peer",
    "peer_zipf",
    "overhead",
    "cold_start",
    "many_adapters",
    "herd",
    "revocation",
    "quantized",
    "features",
)
REQUIRED = {
    "peer": ("systems", "engine"),
    "peer_zipf": ("systems", "engine", "distinct_adapters_used"),
    "overhead": ("paths", "comparison", "samples"),
    "cold_start": ("by_rank", "trials"),
    "many_adapters": ("scenarios", "engine"),
    "herd": ("trials",),
    "revocation": ("trials", "summary"),
    "quantized": ("systems", "comparison"),
    "features": ("paths", "rounds", "time_per_output_token_s"),
}


#: How long the smoke run may take: about 180 s alone on this machine, and more than 230 s once
#: in a `make test-slow` run (it checks that every benchmark runs, not how fast).
SMOKE_TIMEOUT_S = 540


@pytest.mark.slow
@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    started = time.monotonic()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--no-progress"]
    completed = processes.run_grouped(
        [*command, "--out", str(out), "--work", str(tmp_path / "work")],
        timeout_s=SMOKE_TIMEOUT_S,
        cwd=ROOT,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    print(f"benchmark smoke run: {time.monotonic() - started:.0f} s")

    for name in BENCHMARKS:
        result = json.loads((out / f"{name}.json").read_text())
        for key in ("benchmark", "params", "headline", "machine", "seconds", *REQUIRED[name]):
            assert key in result, (name, key)
        assert result["benchmark"] == name
        assert result["smoke"] is True
        png = out / f"{name}.png"
        assert png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    peer = json.loads((out / "peer.json").read_text())
    for system in ("gateway", "peer"):
        assert peer["systems"][system]["rounds"] == 2
        assert peer["systems"][system]["median_rps"] > 0
    assert peer["systems"]["gateway"]["wrong_outputs"] == 0  # the guard; the peer's are counted
    zipf = json.loads((out / "peer_zipf.json").read_text())
    for system in ("gateway", "peer"):  # the peer resolved every adapter from its folder
        one = zipf["systems"][system]
        assert one["rounds"] == 2
        assert one["median_rps"] > 0
        assert len(one["passes"][0]["cold_s"]) == 2
        assert one["cold_p50_s"] > 0
    assert zipf["systems"]["gateway"]["wrong_outputs"] == 0
    assert zipf["systems"]["gateway_no_canary"]["cold_p50_s"] > 0
    overhead = json.loads((out / "overhead.json").read_text())
    assert set(overhead["paths"]) == {"engine", "gateway_unary", "gateway_stream"}
    for summary in overhead["paths"].values():
        assert summary["ok"] == summary["requests"] > 0
    many = json.loads((out / "many_adapters.json").read_text())
    assert {"single", "zipf_1", "zipf_1_cold", "zipf_0.5", "zipf_1_40", "zipf_1_40_cold"} <= set(
        many["scenarios"]
    )
    # The host tier in bytes: its own engine, max_cpu_loras derived (16 MiB / 1,536 B), every
    # adapter of the smoke run resident after the cold pass (its steady pass loads only new ones).
    assert many["host_engine"]["max_cpu_loras"] == 10_922
    host = many["scenarios"]
    assert {"single_host", "zipf_1_host", "zipf_1_cold_host", "zipf_1_40_host"} <= set(host)
    assert host["zipf_1_host"]["evictions"] == 0
    # Preloaded: every adapter loaded once before the steady pass, which then starts no load.
    for label, count in (("zipf_1_preloaded_host", 20), ("zipf_1_40_preloaded_host", 40)):
        warm = host[label]["preload"]
        assert (warm["preloaded"], warm["engine_loads"], warm["failed"]) == (count, count, 0)
        assert (host[label]["engine_loads"], host[label]["engine_hit_ratio"]) == (0, 1.0)
    # Uploaded through the API in two stages (20, then up to 40), each listed in full, three
    # times from the listing index and three from the manifests (the same count both ways).
    assert [(u["uploaded"], u["stored"], u["listed"]) for u in many["uploads"]] == [
        (20, 20, 20),
        (20, 40, 40),
    ]
    for upload in many["uploads"]:
        assert len(upload["list_all_index_s"]) == len(upload["list_all_manifests_s"]) == 3
    herd = json.loads((out / "herd.json").read_text())
    assert all(t["fetches"] == 1 and t["engine_loads"] == 1 for t in herd["trials"])
    revocation = json.loads((out / "revocation.json").read_text())
    assert revocation["summary"]["succeeded_started_after_return"] == 0
    assert revocation["summary"]["succeeded_completed_after_return"] == 0
    assert revocation["engine_died"] is False, revocation["problems"]

    quantized = json.loads((out / "quantized.json").read_text())
    assert set(quantized["systems"]) == {"float32", "W8A8"}
    for system in quantized["systems"].values():
        assert system["rss_after_work_bytes"]["median"] > 0
        for mode in ("base", "adapters"):
            assert system["throughput_rps"][mode]["median"] > 0
    assert quantized["problems"] == []

    summary_md = (out / "SUMMARY.md").read_text()
    for name in BENCHMARKS:
        assert f"| {name} |" in summary_md
