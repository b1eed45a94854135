"""Checks of the JSON that a stored manifest's sections hold (evaluations, rollback), shared by
their parsers: a value of the wrong type is an IntegrityError naming the section and the field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from adapter_store.errors import IntegrityError

SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def json_object(raw: object, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise IntegrityError(f"stored manifest: {what} must be a JSON object")
    return raw


def json_str(obj: Mapping[str, Any], key: str, section: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise IntegrityError(f"stored manifest: {section} field {key!r} has the wrong type")
    return value


def json_sha(value: object, section: str) -> str:
    if not isinstance(value, str) or not SHA_RE.fullmatch(value):
        raise IntegrityError(f"stored manifest: a malformed sha256 among the {section} fields")
    return value
