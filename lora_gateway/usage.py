"""Usage records: one JSON line per inference call, for chargeback and capacity planning.

An inference call is a gRPC `Generate` or `GenerateStream` (a chat conversation is a
`messages` prompt of either) or an OpenAI-front `POST /v1/completions` or
`/v1/chat/completions`, once its caller is authenticated. `Tokenize` is not one (the engine
generates nothing; nothing is billed), nor is `/v1/models`. A call refused before its caller is
known (UNAUTHENTICATED, PERMISSION_DENIED) has no tenant to charge: it is in the audit log only.

The front that receives the call opens a `Meter` (`UsageLog.start`) once the caller is
authenticated, the core (`Gateway.generate`) fills it in as the call runs (request id, the
version served, tokens), and the front writes it exactly once when it knows the call's status
(`UsageLog.finish`): OK, or the error's code, DEADLINE_EXCEEDED, and CANCELLED when the client
went away. A record never holds a prompt, an output, a routing key or an API key (the key's id,
as the audit log records it, identifies it).

Fields of a line::

    {"ts": "2025-01-31T12:00:00.123Z",       # when the call ended (RFC 3339, UTC)
     "tenant": "acme", "key_id": "acme-ci",  # the caller: tenant and API key id
     "rpc": "/lora_gateway.v1.Inference/GenerateStream",   # or "HTTP POST /v1/completions"
     "request_id": "req-…",                  # the id the response carried
     "adapter": "acme/support-bot",          # owner/name served; "" for the base model
     "version": "sha256:…",                  # the version served; "" for the base model
     "base_model": false,                    # true: the call asked for the base model
     "prompt_tokens": 12, "completion_tokens": 30,   # tokens the client received
     "latency_s": 0.412, "ttft_s": 0.051,    # ttft_s: streamed calls only, else null
     "finish_reason": "length",              # stop, length, abort, or "" when none came
     "code": "OK"}                           # OK or the gRPC status code name

A call that failed before its adapter was resolved (NOT_FOUND) has `adapter` "" and
`base_model` false. Records go where `usage_log` says: a file (JSON lines, written by a thread:
`jsonlines.JsonLines`, as the audit log) or, when unset, the `lora_gateway.usage` logger.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import grpc

from lora_gateway.jsonlines import JsonLinesLog, clip, now
from lora_gateway.tenancy import Principal

__all__ = ["USAGE_LOGGER", "GroupBy", "Meter", "UsageLog", "UsageSum", "UsageSummary", "summarize"]

USAGE_LOGGER = "lora_gateway.usage"
#: The log message of every usage record; its fields are in the record's `usage` attribute.
USAGE_MESSAGE = "usage"


@dataclass
class Meter:
    """One inference call's usage as it runs (see the module docstring)."""

    principal: Principal
    rpc: str
    #: A streamed call (GenerateStream, `stream: true`) records its time to first token.
    streamed: bool = False
    request_id: str = ""
    base_model: bool = False
    adapter: str = ""
    version: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    written: bool = False

    def served(self, tenant: str, name: str, version: str) -> None:
        """The version the call resolved to (empty for the base model)."""
        self.adapter = f"{tenant}/{name}" if name else ""
        self.version = version

    def delta(self, tokens: int, prompt_tokens: int, finish_reason: str | None) -> None:
        """A delta handed to the client: `tokens` generated tokens in it."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.completion_tokens += tokens
        self.prompt_tokens = prompt_tokens
        if finish_reason is not None:
            self.finish_reason = finish_reason


class UsageLog(JsonLinesLog):
    """Usage records as JSON lines in `path`; `path=None`: to the `lora_gateway.usage` logger.

    Opening the file happens in the constructor (call it at start-up, or in a thread).
    """

    def __init__(self, path: str | None) -> None:
        super().__init__(path, logger=USAGE_LOGGER, field=USAGE_MESSAGE)

    @staticmethod
    def start(
        principal: Principal, rpc: str, *, streamed: bool = False, request_id: str = ""
    ) -> Meter:
        """A meter for a call of `principal` that starts now."""
        return Meter(principal, rpc, streamed=streamed, request_id=request_id)

    def finish(self, meter: Meter, code: grpc.StatusCode | str) -> dict[str, Any] | None:
        """Write the call's record (once: a meter already written returns None). Never blocks
        on I/O."""
        if meter.written:
            return None
        meter.written = True
        event: dict[str, Any] = {
            "ts": now(),
            "tenant": meter.principal.tenant,
            "key_id": meter.principal.key_id,
            "rpc": clip(meter.rpc),
            "request_id": clip(meter.request_id),
            "adapter": clip(meter.adapter),
            "version": clip(meter.version),
            "base_model": meter.base_model,
            "prompt_tokens": meter.prompt_tokens,
            "completion_tokens": meter.completion_tokens,
            "latency_s": round(time.perf_counter() - meter.started, 6),
            "ttft_s": (
                round(meter.first_token_s, 6)
                if meter.streamed and meter.first_token_s is not None
                else None
            ),
            "finish_reason": meter.finish_reason,
            "code": code.name if isinstance(code, grpc.StatusCode) else str(code),
        }
        self._lines.put(event)
        return event


# --- summing (lora-gateway usage) -------------------------------------------------------------

GroupBy = Literal["adapter", "version", "key"]
#: The group of a base-model call, and of a call that failed before its adapter resolved.
BASE_GROUP = "(base model)"
UNRESOLVED_GROUP = "(unresolved)"
#: Bad lines named (file:line) in a summary; the rest are only counted.
_BAD_SHOWN = 10


@dataclass
class UsageSum:
    """The sums of one group of records."""

    key: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s_total: float = 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.latency_s_total / self.requests if self.requests else 0.0

    def add(self, record: _Record) -> None:
        self.requests += 1
        self.errors += record.code != "OK"
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.latency_s_total += record.latency_s

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "requests": self.requests,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "mean_latency_s": round(self.mean_latency_s, 6),
        }


@dataclass
class UsageSummary:
    """A tenant's records in [since, until), summed per group (sorted by key), and a total."""

    tenant: str
    by: GroupBy
    since: datetime
    until: datetime | None
    groups: list[UsageSum]
    total: UsageSum
    #: Lines that are not a usage record (not JSON, a field missing or of the wrong type).
    bad_lines: int = 0
    #: The first few of them, as "file:line".
    bad_examples: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "by": self.by,
            "since": self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "groups": [g.as_json() for g in self.groups],
            "total": self.total.as_json(),
            "bad_lines": self.bad_lines,
            "bad_examples": self.bad_examples,
        }


@dataclass(frozen=True)
class _Record:
    ts: datetime
    tenant: str
    key_id: str
    adapter: str
    version: str
    base_model: bool
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    code: str

    def group(self, by: GroupBy) -> str:
        if by == "key":
            return self.key_id
        value = self.adapter if by == "adapter" else self.version
        if value:
            return value
        return BASE_GROUP if self.base_model else UNRESOLVED_GROUP


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time (`2025-01-31`, `2025-01-31T12:00:00Z`); UTC when it names no
    zone. ValueError otherwise."""
    parsed = datetime.fromisoformat(text.strip())
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("not a count")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("not a text")
    return value


def _record(line: str) -> _Record:
    """One line as a record; ValueError (or TypeError) when it is not one."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    latency = data["latency_s"]
    if isinstance(latency, bool) or not isinstance(latency, int | float) or latency < 0:
        raise ValueError("latency_s")
    base = data.get("base_model", False)
    if not isinstance(base, bool):
        raise ValueError("base_model")
    return _Record(
        ts=parse_time(_text(data["ts"])),
        tenant=_text(data["tenant"]),
        key_id=_text(data["key_id"]),
        adapter=_text(data["adapter"]),
        version=_text(data["version"]),
        base_model=base,
        prompt_tokens=_count(data["prompt_tokens"]),
        completion_tokens=_count(data["completion_tokens"]),
        latency_s=float(latency),
        code=_text(data["code"]),
    )


def summarize(
    files: Iterable[tuple[str, Iterable[str]]],
    *,
    tenant: str,
    since: datetime,
    until: datetime | None = None,
    by: GroupBy = "adapter",
) -> UsageSummary:
    """Sum `tenant`'s records with `since <= ts < until` from `files` ((name, lines) pairs,
    read line by line), per `by`. A line that is not a record is counted (and the first few
    named), never fatal; blank lines are skipped."""
    groups: dict[str, UsageSum] = {}
    total = UsageSum("total")
    bad = 0
    examples: list[str] = []
    for name, lines in files:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = _record(line)
            except (ValueError, TypeError, KeyError, RecursionError):
                bad += 1
                if len(examples) < _BAD_SHOWN:
                    examples.append(f"{name}:{number}")
                continue
            if record.tenant != tenant or record.ts < since:
                continue
            if until is not None and record.ts >= until:
                continue
            key = record.group(by)
            groups.setdefault(key, UsageSum(key)).add(record)
            total.add(record)
    ordered = [groups[k] for k in sorted(groups)]
    return UsageSummary(tenant, by, since, until, ordered, total, bad, examples)
