"""Is the CPU engine's slow phase the multiprocess executor? Rounds of one workload on each.

The scale issue's mixed workload on the engine alone (no gateway in the way): base model and
3 adapters round robin, 96 requests per round, 8 at a time, 12 tokens each, `max_loras` 2 /
`max_cpu_loras` 3, float32, eager. It runs `--rounds` rounds on vLLM's multiprocess executor
(EngineCore and a Worker process, vLLM's CPU default) and on the in-process one
(`distributed_executor_backend: uni`), one engine at a time, `--passes` times alternating, and
prints each round's requests per second, the medians with their spread and how many rounds fell
below half the median of the fast ones ("slow phase"). Writes JSON with `--out`.

    python scripts/executor_phases.py --rounds 25 --passes 2 --out benchmarks/results/executor.json

Check `ps` first: a leftover engine makes every figure wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from lora_gateway import devtools
from lora_gateway.config import Settings
from lora_gateway.engine.base import GenerateParams, LoadedAdapter, Prompt
from lora_gateway.engine.vllm_engine import VLLMEngine

REQUESTS, CONCURRENCY, TOKENS = 96, 8, 12
PROMPTS = ("the quick brown fox", "hello world", "a tiny model says", "one two three four")


async def one_round(engine: VLLMEngine, adapters: list[LoadedAdapter | None]) -> float:
    jobs = list(zip(range(REQUESTS), itertools.cycle(adapters), strict=False))
    gate = asyncio.Semaphore(CONCURRENCY)
    params = GenerateParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)

    async def run(i: int, adapter: LoadedAdapter | None) -> None:
        async with gate:
            prompt = Prompt(text=f"{PROMPTS[i % len(PROMPTS)]} {i}")
            async for _ in engine.generate(uuid.uuid4().hex, prompt, params, adapter):
                pass

    began = time.perf_counter()
    await asyncio.gather(*(run(i, a) for i, a in jobs))
    return REQUESTS / (time.perf_counter() - began)


async def system(model: Path, folders: list[Path], executor: str, rounds: int) -> list[float]:
    engine_args = {"distributed_executor_backend": executor}
    settings = Settings.from_mapping(
        {
            "model": str(model),
            "dtype": "float32",
            "max_loras": 2,
            "max_cpu_loras": 3,
            "max_lora_rank": 16,
            "max_model_len": 256,
            "max_num_seqs": 16,
            "enforce_eager": True,
            "kv_cache_space_gib": 1,
            "self_test": False,
            "canary_interval_s": 0,
            "engine_args": engine_args,
        }
    )
    engine = await VLLMEngine.start(settings)
    try:
        loaded = [LoadedAdapter(100 + i, f"bench-{i}", f) for i, f in enumerate(folders)]
        for adapter in loaded:
            await engine.add_adapter(adapter)
        adapters: list[LoadedAdapter | None] = [None, *loaded]
        await one_round(engine, adapters)  # warm-up
        return [await one_round(engine, adapters) for _ in range(rounds)]
    finally:
        await engine.shutdown()


def summary(rps: list[float]) -> dict[str, float | int]:
    median = statistics.median(rps)
    fast = [r for r in rps if r >= median] or rps
    slow = [r for r in rps if r < statistics.median(fast) / 2]
    q = statistics.quantiles(rps, n=4) if len(rps) > 1 else [median] * 3
    return {
        "median": round(median, 1),
        "p25": round(q[0], 1),
        "p75": round(q[2], 1),
        "min": round(min(rps), 1),
        "max": round(max(rps), 1),
        "slow_rounds": len(slow),
        "rounds": len(rps),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="executor-phases-"))
    model = devtools.make_model(work / "tiny-llama")
    folders = [
        devtools.make_adapter(model, work / f"a{i}", devtools.AdapterSpec(seed=i + 1))
        for i in range(3)
    ]
    results: dict[str, list[float]] = {"mp": [], "uni": []}
    for p in range(args.passes):
        for executor in ("mp", "uni") if p % 2 == 0 else ("uni", "mp"):
            rps = await system(model, folders, executor, args.rounds)
            results[executor] += rps
            print(executor, "pass", p, [round(r) for r in rps], flush=True)
    report = {
        k: {"summary": summary(v), "rounds": [round(r, 2) for r in v]} for k, v in results.items()
    }
    for executor, data in report.items():
        print(executor, data["summary"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
