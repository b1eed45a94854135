"""JSON log lines carry the request id of the RPC they belong to."""

from __future__ import annotations

import asyncio
import json
import logging

from lora_gateway import logs


async def test_json_lines_carry_the_request_id_of_their_task() -> None:
    formatter = logs.JsonFormatter()
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    logger = logging.getLogger("lora_gateway.test_logs")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)

    async def rpc(rid: str) -> None:
        logs.request_id.set(rid)
        await asyncio.sleep(0)
        logger.info("served", extra={"tenant": "acme"})

    await asyncio.gather(rpc("req-a"), rpc("req-b"))
    entries = [json.loads(line) for line in lines]
    assert sorted(e["request_id"] for e in entries) == ["req-a", "req-b"]
    assert all(e["msg"] == "served" and e["tenant"] == "acme" for e in entries)
    assert all(e["level"] == "INFO" and e["ts"].endswith("Z") for e in entries)
