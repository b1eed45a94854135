"""Store faults seen through the gateway: down, slow, corrupt, cut mid-download.

Network faults come from `FaultProxy` between the gateway and SeaweedFS; corrupt bytes are
written into the S3 server directly, behind the registry's back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from lora_gateway import devtools, errors
from lora_gateway.client import GenerateOptions
from lora_gateway.engine.vllm_engine import VLLMEngine
from tests.conftest import AdapterFactory
from tests.faults.conftest import MAX_TOKENS, PREFIX, FaultEnv
from tests.support.metrics import residency_counts

GREEDY = GenerateOptions(max_tokens=MAX_TOKENS)  # temperature unset: the server's, 0

pytestmark = pytest.mark.engine

PROMPT = devtools.SAMPLE_PROMPTS[1]
#: Bound for a cold request against a dead store: 2 attempts x 1 s read timeout, backoff,
#: manifest then data, scheduling slack on a busy 2-core machine.
DEAD_STORE_BOUND_S = 10.0


def weights_key(tenant: str, name: str, sha: str) -> str:
    return f"{PREFIX}/tenants/{tenant}/adapters/{name}/versions/{sha}/adapter_model.safetensors"


def tmp_leftovers(fenv: FaultEnv) -> list[Path]:
    tmp = fenv.cache_root / ".tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


async def test_store_down_cold_fails_fast_warm_keeps_serving(
    fenv: FaultEnv, make_test_adapter: AdapterFactory
) -> None:
    residency = fenv.server.gateway.residency
    names = [f"down-{i}" for i in range(4)]
    outputs: dict[str, list[int]] = {}
    async with fenv.client("acme", "admin") as admin, fenv.client("acme") as user:
        for i, name in enumerate(names):
            await admin.upload_adapter(name, make_test_adapter(seed=200 + i, rank=8))
        await admin.upload_adapter("down-cold", make_test_adapter(seed=210, rank=8))
        for name in names:  # capacity 3: down-0 ends up on disk only, the others in the engine
            outputs[name] = (await user.generate(name, PROMPT, GREEDY)).token_ids
        assert len({tuple(t) for t in outputs.values()}) == len(names)
        disk_hits = residency_counts(residency.metrics).disk_hits

        fenv.proxy.blackhole()
        started = time.monotonic()
        cold = await asyncio.gather(
            *(
                user.generate(name, PROMPT, GREEDY)
                for name in ("down-cold", "never-uploaded", "down-cold")
            ),
            return_exceptions=True,
        )
        took = time.monotonic() - started
        assert [type(r) for r in cold] == [errors.Unavailable] * 3, cold
        assert took < DEAD_STORE_BOUND_S, took

        # Every adapter already in the engine or on disk keeps serving, token for token.
        for _ in range(2):
            for name in names:
                result = await user.generate(name, PROMPT, GREEDY)
                assert result.token_ids == outputs[name], name
        assert residency_counts(residency.metrics).disk_hits > disk_hits, (
            "evicted adapters came back from disk"
        )
        base = await user.generate("", PROMPT, GREEDY)
        assert base.token_ids

        fenv.proxy.passthrough()
        recovered = await user.generate("down-cold", PROMPT, GREEDY)
        assert recovered.token_ids
    print(f"\nstore down: cold refused in {took:.2f}s, warm served {2 * len(names)}/8")


async def test_slow_store_deadlines_no_pileup_other_tenant_unaffected(
    fenv: FaultEnv, make_test_adapter: AdapterFactory
) -> None:
    async with fenv.client("globex", "admin") as gadmin, fenv.client("globex") as guser:
        await gadmin.upload_adapter("g-warm", make_test_adapter(seed=220, rank=8))
        expected = (await guser.generate("g-warm", PROMPT, GREEDY)).token_ids
        quiet = []
        for _ in range(3):
            t = time.monotonic()
            await guser.generate("g-warm", PROMPT, GREEDY)
            quiet.append(time.monotonic() - t)
    async with fenv.client("acme", "admin") as admin:
        await admin.upload_adapter("slow-cold", make_test_adapter(seed=221, rank=8))

    await asyncio.sleep(0.2)
    tasks_before = len(asyncio.all_tasks())
    threads_before = threading.active_count()
    fenv.proxy.latency(800)

    async def cold(name: str) -> tuple[type[BaseException] | None, float]:
        async with fenv.client("acme") as user:
            started = time.monotonic()
            try:
                await user.generate(name, PROMPT, GREEDY, timeout=1.0)
            except errors.GatewayError as exc:
                return type(exc), time.monotonic() - started
            return None, time.monotonic() - started

    async def warm() -> list[float]:
        took = []
        async with fenv.client("globex") as user:
            for _ in range(8):
                started = time.monotonic()
                result = await user.generate("g-warm", PROMPT, GREEDY)
                took.append(time.monotonic() - started)
                assert result.token_ids == expected
        return took

    names = ["slow-cold"] * 12 + [f"ghost-{i}" for i in range(8)]
    warm_task = asyncio.create_task(warm())
    cold_results = await asyncio.gather(*(cold(n) for n in names))
    warm_took = await warm_task
    peak_threads = threading.active_count()
    fenv.proxy.passthrough()

    for kind, took in cold_results:
        assert kind is errors.DeadlineExceeded, (kind, took)
        assert took < 1.0 + 0.75, took
    # Another tenant's warm adapter: every request served, never held behind the slow store.
    assert len(warm_took) == 8
    assert max(warm_took) < max(quiet) + 1.0, (warm_took, quiet)

    # No pile-up: once the store answers again, the stragglers end and nothing stays behind.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if len(asyncio.all_tasks()) <= tasks_before + 1:
            break
        await asyncio.sleep(0.1)
    tasks_after = len(asyncio.all_tasks())
    threads_after = threading.active_count()
    assert tasks_after <= tasks_before + 1, (tasks_before, tasks_after)
    assert peak_threads - threads_before <= 8, (threads_before, peak_threads)
    assert threads_after <= peak_threads
    print(
        f"\nslow store: {len(names)} cold requests, all DEADLINE_EXCEEDED in "
        f"<= {max(t for _, t in cold_results):.2f}s; warm max {max(warm_took):.2f}s "
        f"(quiet {max(quiet):.2f}s); threads {threads_before}->{peak_threads}->{threads_after}, "
        f"tasks {tasks_before}->{tasks_after}"
    )


async def test_corrupt_bytes_are_data_loss_and_go_nowhere(
    fenv: FaultEnv, make_test_adapter: AdapterFactory
) -> None:
    residency = fenv.server.gateway.residency
    engine = fenv.server.engine
    assert isinstance(engine, VLLMEngine)
    async with fenv.client("acme", "admin") as admin:
        info = await admin.upload_adapter("corrupt", make_test_adapter(seed=230, rank=8))
    sha = info.version.removeprefix("sha256:")
    s3 = fenv.s3.client()
    key = weights_key("acme", "corrupt", sha)
    body = bytearray(s3.get_object(Bucket=fenv.s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01  # one bit, in the tensor data: same size, another sha256
    s3.put_object(Bucket=fenv.s3.bucket, Key=key, Body=bytes(body))

    in_engine = await engine.list_adapters()
    loads, entries = (
        residency_counts(residency.metrics).engine_loads,
        len(residency.cache.entries()),
    )
    async with fenv.client("acme") as user:
        for _ in range(2):  # and again: nothing bad was kept
            with pytest.raises(errors.DataLoss):
                await user.generate("corrupt", PROMPT, GREEDY)
    assert not residency.cache.contains(sha)
    assert not (fenv.cache_root / sha[:2] / sha).exists()
    assert tmp_leftovers(fenv) == []
    assert len(residency.cache.entries()) == entries
    assert residency_counts(residency.metrics).engine_loads == loads
    assert not residency.is_resident(("acme", "corrupt", sha))
    assert await engine.list_adapters() == in_engine

    fenv.server.audit.flush()
    audit = Path(fenv.server.settings.audit_log or "")
    text = await asyncio.to_thread(audit.read_text)
    events = [json.loads(line) for line in text.splitlines()]
    lost = [e for e in events if e["code"] == "DATA_LOSS" and e["rpc"].endswith("/Generate")]
    assert len(lost) == 2, lost
    assert all(e["principal_tenant"] == "acme" and e["decision"] == "error" for e in lost)


async def test_connection_cut_mid_download_one_retry_never_half_visible(
    fenv: FaultEnv, make_test_adapter: AdapterFactory
) -> None:
    residency = fenv.server.gateway.residency
    async with fenv.client("acme", "admin") as admin:
        once = await admin.upload_adapter("cut-once", make_test_adapter(seed=240, rank=8))
        always = await admin.upload_adapter("cut-always", make_test_adapter(seed=241, rank=8))
    sha_once = once.version.removeprefix("sha256:")
    sha_always = always.version.removeprefix("sha256:")
    sizes = {f.filename: f.size for f in once.files}

    # Watch the cache while downloads run: a version's folder is complete or absent.
    half_visible: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        final = fenv.cache_root / sha_once[:2] / sha_once
        while not stop.is_set():
            if final.exists():
                for name, size in sizes.items():
                    try:
                        if (final / name).stat().st_size != size:
                            half_visible.append(name)
                    except FileNotFoundError:
                        half_visible.append(name)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proxy = fenv.proxy
    try:
        gets = proxy.stats.count("GET", f"/cut-once/versions/{sha_once}/adapter_model")
        resets = proxy.stats.resets
        proxy.reset_after(
            2048, match=f"cut-once/versions/{sha_once}/adapter_model".encode(), times=1
        )
        async with fenv.client("acme") as user:
            result = await user.generate("cut-once", PROMPT, GREEDY)
        assert result.token_ids
        assert proxy.stats.resets - resets == 1
        assert proxy.stats.count("GET", f"/cut-once/versions/{sha_once}/adapter_model") - gets == 2
        assert residency.cache.contains(sha_once)

        # Cut every time: UNAVAILABLE after exactly one retry, nothing kept.
        path = f"/cut-always/versions/{sha_always}/adapter_model"
        gets = proxy.stats.count("GET", path)
        proxy.reset_after(2048, match=path[1:].encode())
        async with fenv.client("acme") as user:
            with pytest.raises(errors.Unavailable):
                await user.generate("cut-always", PROMPT, GREEDY)
        assert proxy.stats.count("GET", path) - gets == 2
        assert not residency.cache.contains(sha_always)
        assert not (fenv.cache_root / sha_always[:2] / sha_always).exists()
    finally:
        stop.set()
        watcher.join(5)
    assert half_visible == []
    assert tmp_leftovers(fenv) == []
