"""The tenants file: its format (pydantic models, `extra="forbid"`), reading it, and its errors.

Only sha256 hashes of keys are stored (`keys.hash_key`, `lora-gateway dev new-key` or
`printf %s "$KEY" | sha256sum` computes one)::

    tenants:
      acme:
        max_concurrent: 8        # optional; default Settings.tenant_max_concurrent
        max_tokens: 1024         # optional; default Settings.tenant_max_tokens
        # optional, each defaulting to Settings.tenant_<field>: max_engine_slots,
        # max_host_bytes, max_pins, max_concurrent_uploads, max_stored_bytes, max_adapters,
        # tokens_per_minute, requests_per_minute (0 = unlimited)
        keys:
          - id: acme-backend     # label, appears in logs and audit
            sha256: "<64 lowercase hex>"
            role: user           # user | tenant-admin | operator

A tenant's limits are the fields of `config.TenantDefaults` (`TenantEntry` extends it), written
once. A bad file is refused with one `InvalidArgument` naming, for each problem, the tenant, the
key (`key #N (id)`) and the field, e.g. ``tenant acme: key #1 (acme-backend): sha256 must be 64
lowercase hex digits``. A field that looks like a plaintext key is refused with a hint, and no
message repeats a key's text or the text around a YAML error.

Reading is blocking file I/O (`read`): the server calls it, and `load_document`, in a thread.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from adapter_store.errors import InvalidAdapter
from adapter_store.model import check_name
from lora_gateway.config import TenantDefaults
from lora_gateway.errors import InvalidArgument
from lora_gateway.tenancy.policy import Role

__all__ = ["KeyEntry", "TenantEntry", "TenantsFile", "load_document", "read", "validate"]

#: Our validators' error types: the message is the whole text, relative to its place (`tenant
#: acme: ` is put in front), or naming its place itself; no input is added to either.
_ERROR, _ERROR_PLACED = "tenants_file", "tenants_file_placed"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PLAINTEXT_FIELDS = frozenset({"key", "api_key", "apikey", "token", "secret", "password"})
_PLAINTEXT_HINT = (
    "never store API keys in the tenants file; store `sha256: <hex>` of the key instead "
    "(python -c 'from lora_gateway.tenancy import hash_key; print(hash_key(\"KEY\"))')"
)
#: At most this many problems are listed in one message.
_MAX_PROBLEMS = 20


def _problem(text: str, *, placed: bool = False) -> PydanticCustomError:
    return PydanticCustomError(_ERROR_PLACED if placed else _ERROR, text)


def _checked_name(what: str) -> Callable[[object], str]:
    """A name checked by the store's one name rule (`adapter_store.model.check_name`)."""

    def check(value: object) -> str:
        try:
            return check_name(value, what)
        except InvalidAdapter as exc:
            raise _problem(str(exc)) from None

    return check


_NAME_SCHEMA = WithJsonSchema({"type": "string", "minLength": 1})
KeyId = Annotated[str, PlainValidator(_checked_name("key id")), _NAME_SCHEMA]
TenantName = Annotated[str, PlainValidator(_checked_name("tenant name")), _NAME_SCHEMA]


def _sha256(value: object) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise _problem("sha256 must be 64 lowercase hex digits")
    return value


def _role(value: object) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise _problem(f"role must be one of {roles}, got {_shown(value)}") from None


def _none_is_empty(kind: Any, empty: Callable[[], object]) -> BeforeValidator:
    """`tenants:`, `acme:` or `keys:` with nothing under it means none (`empty()`); the JSON
    schema (the chart's) accepts null there too."""
    return BeforeValidator(
        lambda value: empty() if value is None else value, json_schema_input_type=kind | None
    )


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext_keys(cls, data: Any) -> Any:
        """A field named like a key (`key:`, `token:`, ...) is refused with a hint, before any
        other check can repeat it."""
        if isinstance(data, Mapping):
            plaintext = sorted(str(k) for k in data if str(k).lower() in _PLAINTEXT_FIELDS)
            if plaintext:
                raise _problem(f"field {plaintext[0]!r} is not allowed: {_PLAINTEXT_HINT}")
        return data


class KeyEntry(_Strict):
    """One API key of a tenant, by its hash."""

    id: KeyId
    """The key's label in logs and audit records (never the key); unique in the file."""
    sha256: Annotated[
        str,
        PlainValidator(_sha256),
        WithJsonSchema({"type": "string", "pattern": _SHA256_RE.pattern}),
    ]
    """The lowercase hex sha256 of the key."""
    role: Annotated[Role, PlainValidator(_role), WithJsonSchema({"enum": [r.value for r in Role]})]
    """user (generate, read), tenant-admin (also manage the tenant's adapters), operator
    (everything, on every tenant)."""


class TenantEntry(TenantDefaults, _Strict):
    """A tenant: its keys, and any limit of `config.TenantDefaults` it sets for itself."""

    keys: Annotated[list[KeyEntry], _none_is_empty(list[KeyEntry], list)] = Field(
        default_factory=list
    )
    """Its API keys."""

    def limits(self) -> dict[str, int]:
        """The limits this entry sets (the others come from `Settings.tenant_defaults()`)."""
        return {name: getattr(self, name) for name in self.model_fields_set if name != "keys"}


_Tenants = dict[TenantName, Annotated[TenantEntry, _none_is_empty(TenantEntry, dict)]]


class TenantsFile(_Strict):
    """The whole file: tenant name -> its entry."""

    tenants: Annotated[_Tenants, _none_is_empty(_Tenants, dict)] = Field(default_factory=dict)
    """Every tenant, by name."""

    @model_validator(mode="after")
    def _one_principal_per_key(self) -> TenantsFile:
        """Each key hash maps to one principal, and each key id labels one key."""
        hashes: dict[str, str] = {}
        ids: set[str] = set()
        for name, entry in self.tenants.items():
            for key in entry.keys:
                if key.sha256 in hashes:
                    raise _problem(
                        f"tenant {name}: key {key.id!r} has the same sha256 as key "
                        f"{hashes[key.sha256]!r}: each API key maps to one principal",
                        placed=True,
                    )
                if key.id in ids:
                    raise _problem(
                        f"tenant {name}: key id {key.id!r} is used twice "
                        "(ids label keys in logs and must be unique)",
                        placed=True,
                    )
                hashes[key.sha256] = key.id
                ids.add(key.id)
        return self


# --- reading ----------------------------------------------------------------------------------


def read(path: str | Path) -> bytes:
    """The bytes of a tenants file, or InvalidArgument saying why not (blocking I/O)."""
    if not str(path):
        raise InvalidArgument(
            "no tenants file configured: set tenants_file (`--tenants FILE`); "
            "without one every request would be refused"
        )
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"tenants file {path}: {exc.strerror or exc}") from None


def load_document(data: bytes, *, where: str) -> TenantsFile:
    """Parse and validate the bytes of a tenants file (`where` names it in error messages).

    A YAML error is reported by line and column only: the text around it is not repeated, so
    that a key pasted into the file by mistake does not reach a log.
    """
    try:
        parsed = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidArgument(f"tenants file {where}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise InvalidArgument(f"tenants file {where}: not valid YAML{at}: {problem}") from None
    try:
        return validate(parsed)
    except InvalidArgument as exc:
        raise InvalidArgument(f"tenants file {where}: {exc}") from None


def validate(document: Any) -> TenantsFile:
    """Validate a parsed tenants document (None: an empty file, no tenants)."""
    try:
        return TenantsFile.model_validate({} if document is None else document)
    except ValidationError as exc:
        # `from None`: the ValidationError's own text shows inputs, which may hold a key.
        raise InvalidArgument(_explain(exc.errors(include_url=False), document)) from None


# --- error messages ---------------------------------------------------------------------------


def _explain(errors: Sequence[ErrorDetails], document: Any) -> str:
    """One message for every problem, each naming its tenant, key and field. Unknown and
    missing fields are listed together per place; inputs are shown only for limits and roles."""
    problems: dict[tuple[str, str, type[BaseModel]], list[str]] = {}
    for error in errors:
        where, field, model = _place(error["loc"], document)
        kind = error["type"]
        if kind in ("extra_forbidden", "missing"):
            problems.setdefault((kind, where, model), []).append(field)
        else:
            problems.setdefault((_text(error, where, field, model), "", model), [])
    lines = []
    for (kind, where, model), fields in problems.items():
        if kind == "extra_forbidden":
            allowed = ", ".join(sorted(model.model_fields))
            lines.append(f"{where}: unknown field(s) {', '.join(fields)} (allowed: {allowed})")
        elif kind == "missing":
            lines.append(f"{where}: missing field(s) {', '.join(sorted(fields))}")
        else:
            lines.append(kind)
    if len(lines) > _MAX_PROBLEMS:
        lines[_MAX_PROBLEMS:] = [f"and {len(lines) - _MAX_PROBLEMS} more problems"]
    return "; ".join(lines)


def _text(error: ErrorDetails, where: str, field: str, model: type[BaseModel]) -> str:
    """The text of one problem (not an unknown or missing field)."""
    kind, prefix = error["type"], f"{where}: " if where else ""
    if kind == _ERROR_PLACED:
        return error["msg"]
    if kind == _ERROR:
        return prefix + error["msg"]
    if model is TenantEntry and field in TenantDefaults.model_fields:
        minimum = _minimum(field)
        return f"{prefix}{field} must be an integer >= {minimum}, got {_shown(error['input'])}"
    if not field:  # the place itself has the wrong type
        if model is TenantsFile:
            return "expected a mapping with a `tenants:` key"
        if model is KeyEntry:
            return f"{prefix}expected a mapping with id, sha256 and role"
        return f"{prefix}expected a mapping"
    if model is TenantsFile and field == "tenants":
        return "`tenants` must be a mapping of tenant name -> settings"
    if model is TenantEntry and field == "keys":
        return f"{prefix}`keys` must be a list"
    return f"{prefix}{field}: {error['msg']}"  # not expected: pydantic's text, without the input


def _place(loc: tuple[int | str, ...], document: Any) -> tuple[str, str, type[BaseModel]]:
    """(where, field, model) of an error location. `where` is "the top level", "tenant acme" or
    "tenant acme: key #2 (acme-ops)" (with the key's id where the file gives a valid one);
    `field` is "" when the error is about the place itself, and `model` is the place's model."""
    if len(loc) < 2 or loc[0] != "tenants":  # the top level, or its field `tenants`
        return "the top level", str(loc[0]) if loc else "", TenantsFile
    tenant = loc[1]
    if loc[2:] == ("[key]",):  # the tenant's name: the message names it
        return "", "", TenantsFile
    where = f"tenant {tenant}"
    if loc[2:3] != ("keys",) or len(loc) < 4:
        return where, str(loc[2]) if len(loc) > 2 else "", TenantEntry
    index = loc[3]
    where = f"{where}: key #{int(index) + 1}"
    key_id = _lookup(document, "tenants", tenant, "keys", index, "id")
    if isinstance(key_id, str):
        with contextlib.suppress(InvalidAdapter):
            where = f"{where} ({check_name(key_id, 'key id')})"
    return where, str(loc[4]) if len(loc) > 4 else "", KeyEntry


def _lookup(document: Any, *path: int | str) -> Any:
    for step in path:
        if isinstance(document, Mapping):
            document = document.get(step)
        elif isinstance(document, list) and isinstance(step, int) and 0 <= step < len(document):
            document = document[step]
        else:
            return None
    return document


def _minimum(field: str) -> int:
    """The least value of a limit field (its `Field(ge=...)`)."""
    for constraint in TenantDefaults.model_fields[field].metadata:
        if isinstance(constraint, annotated_types.Ge):
            least = constraint.ge
            assert isinstance(least, int)
            return least
    return 0


def _shown(value: object) -> str:
    return repr(value)[:60]
