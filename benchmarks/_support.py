"""Shared set-up of the benchmarks: tiny model, adapters, S3 server, one engine, gateways.

- The base model is `lora_gateway.devtools.make_model` (a tiny random Llama, generated once per
  run). Adapters are written with numpy (`write_lora`), which is fast enough for a thousand.
- The store is a real S3 server over HTTP: SeaweedFS, started by `tests/support/s3server.py`
  (the same server the tests use).
- One vLLM engine serves the whole run (`max_loras` 4, `max_cpu_loras` 16, rank up to 64); each
  benchmark starts its own `GatewayServer` on it (fresh residency, statistics and disk cache) and
  empties the engine again when it stops.
- Timed request helpers return `RequestResult`s; `summarize` turns them into percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import save_file
from tqdm import tqdm  # type: ignore[import-untyped]

from adapter_store import BaseModelSpec, Limits, Registry
from adapter_store.model import MODULE_PARENTS
from adapter_store.s3 import S3Backend
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.config import Settings
from lora_gateway.engine.base import Engine, GenerateParams, LoadedAdapter, Prompt
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key
from tests.support.s3server import S3Server, s3_server

TENANT = "bench"
USER_KEY = "bench-user-secret"
ADMIN_KEY = "bench-admin-secret"
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


def lora_tensors(
    model_dir: Path, *, rank: int, seed: int, modules: Sequence[str], scale: float = 0.02
) -> dict[str, np.ndarray[Any, Any]]:
    """Random float32 LoRA A/B tensors for `modules` of every layer of the model."""
    spec = BaseModelSpec.from_hf_config(model_dir, max_rank=512)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for layer in range(spec.num_layers):
        for module in modules:
            fan_in, fan_out = spec.module_shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"
            a = rng.normal(0.0, scale, (rank, fan_in)).astype(np.float32)
            b = rng.normal(0.0, scale, (fan_out, rank)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    return tensors


def lora_config(rank: int, modules: Sequence[str]) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": float(2 * rank),
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "bias": "none",
        "base_model_name_or_path": devtools.TINY_MODEL_NAME,
    }


def save_lora(out: Path, tensors: dict[str, np.ndarray[Any, Any]], config: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def write_lora(
    model_dir: Path,
    out: Path,
    *,
    rank: int = 8,
    seed: int = 1,
    modules: Sequence[str] = devtools.ATTENTION_MODULES,
) -> Path:
    """A PEFT LoRA adapter folder with random weights (numpy, no torch)."""
    tensors = lora_tensors(model_dir, rank=rank, seed=seed, modules=modules)
    return save_lora(out, tensors, lora_config(rank, modules))


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
        return f"127.0.0.1:{self.server.port}"

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
        return Settings.from_mapping({"model": str(self.model), **ENGINE_SETTINGS})

    def settings(self, prefix: str, **changes: Any) -> Settings:
        self._gateways += 1
        values: dict[str, Any] = {
            "model": str(self.model),
            **ENGINE_SETTINGS,
            "store": f"s3://{self.s3.bucket}/{prefix}",
            "s3_endpoint": self.s3.endpoint_url,
            "s3_region": self.s3.region,
            "tenants_file": str(self.tenants_file),
            "listen": "127.0.0.1:0",
            "cache_dir": str(self.work / f"cache-{self._gateways}-{prefix}"),
            "base_model_aliases": (devtools.TINY_MODEL_NAME,),
            # The engine's isolation self-test ran once for the run (open_bench); not per gateway.
            "self_test": False,
            "poll_interval_s": 2.0,
            "drain_grace_s": 1.0,
            "max_concurrent_requests": 512,
            "tenant_max_concurrent": 512,
            "tenant_max_tokens": 256,
            "default_max_tokens": 16,
        }
        values.update(changes)
        return Settings.from_mapping(values)

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
    async def gateway(self, prefix: str, **changes: Any) -> AsyncIterator[Gateway]:
        """A gateway on the shared engine; at exit it stops and the engine is emptied."""
        server = await GatewayServer.start(self.settings(prefix, **changes), engine=self.engine)
        target = f"127.0.0.1:{server.port}"
        user = AsyncGatewayClient(target, USER_KEY, timeout=300.0)
        admin = AsyncGatewayClient(target, ADMIN_KEY, timeout=300.0)
        try:
            yield Gateway(server, user, admin)
        finally:
            await user.close()
            await admin.close()
            await server.stop(grace=0.5)
            await clear_engine(self.engine)


async def clear_engine(engine: Engine) -> None:
    """Remove every adapter (the shared engine starts each benchmark empty)."""
    with contextlib.suppress(errors.EngineDead):  # a dead engine has nothing left to clear
        for lora_int_id in await engine.list_adapters():
            await engine.remove_adapter(lora_int_id)


def write_tenants(path: Path) -> Path:
    tenants = {
        "tenants": {
            TENANT: {
                "max_concurrent": 512,
                "max_tokens": 256,
                "keys": [
                    {"id": "bench-user", "sha256": hash_key(USER_KEY), "role": "user"},
                    {"id": "bench-admin", "sha256": hash_key(ADMIN_KEY), "role": "tenant-admin"},
                ],
            }
        }
    }
    path.write_text(yaml.safe_dump(tenants))
    return path


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
            settings = Settings.from_mapping({"model": str(model), **ENGINE_SETTINGS})
            engine = await VLLMEngine.start(settings)
        try:
            with progress.phase("setup: isolation self-test"):
                await require_isolation(engine, str(model))
                await clear_engine(engine)
            yield Bench(
                work=work,
                model=model,
                s3=s3,
                engine=engine,
                tenants_file=write_tenants(work / "tenants.yaml"),
                smoke=smoke,
                progress=progress,
            )
        finally:
            await engine.shutdown()


SETUP_PHASES = 3
