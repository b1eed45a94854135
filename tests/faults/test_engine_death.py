"""The engine core process dies (SIGKILL) under a gateway: fail fast, NOT_SERVING, exit.

A dedicated engine (never the session's shared one) under its own GatewayServer, with the
engine watched every 0.5 s (`engine_watch_interval_s`). Its `VLLM::EngineCore` process is found
among the children of this pytest process that appeared with it, and killed mid-generation:

- the in-flight streaming request ends with UNAVAILABLE within seconds;
- new requests are refused with UNAVAILABLE within seconds (nothing hangs: every wait is bound);
- gRPC health reports NOT_SERVING within the watch interval plus slack, and `engine_failed` is
  set (what makes `lora-gateway serve` exit 1, for Kubernetes to restart the pod);
- the server stops within a bound, and no process of that engine is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key
from tests.conftest import engine_settings

pytestmark = pytest.mark.engine

KEY = "secret-death-user"
WATCH_S = 0.5
SLACK_S = 3.0
PROMPT = devtools.SAMPLE_PROMPTS[0]


def descendants() -> set[int]:
    """Child processes of this one, except multiprocessing's resource tracker: one per
    process, started by the first engine and shared by every later one (not the engine's)."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in title(p.pid)
    }


def title(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return ""


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def new_processes() -> Iterator[set[int]]:
    """Processes that appear during the test; whatever is left of them is killed after it."""
    before = descendants()
    appeared: set[int] = set()
    yield appeared
    appeared |= descendants() - before
    kill_all(appeared)
    for pid in appeared:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(10)


async def health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return int(answer.status)


async def test_engine_core_killed_fails_fast_and_reports_not_serving(
    tiny_model: Path, tmp_path: Path, new_processes: set[int]
) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {"tenants": {"death": {"keys": [{"id": "u", "sha256": hash_key(KEY), "role": "user"}]}}}
        )
    )
    settings = engine_settings(
        tiny_model,
        store=f"file://{tmp_path / 'store'}",
        tenants_file=str(tenants),
        listen="127.0.0.1:0",
        cache_dir=str(tmp_path / "cache"),
        base_model_aliases=(devtools.TINY_MODEL_NAME,),
        default_max_tokens=8,
        tenant_max_tokens=200,
        self_test=False,
        engine_watch_interval_s=WATCH_S,
    )
    before = descendants()
    server = await asyncio.wait_for(GatewayServer.start(settings), 120)
    try:
        started = descendants() - before
        new_processes |= started
        cores = [pid for pid in started if "EngineCore" in title(pid)]
        assert len(cores) == 1, {pid: title(pid) for pid in started}
        target = f"127.0.0.1:{server.port}"
        assert await health(server.port) == health_pb2.HealthCheckResponse.SERVING

        async with AsyncGatewayClient(target, KEY, max_retries=0) as client:
            assert (
                await client.generate("", PROMPT, GenerateOptions(max_tokens=4), timeout=30)
            ).text is not None

            first_token = asyncio.Event()
            outcome: dict[str, object] = {}

            async def in_flight() -> None:
                tokens = 0
                try:
                    async for _ in client.generate_stream(
                        "", PROMPT, GenerateOptions(max_tokens=200, ignore_eos=True), timeout=60
                    ):
                        tokens += 1
                        first_token.set()
                    outcome["code"] = grpc.StatusCode.OK
                except errors.GatewayError as exc:
                    outcome["code"] = exc.code
                finally:
                    outcome["ended"] = time.monotonic()
                    outcome["tokens"] = tokens
                    first_token.set()

            task = asyncio.create_task(in_flight())
            await asyncio.wait_for(first_token.wait(), 30)
            assert "code" not in outcome, "the request must still be in flight at the kill"
            killed = time.monotonic()
            os.kill(cores[0], signal.SIGKILL)

            await asyncio.wait_for(task, 10)
            in_flight_s = float(outcome["ended"]) - killed  # type: ignore[arg-type]

            new_codes: list[grpc.StatusCode] = []
            new_times: list[float] = []
            for _ in range(3):
                asked = time.monotonic()
                try:
                    await client.generate("", PROMPT, GenerateOptions(max_tokens=4), timeout=10)
                    new_codes.append(grpc.StatusCode.OK)
                except errors.GatewayError as exc:
                    new_codes.append(exc.code)
                new_times.append(time.monotonic() - asked)

            not_serving_s = None
            while time.monotonic() - killed < WATCH_S + SLACK_S:
                if await health(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    not_serving_s = time.monotonic() - killed
                    break
                await asyncio.sleep(0.05)
            await asyncio.wait_for(server.engine_failed.wait(), SLACK_S)

        print(
            f"\nengine core killed: in-flight {outcome['code']} after {outcome['tokens']} tokens, "
            f"{in_flight_s:.2f}s; new requests {[c.name for c in new_codes]} in "
            f"{max(new_times):.2f}s max; NOT_SERVING after "
            f"{'never' if not_serving_s is None else f'{not_serving_s:.2f}s'}"
        )
        assert outcome["code"] == grpc.StatusCode.UNAVAILABLE
        assert in_flight_s < SLACK_S
        assert new_codes == [grpc.StatusCode.UNAVAILABLE] * 3
        assert max(new_times) < SLACK_S
        assert not_serving_s is not None, "health must go NOT_SERVING"
        assert server.engine_failed.is_set()
    finally:
        stopping = time.monotonic()
        await asyncio.wait_for(server.stop(grace=0), 30)
        print(f"server stopped in {time.monotonic() - stopping:.2f}s")
    new_processes |= descendants() - before
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [pid for pid in new_processes if psutil.pid_exists(pid) and title(pid)]
        if not alive:
            break
        await asyncio.sleep(0.2)
    print(f"left behind after stop: {alive}")
    assert alive == [], {pid: title(pid) for pid in alive}
