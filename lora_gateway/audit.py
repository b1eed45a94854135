"""The audit log: one JSON object per line for admin actions and denials.

Each event records who (principal tenant, role, key id), what (RPC, target tenant, adapter,
version), the decision ("allow", "deny", "error") and the gRPC status name. API keys, prompts and
generated text are never recorded; `detail` is a short, truncated note.

`AuditLog.record` is cheap and synchronous: it formats the event and puts it on a queue. A
writer thread (`jsonlines.JsonLines`, shared with the usage records) writes the file (or hands
the event to the `lora_gateway.audit` logger when no file is configured), so the event loop
never waits on disk.

Example line::

    {"ts": "2025-01-31T12:00:00.123Z", "principal_tenant": "acme", "role": "tenant-admin",
     "key_id": "acme-ci", "rpc": "/lora_gateway.v1.Admin/RevokeAdapter", "tenant": "acme",
     "adapter": "support-bot", "version": "sha256:…", "decision": "allow", "code": "OK",
     "detail": "", "request_id": "…"}
"""

from __future__ import annotations

from typing import Literal

import grpc

from lora_gateway.jsonlines import JsonLinesLog, clip, now
from lora_gateway.tenancy import Principal

__all__ = ["AUDIT_LOGGER", "AuditLog", "Decision"]

AUDIT_LOGGER = "lora_gateway.audit"
#: The log message of every audit record; its fields are in the record's `audit` attribute.
AUDIT_MESSAGE = "audit"
Decision = Literal["allow", "deny", "error"]
_DECISIONS = frozenset({"allow", "deny", "error"})
_MAX_DETAIL = 200


class AuditLog(JsonLinesLog):
    """JSON-lines audit log. `path=None`: events go to the `lora_gateway.audit` logger only.

    Opening the file happens in the constructor (call it at start-up, or in a thread).
    """

    def __init__(self, path: str | None) -> None:
        super().__init__(path, logger=AUDIT_LOGGER, field=AUDIT_MESSAGE)

    def record(
        self,
        *,
        principal: Principal | None,
        rpc: str,
        decision: Decision,
        code: grpc.StatusCode | str = "OK",
        tenant: str = "",
        adapter: str = "",
        version: str = "",
        detail: str = "",
        request_id: str = "",
    ) -> dict[str, str]:
        """Queue one event and return it. Never blocks on I/O.

        `principal` is None when the caller was not authenticated. Never pass keys, prompts or
        output text in any field; `detail` is truncated to a short note.
        """
        if decision not in _DECISIONS:
            raise ValueError(f"decision must be allow, deny or error, got {decision!r}")
        event = {
            "ts": now(),
            "principal_tenant": principal.tenant if principal else "",
            "role": principal.role.value if principal else "",
            "key_id": principal.key_id if principal else "",
            "rpc": clip(rpc),
            "tenant": clip(tenant),
            "adapter": clip(adapter),
            "version": clip(version),
            "decision": decision,
            "code": code.name if isinstance(code, grpc.StatusCode) else str(code),
            "detail": clip(detail, _MAX_DETAIL),
            "request_id": clip(request_id),
        }
        self._lines.put(event)
        return event
