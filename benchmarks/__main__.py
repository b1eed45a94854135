"""`python -m benchmarks [--smoke] [--only NAME ...] [--out DIR] [--work DIR]`.

Starts one engine, runs the selected benchmarks on it (a progress bar over their phases) and
writes `<out>/<name>.json`, `<out>/<name>.png` and `<out>/SUMMARY.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from benchmarks import BENCHMARKS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check they run")
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"among {BENCHMARKS}"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--peer-omp1",
        action="store_true",
        help="peer: also both systems with OMP_NUM_THREADS=1 (twice the time)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, work: Path) -> int:
    from benchmarks import report
    from benchmarks._support import SETUP_PHASES, Progress, open_bench, other_engines

    others = other_engines()
    if others:
        banner = "!" * 78
        print(
            f"{banner}\nWARNING: {len(others)} other vLLM engine or gateway process(es) are "
            "running on this machine.\nThey share its cores: every figure of this run is "
            "suspect. Stop them and run again.\n" + "\n".join(others) + f"\n{banner}",
            file=sys.stderr,
        )
    selected = args.only or list(BENCHMARKS)
    modules: dict[str, ModuleType] = {
        name: importlib.import_module(f"benchmarks.{name}") for name in selected
    }
    params = {name: m.SMOKE if args.smoke else m.DEFAULT for name, m in modules.items()}
    if args.peer_omp1 and "peer" in params:
        params["peer"] = dataclasses.replace(params["peer"], omp1_too=True)
    standalone = {n: m for n, m in modules.items() if getattr(m, "STANDALONE", False)}
    shared = {n: m for n, m in modules.items() if n not in standalone}
    total = sum(m.phases(params[n]) for n, m in modules.items()) + 1
    total += SETUP_PHASES if shared else 0
    progress = Progress(total, enabled=not args.no_progress)
    results: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    started = time.perf_counter()

    async def one(name: str, call: Callable[[], Awaitable[Any]]) -> None:
        began = time.perf_counter()
        try:
            result = await call()
        except Exception:
            logging.getLogger("benchmarks").exception("benchmark %s failed", name)
            failed.append(name)
            return
        for problem in result.get("problems", []):
            logging.getLogger("benchmarks").error("%s: %s", name, problem)
        if others:  # the machine's, not the system's: kept apart from `problems`
            result["machine_warnings"] = [
                f"{len(others)} other engine process(es) ran during this run: "
                "the figures are suspect"
            ]
        result["seconds"] = time.perf_counter() - began
        result["smoke"] = args.smoke
        results[name] = result

    try:
        # Standalone benchmarks start their own servers: they run first, alone on the machine.
        for name, module in standalone.items():
            await one(
                name, functools.partial(module.run_standalone, work / name, params[name], progress)
            )
        if shared:
            async with open_bench(work, smoke=args.smoke, progress=progress) as bench:
                for name, module in shared.items():
                    await one(name, functools.partial(module.run, bench, params[name]))
        with progress.phase("report"):
            report.write(results, args.out, seconds=time.perf_counter() - started)
    finally:
        progress.close()
    print(f"results in {args.out}/ ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.work is not None:
        return asyncio.run(run(args, args.work))
    with tempfile.TemporaryDirectory(prefix="lora-gateway-bench-") as tmp:
        return asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
