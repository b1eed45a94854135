"""Peer: the gateway against stock `vllm serve`, the scale issue's mixed workload, one at a time.

Both systems run as their own server processes on 127.0.0.1 with the same engine settings
(float32, eager, `max_loras` 2, `max_cpu_loras` 3, rank 16, 16 sequences):
- the gateway: `lora-gateway serve` on a local-folder store holding the adapters;
- the peer: `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) with
  `--enable-lora --lora-modules name=path ...`.

The workload: the base model and 3 adapters round robin, `requests` requests per round at
`concurrency`, `tokens` tokens each (greedy, `ignore_eos`), prompts of token ids, `rounds`
rounds per system and pass; `passes` passes alternate the order (gateway first, then peer
first...). The client is this process: gRPC (the SDK) to the gateway, the OpenAI HTTP API
(the `openai` package) to the peer. Before its rounds, each system answers every (prompt,
model) alone, one request at a time: a round's output that differs from that solo answer is
wrong (the peer's base requests batched with adapter requests get the last slot's delta on
CPU; the gateway's null-adapter guard exists for it).

Reported: each round's requests per second (its distribution plotted), per system the median
with the 10th-90th percentile spread, the rounds in a slow phase (below half the median of the
upper half), the ratio of the medians, and the wrong outputs. Runs before the shared engine of
the other benchmarks starts (`STANDALONE`): nothing else computes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from adapter_store import BaseModelSpec, LocalBackend, Registry
from benchmarks._support import Progress, prompts
from lora_gateway import devtools
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from tests.support.gateway import ENGINE_DEFAULTS, key_of, write_tenants

NAME = "peer"
#: Runs before the shared engine starts (`python -m benchmarks` calls `run_standalone`).
STANDALONE = True
TENANT = "bench"
ADAPTERS = ("ad0", "ad1", "ad2")
START_TIMEOUT_S = 240.0


@dataclass(frozen=True)
class Params:
    rounds: int = 25
    passes: int = 2
    requests: int = 96
    concurrency: int = 8
    tokens: int = 12
    prompt_tokens: int = 8
    distinct_prompts: int = 4
    #: Also run both systems with OMP_NUM_THREADS=1 in their environment (`--peer-omp1`): the
    #: CPU slow phase's lead (docs/benchmarks.md), measured against the peer in like settings.
    omp1_too: bool = False


DEFAULT = Params()
SMOKE = Params(rounds=2, passes=1, requests=16, concurrency=4, tokens=4)


def systems_of(params: Params) -> list[str]:
    """The systems a run measures: `gateway`, `peer`, and their `_omp1` variants if asked."""
    names = ["gateway", "peer"]
    return names + [f"{n}_omp1" for n in names] if params.omp1_too else names


def phases(params: Params) -> int:
    return 1 + len(systems_of(params)) * params.passes


# --- the two servers ---------------------------------------------------------------------------


def _env(omp1: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_GATEWAY_")}
    env.pop("OMP_NUM_THREADS", None)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(ENGINE_DEFAULTS["kv_cache_space_gib"]),
        }
    )
    if omp1:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _wait_for(process: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    """Read the server's output until `pattern` shows (or fail: it died or took too long)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(pattern, line)
        if found:
            return found
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"server did not start (exit {process.poll()})")


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM to the server's process group, then SIGKILL after 30 s: no engine left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _drain(process: subprocess.Popen[str]) -> None:
    """Keep reading the server's output so that its pipe never fills and blocks it."""
    import threading

    threading.Thread(target=lambda: [None for _ in process.stdout or ()], daemon=True).start()


@contextlib.contextmanager
def gateway_server(
    model: Path,
    work: Path,
    folders: dict[str, Path],
    omp1: bool = False,
    engine: Mapping[str, object] = ENGINE_DEFAULTS,
    changes: Mapping[str, object] | None = None,
) -> Iterator[str]:
    """`lora-gateway serve` on a local store holding `folders` (uploaded the first time), with
    the engine settings `engine` and any other `changes` to its settings: yields host:port."""
    store = work / "store"
    if not store.exists():
        spec = BaseModelSpec.from_hf_config(
            model,
            max_rank=int(ENGINE_DEFAULTS["max_lora_rank"]),  # type: ignore[call-overload]
            aliases=(devtools.TINY_MODEL_NAME,),
        )
        registry = Registry(LocalBackend(store), spec)
        for name, folder in folders.items():
            registry.upload_dir(TENANT, name, folder, created_by="benchmarks")
    tenants = write_tenants(work / "tenants.yaml", {TENANT: {"max_concurrent": 512}})
    config = {
        **engine,
        "model": str(model),
        "base_model_aliases": [devtools.TINY_MODEL_NAME],
        "store": f"file://{store}",
        "cache_dir": str(work / "cache"),
        "tenants_file": str(tenants),
        "listen": "127.0.0.1:0",
        "max_concurrent_requests": 512,
        "tenant_max_concurrent": 512,
        "drain_grace_s": 1.0,
        **(changes or {}),
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).parent / "lora-gateway"), "serve", "--config"]
    process = subprocess.Popen(
        [*command, str(work / "gateway.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(omp1),
        start_new_session=True,
    )
    try:
        port = _wait_for(process, r"listening on port (\d+)").group(1)
        _drain(process)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)


@contextlib.contextmanager
def peer_server(
    model: Path,
    folders: dict[str, Path],
    port: int,
    omp1: bool = False,
    engine: Mapping[str, object] = ENGINE_DEFAULTS,
    resolver_dir: Path | None = None,
) -> Iterator[str]:
    """Stock vLLM's OpenAI server with the engine settings `engine`: yields its base URL. The
    adapters are `folders` as `--lora-modules`, or, with `resolver_dir`, whatever vLLM's own
    filesystem resolver (the `lora_filesystem_resolver` plugin, runtime LoRA updating on)
    finds there by the requested name, loaded at its first request."""
    modules = [f"{name}={folder}" for name, folder in folders.items()]
    env = _env(omp1)
    if resolver_dir is not None:
        modules = []
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_PLUGINS": "lora_filesystem_resolver",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(resolver_dir),
            }
        )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            devtools.TINY_MODEL_NAME,
            "--enable-lora",
            "--max-lora-rank",
            str(engine["max_lora_rank"]),
            "--max-loras",
            str(engine["max_loras"]),
            "--max-cpu-loras",
            str(engine["max_cpu_loras"]),
            "--dtype",
            str(engine["dtype"]),
            "--max-model-len",
            str(engine["max_model_len"]),
            "--max-num-seqs",
            str(engine["max_num_seqs"]),
            "--enforce-eager",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *(["--lora-modules", *modules] if modules else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_for(process, r"Application startup complete|Uvicorn running")
        _drain(process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


# --- the workload ----------------------------------------------------------------------------

#: One request: (model: "" for the base or an adapter name, prompt ids) -> output text.
Ask = Callable[[str, list[int]], Awaitable[str]]


def gateway_ask(client: AsyncGatewayClient, params: Params) -> Ask:
    options = GenerateOptions(max_tokens=params.tokens, temperature=0.0, ignore_eos=True)

    async def ask(model: str, ids: list[int]) -> str:
        result = await client.generate(model, options=options, token_ids=ids, timeout=120)
        return ",".join(map(str, result.token_ids))

    return ask


def peer_ask(client: Any, params: Params) -> Ask:
    async def ask(model: str, ids: list[int]) -> str:
        response = await client.completions.create(
            model=model or devtools.TINY_MODEL_NAME,
            prompt=ids,
            max_tokens=params.tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        choice = response.choices[0]
        token_ids = getattr(choice, "token_ids", None)
        return ",".join(map(str, token_ids)) if token_ids else str(choice.text)

    return ask


def workload(params: Params) -> list[tuple[str, list[int]]]:
    """The round's requests: base and adapters round robin, over `distinct_prompts` prompts."""
    models = ["", *ADAPTERS]
    ids = prompts(params.distinct_prompts, params.prompt_tokens, seed=5)
    return [
        (models[i % len(models)], ids[(i // len(models)) % len(ids)])
        for i in range(params.requests)
    ]


async def measure(
    ask: Ask,
    params: Any,
    progress: Progress,
    label: str,
    jobs: list[tuple[str, list[int]]] | None = None,
) -> dict[str, Any]:
    """Solo answers first, then `params.rounds` closed-loop rounds of `jobs` (default: this
    module's `workload`) at `params.concurrency`: each round's rate and wrongs."""
    jobs = workload(params) if jobs is None else jobs
    solo: dict[tuple[str, tuple[int, ...]], str] = {}
    for model, ids in dict.fromkeys((m, tuple(i)) for m, i in jobs):
        solo[(model, ids)] = await ask(model, list(ids))
    rates: list[float] = []
    wrong: list[int] = []
    gate = asyncio.Semaphore(params.concurrency)

    async def one(model: str, ids: list[int]) -> bool:
        """Whether the answer differs from the solo one."""
        async with gate:
            return await ask(model, ids) != solo[(model, tuple(ids))]

    for number in range(params.rounds):
        started = time.perf_counter()
        mistakes = await asyncio.gather(*(one(model, ids) for model, ids in jobs))
        rates.append(len(jobs) / (time.perf_counter() - started))
        wrong.append(sum(mistakes))
        progress.note(f"{label}: round {number + 1}/{params.rounds} {rates[-1]:.0f} req/s")
    return {"rounds_rps": rates, "wrong": wrong}


def stats(rates: list[float]) -> dict[str, float]:
    """Rounds' rates: median, 10th-90th percentile, the fastest round, the upper half's median
    (the fast phase), the rounds below half of it (a slow phase) and the rounds within ±15 % of
    the median (the scale issue's bound on the spread)."""
    values = np.asarray(rates, dtype=float)
    median = float(np.median(values))
    upper = values[values >= median]
    fast = float(np.median(upper)) if upper.size else median
    return {
        "median_rps": median,
        "p10_rps": float(np.percentile(values, 10)),
        "p90_rps": float(np.percentile(values, 90)),
        "fast_phase_rps": fast,
        "slow_rounds": int(np.sum(values < fast / 2)),
        "max_rps": float(values.max()),
        "within_15pct": int(np.sum(np.abs(values - median) <= 0.15 * median)),
        "rounds": len(rates),
    }


async def run_standalone(work: Path, params: Params, progress: Progress) -> dict[str, Any]:
    import openai

    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    with progress.phase("peer: tiny model and adapters"):
        model = await asyncio.to_thread(devtools.make_model, work / "tiny-llama")
        folders = {
            name: await asyncio.to_thread(
                functools.partial(
                    devtools.write_random_lora, model, work / "adapters" / name, rank=8, seed=40 + i
                )
            )
            for i, name in enumerate(ADAPTERS)
        }
    names = systems_of(params)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    from tests.support.processes import free_port

    for number in range(params.passes):
        order = names if number % 2 == 0 else names[::-1]
        for system in order:
            omp1 = system.endswith("_omp1")
            with progress.phase(f"peer: pass {number + 1}, {system}"):
                if system.startswith("gateway"):
                    with gateway_server(model, work / "gateway", folders, omp1) as target:
                        async with AsyncGatewayClient(target, key_of(TENANT)) as client:
                            result = await measure(
                                gateway_ask(client, params), params, progress, system
                            )
                else:
                    with peer_server(model, folders, free_port(), omp1) as base_url:
                        http = openai.AsyncOpenAI(base_url=base_url, api_key="unused")
                        try:
                            result = await measure(peer_ask(http, params), params, progress, system)
                        finally:
                            await http.close()
                runs[system].append(result)
    systems: dict[str, dict[str, Any]] = {}
    for system, passes in runs.items():
        rates = list(itertools.chain.from_iterable(p["rounds_rps"] for p in passes))
        wrong = sum(sum(p["wrong"]) for p in passes)
        systems[system] = {
            **stats(rates),
            "wrong_outputs": wrong,
            "outputs": params.requests * len(rates),
            "passes": passes,
        }
    gateway, peer = systems["gateway"], systems["peer"]
    headline = {
        "gateway_median_rps": gateway["median_rps"],
        "peer_median_rps": peer["median_rps"],
        "gateway_vs_peer": gateway["median_rps"] / peer["median_rps"],
        "gateway_wrong": gateway["wrong_outputs"],
        "peer_wrong": peer["wrong_outputs"],
        "gateway_slow_rounds": gateway["slow_rounds"],
        "peer_slow_rounds": peer["slow_rounds"],
    }
    if params.omp1_too:
        g1, p1 = systems["gateway_omp1"], systems["peer_omp1"]
        headline["gateway_omp1_vs_peer_omp1"] = g1["median_rps"] / p1["median_rps"]
        headline["gateway_omp1_vs_peer"] = g1["median_rps"] / peer["median_rps"]
        headline["gateway_omp1_slow_rounds"] = g1["slow_rounds"]
        headline["peer_omp1_slow_rounds"] = p1["slow_rounds"]
    problems = [
        f"{name} returned {s['wrong_outputs']} wrong outputs"
        for name, s in systems.items()
        if name.startswith("gateway") and s["wrong_outputs"]
    ]
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "engine": dict(ENGINE_DEFAULTS),
        "systems": systems,
        "headline": headline,
        "problems": problems,
    }


async def run(bench: Any, params: Params) -> dict[str, Any]:
    """Inside the shared run: the same as `run_standalone` (used when called that way)."""
    return await run_standalone(bench.work / "peer", params, bench.progress)
