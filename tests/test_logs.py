"""JSON log lines: the request id of their RPC; one structured record per audit event."""

from __future__ import annotations

import asyncio
import json
import logging

from lora_gateway import logs
from lora_gateway.audit import AUDIT_LOGGER, AuditLog
from lora_gateway.tenancy import Principal, Role


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


def test_an_audit_event_is_one_structured_record_in_a_json_log_line() -> None:
    """With no audit file, events reach the JSON logs: the fields appear once, nested under
    `audit`, not again as the message text."""
    formatter = logs.JsonFormatter()
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    logger = logging.getLogger(AUDIT_LOGGER)
    capture = Capture()
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        audit = AuditLog(None)
        audit.record(
            principal=Principal("acme", Role.TENANT_ADMIN, "acme-ops"),
            rpc="/lora_gateway.v1.Admin/RevokeAdapter",
            adapter="support-bot-7f3a",
            decision="allow",
        )
        audit.close()
    finally:
        logger.removeHandler(capture)
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert set(entry) == {"ts", "level", "logger", "msg", "request_id", "audit"}
    assert entry["msg"] == "audit"
    assert entry["logger"] == AUDIT_LOGGER
    assert entry["audit"]["adapter"] == "support-bot-7f3a"
    assert entry["audit"]["key_id"] == "acme-ops"
    assert lines[0].count("support-bot-7f3a") == 1
