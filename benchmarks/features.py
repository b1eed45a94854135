"""Request features: the cost of structured output, and the OpenAI front against gRPC.

N requests at concurrency C, the same seeded token-id prompts for every path, greedy, a
round-robin mix of one adapter and the base model. Three paths through one gateway, run in
interleaved rounds (the order rotates) so that machine noise hits all of them alike:

- `grpc`: `Generate` over loopback gRPC, free text, `ignore_eos`, `max_tokens` tokens;
- `grpc_json`: the same with a JSON-schema constraint (compact JSON, vLLM's xgrammar backend).
  The grammar ends the output when the object is complete, so outputs are shorter: compare
  tokens per second and time per output token, not requests per second;
- `openai`: `POST /v1/completions` on the gateway's OpenAI-compatible port with the same
  prompts (token ids), `max_tokens` and `ignore_eos`, from one keep-alive `httpx` client (the
  HTTP client under the official `openai` package; the package's own model parsing is left
  out, so the figure is the server's overhead).

Reported, each as the median over rounds of the ratio to the `grpc` run of the same round:
throughput of `openai` (requests/s), tokens/s of `grpc_json`, added latency p50 of `openai`,
and time per output token of `grpc_json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import httpx
import numpy as np

from benchmarks._support import (
    USER_KEY,
    Bench,
    RequestResult,
    closed_loop,
    prompts,
    summarize,
)
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions

NAME = "features"
Job = Callable[[], Awaitable[RequestResult]]
PATHS = ("grpc", "grpc_json", "openai")
#: Compact JSON with a few bounded fields, so that every object ends within max_tokens.
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "tag": {"enum": ["red", "green", "blue"]},
            "code": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        },
        "required": ["ok", "tag", "code"],
        "additionalProperties": False,
    }
)


@dataclass(frozen=True)
class Params:
    requests: int = 48
    """Requests per path per round."""
    concurrency: int = 4
    prompt_tokens: int = 32
    max_tokens: int = 64
    rounds: int = 4
    warmup: int = 8


DEFAULT = Params()
SMOKE = Params(requests=8, concurrency=2, max_tokens=8, rounds=1, warmup=2)


def phases(params: Params) -> int:
    return 1 + params.rounds * len(PATHS)


async def grpc_request(
    client: AsyncGatewayClient, adapter: str, ids: Sequence[int], options: GenerateOptions
) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(start, start)
    try:
        reply = await client.generate(adapter, options=options, token_ids=ids)
        result.tokens = reply.completion_tokens
    except errors.GatewayError as exc:
        result.ok, result.error = False, exc.code.name
    result.end = result.first = time.perf_counter()
    return result


async def openai_request(
    http: httpx.AsyncClient, model: str, ids: Sequence[int], max_tokens: int
) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(start, start)
    body = {
        "model": model,
        "prompt": list(ids),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    try:
        response = await http.post("/v1/completions", json=body)
        if response.status_code != 200:
            result.ok, result.error = False, f"HTTP {response.status_code}"
        else:
            result.tokens = int(response.json()["usage"]["completion_tokens"])
    except httpx.HTTPError as exc:
        result.ok, result.error = False, type(exc).__name__
    result.end = result.first = time.perf_counter()
    return result


async def run(bench: Bench, params: Params) -> dict[str, Any]:
    progress = bench.progress
    async with bench.gateway("features", openai_listen="127.0.0.1:0") as gw:
        with progress.phase("features: upload + warm"):
            folder = devtools.write_random_lora(
                bench.model, bench.work / "features" / "extract", rank=8, seed=7
            )
            await gw.admin.upload_adapter("extract", folder)
            base = gw.server.base_model_name
            mix = ["extract", ""]  # "" = the base model over gRPC
            for name in mix:
                await gw.user.generate(name, "warm up", GenerateOptions(max_tokens=2))
        free = GenerateOptions(max_tokens=params.max_tokens, ignore_eos=True)
        constrained = GenerateOptions(
            max_tokens=params.max_tokens, json_schema=SCHEMA, disable_any_whitespace=True
        )
        work = prompts(params.requests, params.prompt_tokens, seed=11)
        warm = prompts(params.warmup, params.prompt_tokens, seed=12)
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
        samples: dict[str, list[RequestResult]] = {path: [] for path in PATHS}
        invalid: list[str] = []
        url = f"http://127.0.0.1:{gw.server.openai_port}"
        headers = {"authorization": f"Bearer {USER_KEY}"}
        limits = httpx.Limits(max_connections=params.concurrency * 2)
        async with httpx.AsyncClient(
            base_url=url, headers=headers, timeout=300.0, limits=limits
        ) as http:

            def jobs(path: str, batch: list[list[int]]) -> list[Job]:
                out: list[Job] = []
                for index, ids in enumerate(batch):
                    adapter = mix[index % len(mix)]
                    if path == "openai":
                        out.append(
                            partial(openai_request, http, adapter or base, ids, params.max_tokens)
                        )
                    else:
                        options = constrained if path == "grpc_json" else free
                        out.append(partial(grpc_request, gw.user, adapter, ids, options))
                return out

            for round_ in range(params.rounds):
                shift = round_ % len(PATHS)
                for path in PATHS[shift:] + PATHS[:shift]:
                    with progress.phase(f"features: round {round_ + 1} {path}"):
                        if round_ == 0 and warm:
                            await closed_loop(jobs(path, warm), params.concurrency)
                        results, wall = await closed_loop(
                            jobs(path, work), params.concurrency, progress, path
                        )
                        runs[path].append(summarize(results, wall))
                        samples[path].extend(results)
            # Every constrained answer that ended (not cut by max_tokens) parses: a check. Text
            # prompts: after a token-id prompt that ends inside a UTF-8 character (random ids
            # do), vLLM's detokenizer puts the prompt's undecodable tail in front of the first
            # delta's text (the token ids are right); see docs/benchmarks.md.
            for index in range(4):
                reply = await gw.user.generate(
                    "extract", f"ticket {index}: route it", options=constrained
                )
                try:
                    if reply.finish_reason == "stop":
                        json.loads(reply.text)
                except ValueError:
                    invalid.append(f"{reply.text!r} ({len(reply.token_ids)} tokens)")

    def per_token(stats: list[RequestResult]) -> list[float]:
        return [r.latency / r.tokens for r in stats if r.ok and r.tokens]

    def median_ratio(path: str, key: str) -> float:
        pairs = zip(runs[path], runs["grpc"], strict=True)
        return float(np.median([p[key] / g[key] for p, g in pairs]))

    added_p50 = float(
        np.median(
            [
                p["latency_p50_s"] - g["latency_p50_s"]
                for p, g in zip(runs["openai"], runs["grpc"], strict=True)
            ]
        )
    )
    tpot = {path: float(np.median(per_token(samples[path]) or [np.nan])) for path in PATHS}
    totals = {
        path: summarize(samples[path], sum(r["wall_s"] for r in runs[path])) for path in PATHS
    }
    problems = [f"a constrained output ended (stop) but is not JSON: {t}" for t in invalid]
    return {
        "benchmark": NAME,
        "params": asdict(params),
        "schema": json.loads(SCHEMA),
        "paths": totals,
        "rounds": runs,
        "time_per_output_token_s": tpot,
        "samples": {
            path: {"latency_s": [r.latency for r in samples[path] if r.ok]} for path in PATHS
        },
        "problems": problems,
        "headline": {
            "openai_throughput_ratio": median_ratio("openai", "throughput_rps"),
            "openai_added_latency_p50_ms": 1e3 * added_p50,
            "json_tokens_per_s_ratio": median_ratio("grpc_json", "tokens_per_s"),
            "json_time_per_token_ratio": tpot["grpc_json"] / tpot["grpc"],
            "json_mean_output_tokens": float(
                np.mean([float(r.tokens) for r in samples["grpc_json"] if r.ok] or [np.nan])
            ),
        },
    }
