"""The JSON-lines audit log and the Prometheus metrics (served over real HTTP)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from lora_gateway.audit import AUDIT_LOGGER, AuditLog
from lora_gateway.metrics import Metrics, adapter_label, parse_listen
from lora_gateway.tenancy import Admission, Principal, Role, TenantConfig, hash_key

SECRET_KEY = "sk-live-do-not-log-0123456789"
PRINCIPAL = Principal("acme", Role.TENANT_ADMIN, "acme-ci")
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- audit ----------------------------------------------------------------------------------


def test_audit_writes_json_lines_without_keys(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(str(path)) as audit:
        audit.record(
            principal=PRINCIPAL,
            rpc="/lora_gateway.v1.Admin/RevokeAdapter",
            decision="allow",
            code=grpc.StatusCode.OK,
            tenant="acme",
            adapter="support-bot",
            version="sha256:" + "a" * 64,
            request_id="req-1",
        )
        audit.record(
            principal=None,
            rpc="/lora_gateway.v1.Admin/UploadAdapter",
            decision="deny",
            code=grpc.StatusCode.UNAUTHENTICATED,
            detail="invalid credentials\n" + "x" * 1000,
        )
    raw = path.read_text(encoding="utf-8")
    assert SECRET_KEY not in raw
    assert hash_key(SECRET_KEY) not in raw
    first, second = _lines(path)
    assert RFC3339_UTC.match(first["ts"])
    assert first == first | {
        "principal_tenant": "acme",
        "role": "tenant-admin",
        "key_id": "acme-ci",
        "rpc": "/lora_gateway.v1.Admin/RevokeAdapter",
        "tenant": "acme",
        "adapter": "support-bot",
        "version": "sha256:" + "a" * 64,
        "decision": "allow",
        "code": "OK",
        "detail": "",
        "request_id": "req-1",
    }
    assert second["principal_tenant"] == ""
    assert second["key_id"] == ""
    assert second["decision"] == "deny"
    assert second["code"] == "UNAUTHENTICATED"
    assert len(second["detail"]) <= 200
    assert raw.count("\n") == 2  # the newline inside detail is escaped


async def test_audit_loses_nothing_under_concurrency(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))

    async def worker(n: int) -> None:
        for i in range(50):
            audit.record(
                principal=PRINCIPAL,
                rpc="/lora_gateway.v1.Admin/PinAdapter",
                decision="allow",
                adapter=f"a{n}",
                detail=str(i),
            )
            if i % 10 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(worker(n) for n in range(40)))
    audit.flush()
    assert len(_lines(path)) == 2000  # flush() writes everything queued so far
    audit.record(principal=PRINCIPAL, rpc="x", decision="error", code="INTERNAL")
    audit.close()
    audit.close()  # idempotent
    events = _lines(path)
    assert len(events) == 2001
    assert {(e["adapter"], e["detail"]) for e in events[:-1]} == {
        (f"a{n}", str(i)) for n in range(40) for i in range(50)
    }


def test_audit_without_path_goes_to_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    audit = AuditLog(None)
    event = audit.record(principal=PRINCIPAL, rpc="/r", decision="deny", code="PERMISSION_DENIED")
    audit.close()
    records = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    assert len(records) == 1
    assert records[0].getMessage() == "audit"
    assert records[0].__dict__["audit"] == event


def test_audit_rejects_unknown_decisions(tmp_path: Path) -> None:
    with AuditLog(str(tmp_path / "a.jsonl")) as audit, pytest.raises(ValueError):
        audit.record(principal=PRINCIPAL, rpc="/r", decision="maybe")  # type: ignore[arg-type]


# --- metrics --------------------------------------------------------------------------------


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metrics_move() -> None:
    m = Metrics()
    adapter = adapter_label("acme", "support-bot")
    assert adapter == "acme/support-bot"
    assert adapter_label("acme", "") == "base"
    assert adapter_label(None, "typo'd user text") == "none"
    m.request_done("acme", adapter, grpc.StatusCode.OK, 0.2)
    m.request_done("acme", adapter, grpc.StatusCode.OK, 0.3)
    m.request_done("", adapter_label(None, None), "UNAUTHENTICATED")
    m.first_token("acme", 0.05)
    m.tokens_out("acme", 17)
    m.queued(0.01)
    m.cache_hit("engine")
    m.cache_miss("disk")
    m.load_phase("validate", 0.02)
    with m.time_load("fetch"):
        pass
    m.evicted("engine")
    m.engine_loaded()
    m.revoked_unload()
    m.slot_waited("tenant")
    m.slot_waited("engine")
    m.slot_waited("engine")
    m.manifest_read()
    m.manifest_evicted()
    m.set_resident("engine", 3)
    m.set_engine_healthy(True)
    m.set_inflight("acme", 2)

    def v(name: str, **labels: str) -> float | None:
        return _value(m, name, **labels)

    assert v("lora_gateway_requests_total", tenant="acme", adapter=adapter, code="OK") == 2
    assert v("lora_gateway_requests_total", tenant="-", adapter="none", code="UNAUTHENTICATED") == 1
    assert v("lora_gateway_request_seconds_count") == 2
    assert v("lora_gateway_time_to_first_token_seconds_count", tenant="acme") == 1
    assert v("lora_gateway_tokens_out_total", tenant="acme") == 17
    assert v("lora_gateway_queue_seconds_count") == 1
    assert v("lora_gateway_cache_hits_total", tier="engine") == 1
    assert v("lora_gateway_cache_misses_total", tier="disk") == 1
    assert v("lora_gateway_adapter_load_seconds_count", phase="validate") == 1
    assert v("lora_gateway_adapter_load_seconds_count", phase="fetch") == 1
    assert v("lora_gateway_evictions_total", tier="engine") == 1
    assert v("lora_gateway_engine_loads_total") == 1
    assert v("lora_gateway_revoked_unloads_total") == 1
    assert v("lora_gateway_slot_waits_total", queue="tenant") == 1
    assert v("lora_gateway_slot_waits_total", queue="engine") == 2
    assert v("lora_gateway_manifest_reads_total") == 1
    assert v("lora_gateway_manifest_evictions_total") == 1
    assert v("lora_gateway_resident_adapters", tier="engine") == 3
    assert v("lora_gateway_engine_healthy") == 1
    assert v("lora_gateway_inflight_requests", tenant="acme") == 2
    with pytest.raises(ValueError):
        m.cache_hit("gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.slot_waited("disk")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        m.load_phase("download", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # production never records it: the cache verifies in fetch
        m.load_phase("verify", 1.0)  # type: ignore[arg-type]


def test_registries_are_independent() -> None:
    a, b = Metrics(process_metrics=False), Metrics(process_metrics=False)
    a.tokens_out("acme", 5)
    assert _value(a, "lora_gateway_tokens_out_total", tenant="acme") == 5
    assert _value(b, "lora_gateway_tokens_out_total", tenant="acme") is None
    assert b'lora_gateway_tokens_out_total{tenant="acme"}' not in b.render()
    assert b'lora_gateway_tokens_out_total{tenant="acme"} 5.0' in a.render()


async def test_admission_feeds_the_inflight_gauge() -> None:
    m = Metrics(process_metrics=False)
    admission = Admission(4, on_change=m.set_inflight)
    p = Principal("acme", Role.USER, "k")
    async with admission.slot(p, TenantConfig("acme", max_concurrent=2, max_tokens=10)):
        assert _value(m, "lora_gateway_inflight_requests", tenant="acme") == 1
    assert _value(m, "lora_gateway_inflight_requests", tenant="acme") == 0


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9090") == ("0.0.0.0", 9090)
    for bad in ("9090", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_metrics_served_over_http() -> None:
    m = Metrics()
    m.request_done("acme", "acme/support-bot", grpc.StatusCode.NOT_FOUND, 0.1)
    m.set_engine_healthy(False)
    host, port = m.start_http("127.0.0.1:0")
    try:
        assert host == "127.0.0.1"
        assert port > 0
        with pytest.raises(RuntimeError):
            m.start_http("127.0.0.1:0")
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            body = response.read().decode()
        assert (
            'lora_gateway_requests_total{adapter="acme/support-bot",code="NOT_FOUND",tenant="acme"}'
            " 1.0" in body
        )
        assert "lora_gateway_engine_healthy 0.0" in body
        assert "process_cpu_seconds_total" in body
        m.tokens_out("acme", 3)
        with urllib.request.urlopen(url, timeout=5) as response:
            assert 'lora_gateway_tokens_out_total{tenant="acme"} 3.0' in response.read().decode()
    finally:
        m.close()
    m.close()
    assert m.http_server is None
