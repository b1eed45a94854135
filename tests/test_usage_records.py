"""Usage records without an engine: the writer writes a meter once, the logger gets them when
no file is set, and `lora-gateway usage` refuses bad arguments clearly. The records of real
calls, and the sums, are tests/api/test_usage.py's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lora_gateway.cli.main import main
from lora_gateway.tenancy import Principal, Role
from lora_gateway.usage import USAGE_LOGGER, UsageLog

PRINCIPAL = Principal("acme", Role.USER, "acme-app")


def test_a_meter_is_written_once_and_holds_only_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    with UsageLog(str(path)) as usage:
        meter = usage.start(PRINCIPAL, "/lora_gateway.v1.Inference/GenerateStream", streamed=True)
        meter.request_id = "req-1"
        meter.served("acme", "bot", "sha256:" + "a" * 64)
        meter.delta(2, 5, None)
        meter.delta(1, 5, "length")
        assert usage.finish(meter, "OK") is not None
        assert usage.finish(meter, "CANCELLED") is None  # a second end writes nothing
    (line,) = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert set(record) == {
        "ts", "tenant", "key_id", "rpc", "request_id", "adapter", "version", "base_model",
        "prompt_tokens", "completion_tokens", "latency_s", "ttft_s", "finish_reason", "code",
    }  # fmt: skip
    assert (record["adapter"], record["prompt_tokens"], record["completion_tokens"]) == (
        "acme/bot",
        5,
        3,
    )
    assert (record["finish_reason"], record["code"], record["key_id"]) == (
        "length",
        "OK",
        "acme-app",
    )
    assert 0 <= record["ttft_s"] <= record["latency_s"]


def test_without_a_file_records_go_to_the_usage_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=USAGE_LOGGER)
    usage = UsageLog(None)
    event = usage.finish(usage.start(PRINCIPAL, "HTTP POST /v1/completions"), "NOT_FOUND")
    usage.close()
    records = [r for r in caplog.records if r.name == USAGE_LOGGER]
    assert len(records) == 1
    assert records[0].__dict__["usage"] == event
    assert event is not None
    assert event["ttft_s"] is None  # not streamed


def test_the_usage_command_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_text("", encoding="utf-8")
    base = ["usage", "--file", str(path), "--tenant", "acme"]
    with pytest.raises(SystemExit) as bad_time:
        main([*base, "--since", "last tuesday"])
    assert bad_time.value.code == 2
    assert "not an ISO 8601 date or time" in capsys.readouterr().err
    assert main([*base, "--since", "2025-02-01", "--until", "2025-01-01"]) == 3
    assert "--until must be later than --since" in capsys.readouterr().err
    missing = ["usage", "--file", str(tmp_path / "none"), "--tenant", "a", "--since", "2025-01-01"]
    assert main(missing) == 1
    assert "No such file" in capsys.readouterr().err
    assert main([*base, "--since", "2025-01-01T00:00:00Z", "--by", "version"]) == 0
    assert "total" in capsys.readouterr().out
