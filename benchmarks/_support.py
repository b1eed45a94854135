"""Shared set-up of the benchmarks: tiny model, adapters, S3 server, one engine, gateways.

- The base model is `lora_gateway.devtools.make_model` (a tiny random Llama, generated once per
  run). Adapters are `devtools.write_random_lora`'s (numpy, fast enough for a thousand).
- The store is a real S3 server over HTTP: SeaweedFS, started by `tests/support/s3server.py`
  (the same server the tests use); the tenants file and each gateway's settings come from the
  tests' builder, `tests/support/gateway.py`.
- One vLLM engine serves the whole run (`max_loras` 4, `max_cpu_loras` 16, rank up to 64); each
  benchmark starts its own `GatewayServer` on it (fresh residency, statistics and disk cache) and
  empties the engine again when it stops.
- Timed request helpers return `RequestResult`s; `summarize` turns them into percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # type: ignore[import-untyped]
from tqdm import tqdm  # type: ignore[import-untyped]

from adapter_store import BaseModelSpec, Limits, Registry
from adapter_store.s3 import S3Backend
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.config import Settings
from lora_gateway.engine.base import Engine, GenerateParams, LoadedAdapter, Prompt
from lora_gateway.server import GatewayServer
from tests.support.gateway import (
    clear_engine,
    engine_settings,
    gateway_settings,
    key_of,
    running_gateway,
    target,
    write_tenants,
)
from tests.support.s3server import S3Server, s3_server

TENANT = "bench"
USER_KEY = key_of(TENANT)
ADMIN_KEY = key_of(TENANT, "admin")
#: Largest adapter rank the engine accepts (the cold-start benchmark goes up to 64).
MAX_RANK = 64

#: Engine settings for this run: small KV cache, float32, eager (no compilation).
ENGINE_SETTINGS: dict[str, Any] = {
    "dtype": "float32",
    "max_loras": 4,
    "max_cpu_loras": 16,
    "max_lora_rank": MAX_RANK,
    "max_model_len": 256,
    "max_num_seqs": 128,
    "enforce_eager": True,
    "kv_cache_space_gib": 1,
}


# --- progress -------------------------------------------------------------------------------


class Progress:
    """A tqdm bar over the run's phases; `note` shows what a long phase is doing."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total, unit="phase", dynamic_ncols=True, file=sys.stderr, disable=not enabled
        )

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        self._bar.set_description_str(label)
        self._bar.set_postfix_str("")
        try:
            yield
        finally:
            self._bar.update(1)

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        self._bar.close()


# --- adapters -------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


# --- timed requests ---------------------------------------------------------------------------


@dataclass
class RequestResult:
    """One request as its caller saw it (perf_counter seconds)."""

    start: float
    end: float
    first: float | None = None
    ok: bool = True
    tokens: int = 0
    error: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start


def error_name(exc: BaseException) -> str:
    if isinstance(exc, errors.GatewayError):
        return str(exc.code.name)
    return type(exc).__name__


async def stream_request(
    client: AsyncGatewayClient,
    adapter: str,
    token_ids: Sequence[int],
    max_tokens: int,
    *,
    on_first: Callable[[], None] | None = None,
) -> RequestResult:
    """GenerateStream; `first` is when the first delta with tokens arrived."""
    start = time.perf_counter()
    result = RequestResult(start, start)
    try:
        async for delta in client.generate_stream(
            adapter,
            options=GenerateOptions(max_tokens=max_tokens, ignore_eos=True),
            token_ids=token_ids,
        ):
            if delta.token_ids and result.first is None:
                result.first = time.perf_counter()
                if on_first is not None:
                    on_first()
            result.tokens += len(delta.token_ids)
    except errors.GatewayError as exc:
        result.ok, result.error = False, error_name(exc)
    result.end = time.perf_counter()
    return result


async def unary_request(
    client: AsyncGatewayClient, adapter: str, token_ids: Sequence[int], max_tokens: int
) -> RequestResult:
    """Generate (unary): the first token is only seen with the whole response."""
    start = time.perf_counter()
    result = RequestResult(start, start)
    try:
        reply = await client.generate(
            adapter,
            options=GenerateOptions(max_tokens=max_tokens, ignore_eos=True),
            token_ids=token_ids,
        )
        result.tokens = len(reply.token_ids)
    except errors.GatewayError as exc:
        result.ok, result.error = False, error_name(exc)
    result.end = time.perf_counter()
    result.first = result.end if result.ok else None
    return result


async def engine_request(
    engine: Engine, adapter: LoadedAdapter | None, token_ids: Sequence[int], max_tokens: int
) -> RequestResult:
    """The engine layer directly (`Engine.generate`), no gRPC and no gateway core."""
    start = time.perf_counter()
    result = RequestResult(start, start)
    params = GenerateParams(max_tokens=max_tokens, ignore_eos=True)
    try:
        async for chunk in engine.generate(
            uuid.uuid4().hex, Prompt(token_ids=tuple(token_ids)), params, adapter
        ):
            if chunk.token_ids and result.first is None:
                result.first = time.perf_counter()
            result.tokens += len(chunk.token_ids)
    except errors.GatewayError as exc:
        result.ok, result.error = False, error_name(exc)
    result.end = time.perf_counter()
    return result


async def closed_loop(
    jobs: Sequence[Callable[[], Awaitable[RequestResult]]],
    concurrency: int,
    progress: Progress | None = None,
    label: str = "",
) -> tuple[list[RequestResult], float]:
    """Run `jobs` with `concurrency` workers (each starts the next job when one ends)."""
    results: list[RequestResult | None] = [None] * len(jobs)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(jobs):
            index = next_index
            next_index += 1
            results[index] = await jobs[index]()
            done = sum(r is not None for r in results)
            if progress is not None and (done % 10 == 0 or done == len(jobs)):
                progress.note(f"{label} {done}/{len(jobs)}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(jobs))))))
    wall = time.perf_counter() - started
    return [r for r in results if r is not None], wall


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def summarize(results: Sequence[RequestResult], wall: float) -> dict[str, Any]:
    """Throughput and latency / TTFT percentiles (seconds) of a batch of requests."""
    ok = [r for r in results if r.ok]
    latencies = [r.latency for r in ok]
    ttfts = [t for r in ok if (t := r.ttft) is not None]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall > 0 else float("nan"),
        "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
        "latency_p50_s": pct(latencies, 50),
        "latency_p90_s": pct(latencies, 90),
        "latency_p99_s": pct(latencies, 99),
        "latency_mean_s": float(np.mean(latencies)) if latencies else float("nan"),
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p99_s": pct(ttfts, 99),
        "ttft_max_s": max(ttfts) if ttfts else float("nan"),
    }


def prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids (seeded; same list for every path)."""
    rng = np.random.default_rng(seed)
    # Ids 3.. skip the special tokens (<unk>, <s>, </s>) of the tiny tokenizer.
    return [[int(t) for t in rng.integers(3, 300, size=length)] for _ in range(count)]


# --- the run's shared context -----------------------------------------------------------------


@dataclass
class Gateway:
    """A running gateway on the shared engine and clients for the bench tenant."""

    server: GatewayServer
    user: AsyncGatewayClient
    admin: AsyncGatewayClient

    @property
    def target(self) -> str:
        return target(self.server)

    def client(self, key: str = USER_KEY, **kwargs: Any) -> AsyncGatewayClient:
        return AsyncGatewayClient(self.target, key, **kwargs)


@dataclass
class Bench:
    """Everything a benchmark needs; built once per run by `open_bench`."""

    work: Path
    model: Path
    s3: S3Server
    engine: Engine
    tenants_file: Path
    smoke: bool
    progress: Progress
    _gateways: int = field(default=0)

    def engine_settings(self) -> Settings:
        return engine_settings(self.model, **ENGINE_SETTINGS)

    def settings(self, prefix: str, **changes: Any) -> Settings:
        """A gateway on the run's engine and S3 server, under store prefix `prefix`, with a
        fresh disk cache. The engine's isolation self-test ran once for the run (open_bench):
        not per gateway (`gateway_settings` leaves it off)."""
        self._gateways += 1
        values: dict[str, Any] = {
            **ENGINE_SETTINGS,
            "cache_dir": str(self.work / f"cache-{self._gateways}-{prefix}"),
            "poll_interval_s": 2.0,
            "drain_grace_s": 1.0,
            "max_concurrent_requests": 512,
            "tenant_max_concurrent": 512,
            "tenant_max_tokens": 256,
            "default_max_tokens": 16,
        }
        values.update(changes)
        return gateway_settings(
            self.model, self.work, tenants=self.tenants_file, s3=self.s3, prefix=prefix, **values
        )

    def registry(self, prefix: str) -> Registry:
        """The store as the gateway sees it, for uploads that bypass the Admin API."""
        backend = S3Backend(
            self.s3.bucket,
            prefix,
            endpoint_url=self.s3.endpoint_url,
            region=self.s3.region,
            access_key_id=self.s3.access_key,
            secret_access_key=self.s3.secret_key,
        )
        spec = BaseModelSpec.from_hf_config(
            self.model, max_rank=MAX_RANK, aliases=(devtools.TINY_MODEL_NAME,)
        )
        return Registry(backend, spec, Limits())

    def object_key(self, prefix: str, name: str, sha: str, filename: str) -> str:
        """The S3 key of one stored adapter file (the store's documented layout)."""
        return f"{prefix}/tenants/{TENANT}/adapters/{name}/versions/{sha}/{filename}"

    @contextlib.asynccontextmanager
    async def gateway(
        self, prefix: str, engine: Engine | None = None, **changes: Any
    ) -> AsyncIterator[Gateway]:
        """A gateway on `engine` (default: the shared one); at exit it stops and the engine is
        emptied."""
        engine = self.engine if engine is None else engine
        try:
            async with (
                running_gateway(self.settings(prefix, **changes), engine, grace=0.5) as server,
                AsyncGatewayClient(target(server), USER_KEY, timeout=300.0) as user,
                AsyncGatewayClient(target(server), ADMIN_KEY, timeout=300.0) as admin,
            ):
                yield Gateway(server, user, admin)
        finally:
            await clear_engine(engine)


@contextlib.asynccontextmanager
async def open_bench(work: Path, *, smoke: bool, progress: Progress) -> AsyncIterator[Bench]:
    """Model, S3 server and the one engine of the run (with its isolation self-test)."""
    from lora_gateway.engine.selftest import require_isolation
    from lora_gateway.engine.vllm_engine import VLLMEngine

    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    with progress.phase("setup: tiny model"):
        model = await asyncio.to_thread(devtools.make_model, work / "tiny-llama")
    with s3_server("lora-gateway-bench") as s3, s3.credentials_in_env():
        with progress.phase("setup: engine start"):
            engine = await VLLMEngine.start(engine_settings(model, **ENGINE_SETTINGS))
        try:
            with progress.phase("setup: isolation self-test"):
                await require_isolation(engine, str(model))
                await clear_engine(engine)
            yield Bench(
                work=work,
                model=model,
                s3=s3,
                engine=engine,
                tenants_file=write_tenants(
                    work / "tenants.yaml",
                    {
                        TENANT: {
                            "max_concurrent": 512,
                            "max_tokens": 256,
                            "max_concurrent_uploads": 8,
                            "max_adapters": 20_000,
                        }
                    },
                ),
                smoke=smoke,
                progress=progress,
            )
        finally:
            await engine.shutdown()


SETUP_PHASES = 3


#: What a vLLM engine (or a server that runs one) looks like in `ps`.
ENGINE_MARKERS = ("VLLM::EngineCore", "VLLM::Worker", "vllm.entrypoints", "lora-gateway serve")


def other_engines() -> list[str]:
    """vLLM engines and gateway servers running on this machine that this process did not start
    (`pid: command`): any of them makes every figure of a run wrong (up to 2.5x measured)."""
    mine = {child.pid for child in psutil.Process().children(recursive=True)}
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            command = " ".join(process.info["cmdline"] or [process.info["name"] or ""])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.pid in mine or process.pid == psutil.Process().pid:
            continue
        if any(marker in command for marker in ENGINE_MARKERS):
            found.append(f"{process.pid}: {command.strip()[:120]}")
    return found
