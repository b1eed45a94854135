"""A hostile tenant's poisoned adapter, end to end, on an engine of its own (issue 12).

The poison is the issue's: a PEFT adapter whose adapter_config.json says `lora_alpha: 1e300`.
The scaling overflows the engine's float32, the adapter's requests compute NaN, and their NaN
K/V poison other tenants' later requests (vLLM's CPU attention reads the tail of a reused KV
block; docs/reliability.md, "Hostile tenants", "Engine poisoning").

1. Uploaded through the Admin API, it is refused: INVALID_ARGUMENT naming lora_alpha.
2. With the one validation check switched off (monkeypatched here; there is no production
   switch), it uploads, and one request runs with it. The runtime canary then catches the damage
   within DETECT_BOUND_S of that request's end; health is NOT_SERVING during recovery; the
   version is quarantined (refused with FAILED_PRECONDITION, audited, persisted in the store's
   manifest, refused again on re-upload); the engine is restarted in-process (self-test and
   canary again) and health is SERVING again; another tenant's base-model and adapter requests
   equal their PEFT references token for token, alone and in a batch.
3. Without the canary (its task stopped, the poison put into the engine directly), the damage is
   real: the other tenant's outputs after one poisoned request are wrong.
4. (second test, the session's engine, a simulated mismatch) A server that does not own its
   engine quarantines and sets `engine_failed` instead of restarting.

The engine is this test's own (never the session's): the poison must not leak into other tests.
Figures are printed for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_store import LocalBackend, Quarantined, Registry, validate
from adapter_store.model import CONFIG_FILE, AdapterRef
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.base import GenerateParams, LoadedAdapter, Prompt, next_lora_id
from lora_gateway.engine.canary import CanaryReport
from lora_gateway.engine.selftest import collect
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key
from tests.conftest import AdapterFactory, engine_settings

pytestmark = pytest.mark.engine

SC = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: canary_interval_s of this test, and the detection bound it documents: one interval plus a
#: check (the first check after the poisoned request normally catches it at once).
INTERVAL_S = 2.0
DETECT_BOUND_S = INTERVAL_S + 5.0
#: Restart (a fresh engine core, ~20 s here), self-test, canary re-check: a loose bound for a
#: loaded 2-core machine.
RECOVER_BOUND_S = 120.0
MAX_TOKENS = 8
GREEDY = GenerateOptions(max_tokens=MAX_TOKENS)  # temperature unset: the server's, 0
PROMPTS = devtools.SAMPLE_PROMPTS[:3]
#: The poisoned request's prompt: longer than the victims' (its NaN K/V then cover their tails).
POISON_PROMPT = " ".join(devtools.SAMPLE_PROMPTS)


def key(tenant: str, role: str) -> str:
    return f"poison-test-{tenant}-{role}"


def write_tenants(path: Path) -> Path:
    tenants = {
        tenant: {
            "max_tokens": 64,
            "keys": [
                {"id": f"{tenant}-{role}", "sha256": hash_key(key(tenant, role)), "role": role}
                for role in ("user", "tenant-admin")
            ],
        }
        for tenant in ("evil", "victim")
    }
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def make_poison(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    config = json.loads((out / CONFIG_FILE).read_text())
    config["lora_alpha"] = 1e300
    (out / CONFIG_FILE).write_text(json.dumps(config))
    return out


async def health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return int(answer.status)


async def wait_health(port: int, status: int, bound_s: float) -> float:
    """Seconds until health reports `status` (fails beyond `bound_s`)."""
    started = time.monotonic()
    while await health(port) != status:
        assert time.monotonic() - started < bound_s, f"health not {status} within {bound_s}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_poisoned_adapter_refused_then_caught_quarantined_and_engine_recovered(
    tiny_model: Path,
    make_test_adapter: AdapterFactory,
    reference: devtools.ReferenceGenerator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = tmp_path / "store"
    audit_log = tmp_path / "audit.jsonl"
    settings = engine_settings(
        tiny_model,
        store=f"file://{store}",
        tenants_file=str(write_tenants(tmp_path / "tenants.yaml")),
        listen="127.0.0.1:0",
        cache_dir=str(tmp_path / "cache"),
        base_model_aliases=(devtools.TINY_MODEL_NAME,),
        default_max_tokens=MAX_TOKENS,
        tenant_max_tokens=64,
        audit_log=str(audit_log),
        canary_interval_s=INTERVAL_S,
        self_test=True,
    )
    good = make_test_adapter(seed=11)
    poison = make_poison(make_test_adapter(seed=5), tmp_path / "poison")
    expected = {
        (name, prompt): reference.generate(prompt, path, MAX_TOKENS)
        for name, path in (("", None), ("helper", good))
        for prompt in PROMPTS
    }
    started = time.monotonic()
    server = await asyncio.wait_for(GatewayServer.start(settings), 180)  # owns its engine
    print(f"\nserver with its own engine up in {time.monotonic() - started:.1f}s")
    target = f"127.0.0.1:{server.port}"
    clients = {
        (tenant, role): AsyncGatewayClient(target, key(tenant, role), max_retries=0)
        for tenant in ("evil", "victim")
        for role in ("user", "tenant-admin")
    }
    victim, evil = clients[("victim", "user")], clients[("evil", "user")]

    async def outputs(*, batched: bool = False) -> dict[tuple[str, str], list[int]]:
        cases = list(expected)

        async def one(name: str, prompt: str) -> list[int]:
            return (await victim.generate(name, prompt, GREEDY)).token_ids

        if batched:
            got = await asyncio.gather(*(one(n, p) for n, p in cases))
        else:
            got = [await one(n, p) for n, p in cases]
        return dict(zip(cases, got, strict=True))

    try:
        assert server.owns_engine
        assert server.canary is not None
        assert server.gateway.residency.spec.dtype == "float32"  # Settings.dtype reached it
        await clients[("victim", "tenant-admin")].upload_adapter("helper", good)
        assert await outputs() == expected  # the references hold before anything happens

        # 1. The poison is refused at upload, with a message naming lora_alpha.
        with pytest.raises(errors.GatewayError) as refused:
            await clients[("evil", "tenant-admin")].upload_adapter("poison", poison)
        assert refused.value.code == SC.INVALID_ARGUMENT
        assert "lora_alpha" in str(refused.value)

        # 2. The check switched off, in this test only: it uploads; one request runs with it.
        monkeypatch.setattr(validate, "check_effective_weights", lambda *a, **k: None)
        info = await clients[("evil", "tenant-admin")].upload_adapter("poison", poison)
        sha = info.version.removeprefix("sha256:")
        poisoned = await evil.generate("poison", POISON_PROMPT, GREEDY)
        detected_s = await wait_health(server.port, NOT_SERVING, DETECT_BOUND_S)
        print(f"poisoned request output {poisoned.token_ids}; NOT_SERVING {detected_s:.2f}s later")

        # Quarantined: refused (even while the engine restarts), with a clear error.
        with pytest.raises(errors.GatewayError) as quarantined:
            await evil.generate("poison", "hello", GREEDY)
        assert quarantined.value.code == SC.FAILED_PRECONDITION
        assert "quarantined" in str(quarantined.value)
        assert await health(server.port) == NOT_SERVING  # still recovering

        recovered_s = await wait_health(server.port, SERVING, RECOVER_BOUND_S)
        print(f"SERVING again {recovered_s + detected_s:.1f}s after the poisoned request ended")
        assert [r.quarantined for r in server.recoveries] == [(f"evil/poison@sha256:{sha}",)]
        [recovery] = server.recoveries
        print(f"recovery {recovery.recovered_s:.1f}s, engine restart {recovery.restart_s:.1f}s")

        # 3. Another tenant's requests are exact again: alone and in one batch.
        alone = await outputs()
        batched = await outputs(batched=True)
        correct = sum(alone[c] == want for c, want in expected.items())
        print(
            f"after recovery: {correct}/{len(expected)} correct alone, "
            f"{sum(batched[c] == w for c, w in expected.items())}/{len(expected)} batched"
        )
        assert alone == expected
        assert batched == expected

        # The quarantine is in the store's manifest: a restarted process, another replica and
        # a re-upload of the same bytes all refuse it.
        fresh = Registry(LocalBackend(store), server.gateway.residency.spec)
        manifest = await asyncio.to_thread(fresh.get_manifest, "evil", "poison")
        assert manifest.versions[sha].status == "quarantined"
        with pytest.raises(Quarantined):
            await asyncio.to_thread(fresh.resolve, "evil", AdapterRef(None, "poison"))
        with pytest.raises(errors.GatewayError) as again:
            await clients[("evil", "tenant-admin")].upload_adapter("poison", poison)
        assert again.value.code == SC.FAILED_PRECONDITION
        assert "quarantined" in str(again.value)

        # Audited, counted.
        await asyncio.to_thread(server.audit.flush)
        events = [json.loads(line) for line in audit_log.read_text().splitlines()]
        assert [
            (e["tenant"], e["adapter"], e["version"])
            for e in events
            if e["rpc"] == "runtime-canary/quarantine"
        ] == [("evil", "poison", f"sha256:{sha}")]
        metrics = server.metrics
        assert metrics.canary_checks_total.labels("fail")._value.get() == 1
        assert metrics.quarantined_versions_total._value.get() == 1
        assert metrics.engine_restarts_total._value.get() == 1

        # 4. Without the canary, the damage is real: the poison put into the engine directly
        # (no validation, no quarantine), one request, then the other tenant's requests.
        assert server._canary_task is not None
        server._canary_task.cancel()
        engine = server.engine
        direct = LoadedAdapter(next_lora_id(), "poison-direct", tmp_path / "poison")
        await engine.add_adapter(direct)  # type: ignore[attr-defined]
        params = GenerateParams(max_tokens=MAX_TOKENS)
        await collect(engine, Prompt(text=POISON_PROMPT), params, direct)
        damaged = await outputs()
        wrong = sum(damaged[c] != want for c, want in expected.items())
        print(f"without the canary, after one poisoned request: {wrong}/{len(expected)} wrong")
        assert wrong >= len(expected) // 2, damaged
    finally:
        for client in clients.values():
            await client.close()
        await server.stop(grace=0)


async def test_a_canary_failure_on_a_shared_engine_quarantines_and_exits(
    engine: object,
    tiny_model: Path,
    make_test_adapter: AdapterFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that does not own its engine cannot restart it: after quarantining it sets
    `engine_failed` (`lora-gateway serve` exits 1). The mismatch is simulated (this is the
    session's shared engine: it is never poisoned); residency's hook and the monitor are real."""
    settings = engine_settings(
        tiny_model,
        store=f"file://{tmp_path / 'store'}",
        tenants_file=str(write_tenants(tmp_path / "tenants.yaml")),
        listen="127.0.0.1:0",
        cache_dir=str(tmp_path / "cache"),
        base_model_aliases=(devtools.TINY_MODEL_NAME,),
        default_max_tokens=MAX_TOKENS,
        tenant_max_tokens=64,
        self_test=False,
        canary_interval_s=3600.0,  # no periodic check: only the one this test runs
    )
    server = await GatewayServer.start(settings, engine=engine)  # type: ignore[arg-type]
    user = AsyncGatewayClient(f"127.0.0.1:{server.port}", key("victim", "user"), max_retries=0)
    admin = AsyncGatewayClient(
        f"127.0.0.1:{server.port}", key("victim", "tenant-admin"), max_retries=0
    )
    try:
        assert not server.owns_engine
        monitor = server.canary
        assert monitor is not None
        await admin.upload_adapter("suspect", make_test_adapter(seed=12))

        async def mismatch(rounds: int = 1) -> CanaryReport:
            return CanaryReport("fail", mismatches=("base / 'simulated'",))

        monkeypatch.setattr(monitor.canary, "check", mismatch)
        served = await user.generate("suspect", PROMPTS[0], GREEDY)
        # The first use of the new version asked for a check: the monitor runs it at once.
        await asyncio.wait_for(server.engine_failed.wait(), 10)
        assert monitor.completed == 1
        assert await health(server.port) == NOT_SERVING
        with pytest.raises(errors.GatewayError) as refused:
            await user.generate("suspect", PROMPTS[0], GREEDY)
        assert refused.value.code == SC.FAILED_PRECONDITION
        assert "quarantined" in str(refused.value)
        assert served.adapter is not None
        assert server.recoveries[0].quarantined == (f"victim/suspect@{served.adapter.version}",)
        assert server.recoveries[0].recovered_s is None  # not restarted: not ours
        await engine.check_health()  # type: ignore[attr-defined]
    finally:
        await user.close()
        await admin.close()
        await server.stop(grace=0)
