"""Who is calling and what they may do: principals, roles, permissions, limits. Pure, no I/O.

The one exception is `KeyRing.load`, which reads the tenants file; the server calls it in a
thread. Everything else is in-memory and synchronous.

Access rules (DESIGN.md invariant 6):

- Deny by default. `METHOD_PERMISSIONS` names the permission of every RPC the server serves; an
  unknown method is refused (`Policy.authorize`). A test walks the service descriptors.
- `user`: generate, read its own tenant's adapters. `tenant-admin`: also manage its own tenant's
  adapters. `operator`: everything, on every tenant.
- A tenant uses its own adapters and those shared with it (`Policy.can_use`, which is the
  store's `adapter_store.model.can_use`: one rule, used by every read path).
- Another tenant's adapter is answered exactly like a missing one: NOT_FOUND with
  `errors.ADAPTER_NOT_FOUND_TEXT` (`Policy.effective_tenant_for_adapter`).

Fairness between tenants comes from per-tenant caps (`Admission`): one tenant can hold at most its
own `max_concurrent` of the server's `max_concurrent_requests` slots, so a busy tenant is refused
(RESOURCE_EXHAUSTED) before it starves the others. Nothing queues in the gateway: a refused
request is answered at once, and the client's retry policy decides what happens next.

What each caller may hold at once, and what stops it (DESIGN invariant 11):

- anyone (no credentials): Health/Watch and reflection streams open at once, per peer address
  and in total (`RpcLimits.public_stream`);
- a tenant: Generate requests in flight, its `max_concurrent` and the server's total
  (`Admission.slot`);
- a tenant: Generate requests and generated tokens per minute (`Admission.slot`, token buckets);
- a tenant: other RPCs in progress (admin, reads), per tenant and in total (`RpcLimits.rpc`);
- a tenant: uploads and compositions in progress, `max_concurrent_uploads` (`Admission.upload`).

Rates are token buckets holding one minute's worth: `requests_per_minute` takes one token per
Generate, `tokens_per_minute` reserves the request's `max_tokens` at admission and gives back
what was not generated when the request ends. A refusal carries `retry_after_s`, the time until
the bucket holds enough again (sent as `retry-after` trailing metadata).

The tenants file can change while the server runs (`Tenants.replace`, called by the server's
reload task): everything reads the `KeyRing` in force through one `Tenants` object.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from adapter_store.errors import InvalidAdapter
from adapter_store.model import can_use, check_name
from lora_gateway.config import TenantDefaults
from lora_gateway.errors import (
    ADAPTER_NOT_FOUND_TEXT,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

__all__ = [
    "GENERATE_METHODS",
    "METHOD_PERMISSIONS",
    "PERMISSION_DENIED_TEXT",
    "ROLE_PERMISSIONS",
    "Admission",
    "Hold",
    "KeyRing",
    "Permission",
    "Policy",
    "Principal",
    "Role",
    "RpcLimits",
    "Slot",
    "TenantConfig",
    "Tenants",
    "check_max_tokens",
    "hash_key",
    "is_public",
    "permission_for",
]

MISSING_CREDENTIALS_TEXT = "missing credentials"
INVALID_CREDENTIALS_TEXT = "invalid credentials"
PERMISSION_DENIED_TEXT = "permission denied"

#: Longer authorization values are refused without hashing them.
_MAX_AUTHORIZATION_LEN = 4096
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Role(enum.Enum):
    USER = "user"
    TENANT_ADMIN = "tenant-admin"
    OPERATOR = "operator"


class Permission(enum.Enum):
    GENERATE = "generate"
    """Inference on adapters the tenant may use."""
    READ_ADAPTERS = "read-adapters"
    """List, get and residency of the caller's own tenant."""
    MANAGE_ADAPTERS = "manage-adapters"
    """Upload, alias, share, compose, revoke, pin, unpin, prefetch for the caller's own tenant."""
    OPERATE = "operate"
    """Act on any tenant."""
    HEALTH = "health"
    """Public: health checks and reflection need no credentials."""


_USER = frozenset({Permission.GENERATE, Permission.READ_ADAPTERS, Permission.HEALTH})
ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.USER: _USER,
    Role.TENANT_ADMIN: _USER | {Permission.MANAGE_ADAPTERS},
    Role.OPERATOR: frozenset(Permission),
}

_INFERENCE = "/lora_gateway.v1.Inference/"
_ADMIN = "/lora_gateway.v1.Admin/"

#: Every RPC the server serves -> the permission it needs. A method missing here is denied.
METHOD_PERMISSIONS: Mapping[str, Permission] = {
    _INFERENCE + "Generate": Permission.GENERATE,
    _INFERENCE + "GenerateStream": Permission.GENERATE,
    _INFERENCE + "Tokenize": Permission.GENERATE,
    # The OpenAI-compatible HTTP front (services/openai_http.py), as "HTTP <method> <path>".
    "HTTP POST /v1/completions": Permission.GENERATE,
    "HTTP POST /v1/chat/completions": Permission.GENERATE,
    "HTTP GET /v1/models": Permission.READ_ADAPTERS,
    _ADMIN + "ListAdapters": Permission.READ_ADAPTERS,
    _ADMIN + "GetAdapter": Permission.READ_ADAPTERS,
    _ADMIN + "GetResidency": Permission.READ_ADAPTERS,
    _ADMIN + "UploadAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "SetAlias": Permission.MANAGE_ADAPTERS,
    _ADMIN + "ShareAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "UnshareAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "ComposeAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "RevokeAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "PinAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "UnpinAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "PrefetchAdapter": Permission.MANAGE_ADAPTERS,
    "/grpc.health.v1.Health/Check": Permission.HEALTH,
    "/grpc.health.v1.Health/Watch": Permission.HEALTH,
    "/grpc.health.v1.Health/List": Permission.HEALTH,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Permission.HEALTH,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Permission.HEALTH,
}


def permission_for(method: str) -> Permission | None:
    """The permission a full method name ("/pkg.Service/Method") needs; None = unknown (deny)."""
    return METHOD_PERMISSIONS.get(method)


def is_public(method: str) -> bool:
    """True for methods served without credentials (health, reflection)."""
    return METHOD_PERMISSIONS.get(method) is Permission.HEALTH


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `key_id` is the key's label for logs, never the key."""

    tenant: str
    role: Role
    key_id: str

    def has(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]


def hash_key(key: str) -> str:
    """The lowercase hex sha256 of an API key: what the tenants file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --- tenants file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantConfig:
    """A tenant's limits (fields as in `config.TenantDefaults`, each settable per tenant)."""

    name: str
    max_concurrent: int = 16
    """Generate requests of this tenant admitted at once."""
    max_tokens: int = 2048
    """Largest max_tokens per request."""
    max_engine_slots: int = 1
    """Engine-resident adapter versions its requests may hold at once."""
    max_pins: int = 1
    """Adapter versions it may pin."""
    max_concurrent_uploads: int = 2
    """Uploads and compositions in progress at once."""
    max_stored_bytes: int = 16 << 30
    """Stored adapter bytes (every live version)."""
    max_adapters: int = 10_000
    """Adapters (names) stored."""
    tokens_per_minute: int = 0
    """Generated tokens per minute (0 = unlimited)."""
    requests_per_minute: int = 0
    """Inference requests per minute (0 = unlimited)."""

    @classmethod
    def from_defaults(cls, name: str, defaults: TenantDefaults) -> TenantConfig:
        return cls(name=name, **dataclasses.asdict(defaults))


#: Tenant limits that may be 0 (= unlimited); the others must be >= 1.
_ZERO_MEANS_UNLIMITED = frozenset({"tokens_per_minute", "requests_per_minute"})
_LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(TenantDefaults))

_TOP_FIELDS = frozenset({"tenants"})
_TENANT_FIELDS = frozenset({*_LIMIT_FIELDS, "keys"})
_KEY_FIELDS = frozenset({"id", "sha256", "role"})
_PLAINTEXT_FIELDS = frozenset({"key", "api_key", "apikey", "token", "secret", "password"})


@dataclass(frozen=True)
class _KeyEntry:
    digest: bytes
    principal: Principal


@dataclass(frozen=True)
class KeyRing:
    """API key hashes -> principals, and per-tenant limits. Immutable; reload by replacing it.

    YAML format (only sha256 hashes of keys are stored; `hash_key` or
    `printf %s "$KEY" | sha256sum` computes one)::

        tenants:
          acme:
            max_concurrent: 8        # optional; default Settings.tenant_max_concurrent
            max_tokens: 1024         # optional; default Settings.tenant_max_tokens
            # optional, each defaulting to Settings.tenant_<field>: max_engine_slots,
            # max_pins, max_concurrent_uploads, max_stored_bytes, max_adapters,
            # tokens_per_minute, requests_per_minute (0 = unlimited)
            keys:
              - id: acme-backend     # label, appears in logs and audit
                sha256: "<64 lowercase hex>"
                role: user           # user | tenant-admin | operator
    """

    defaults: TenantDefaults
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    _keys: tuple[_KeyEntry, ...] = ()

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, defaults: TenantDefaults) -> KeyRing:
        """Read and validate a tenants file (blocking file I/O: call it in a thread)."""
        return cls.parse(cls.read_file(path), defaults, where=str(path))

    @staticmethod
    def read_file(path: str | Path) -> bytes:
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

    @classmethod
    def parse(cls, data: bytes, defaults: TenantDefaults, *, where: str) -> KeyRing:
        """Validate the bytes of a tenants file (`where` names it in error messages).

        A YAML error is reported by line and column only: the text around it is not repeated,
        so that a key pasted into the file by mistake does not reach a log.
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
            return cls.from_mapping(parsed, defaults)
        except InvalidArgument as exc:
            raise InvalidArgument(f"tenants file {where}: {exc}") from None

    @classmethod
    def from_mapping(cls, data: Any, defaults: TenantDefaults) -> KeyRing:
        """Validate a parsed tenants document (see the class docstring for the format)."""
        for limit in _LIMIT_FIELDS:
            _check_limit(f"default {limit}", getattr(defaults, limit), _minimum(limit))
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidArgument("expected a mapping with a `tenants:` key")
        _check_fields("the top level", data, _TOP_FIELDS)
        raw_tenants = data.get("tenants") or {}
        if not isinstance(raw_tenants, Mapping):
            raise InvalidArgument("`tenants` must be a mapping of tenant name -> settings")
        tenants: dict[str, TenantConfig] = {}
        keys: list[_KeyEntry] = []
        seen_hashes: dict[str, str] = {}
        seen_ids: set[str] = set()
        for raw_name, raw in raw_tenants.items():
            name = _name(raw_name, "tenant name")
            where = f"tenant {name}"
            raw = {} if raw is None else raw
            if not isinstance(raw, Mapping):
                raise InvalidArgument(f"{where}: expected a mapping")
            _check_fields(where, raw, _TENANT_FIELDS)
            tenants[name] = TenantConfig(
                name=name,
                **{
                    limit: _check_limit(
                        f"{where}: {limit}",
                        raw.get(limit, getattr(defaults, limit)),
                        _minimum(limit),
                    )
                    for limit in _LIMIT_FIELDS
                },
            )
            raw_keys = raw.get("keys") or []
            if not isinstance(raw_keys, list):
                raise InvalidArgument(f"{where}: `keys` must be a list")
            for index, raw_key in enumerate(raw_keys):
                entry = _key_entry(f"{where}: key #{index + 1}", name, raw_key)
                digest = entry.digest.decode("ascii")
                if digest in seen_hashes:
                    raise InvalidArgument(
                        f"{where}: key {entry.principal.key_id!r} has the same sha256 as key "
                        f"{seen_hashes[digest]!r}: each API key maps to one principal"
                    )
                if entry.principal.key_id in seen_ids:
                    raise InvalidArgument(
                        f"{where}: key id {entry.principal.key_id!r} is used twice "
                        "(ids label keys in logs and must be unique)"
                    )
                seen_hashes[digest] = entry.principal.key_id
                seen_ids.add(entry.principal.key_id)
                keys.append(entry)
        return cls(defaults=defaults, tenants=tenants, _keys=tuple(keys))

    # --- queries ----------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Principal:
        """Map an `authorization: Bearer <key>` metadata value to its principal.

        The key's sha256 is compared with every stored hash by `hmac.compare_digest`, without an
        early exit and without a lookup keyed by the secret, so the time taken does not depend
        on which key (if any) matched. A malformed value and an unknown key get the same answer.
        """
        if authorization is None or not authorization.strip():
            raise Unauthenticated(MISSING_CREDENTIALS_TEXT)
        token = b""
        if len(authorization) <= _MAX_AUTHORIZATION_LEN:
            parts = authorization.split(None, 1)
            if len(parts) == 2 and parts[0].lower() == "bearer":
                token = parts[1].strip().encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(token).hexdigest().encode("ascii")
        found: Principal | None = None
        for entry in self._keys:
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        if found is None or not token:
            raise Unauthenticated(INVALID_CREDENTIALS_TEXT)
        return found

    def tenant(self, name: str) -> TenantConfig:
        """The limits of a tenant; a tenant the file does not list gets the defaults."""
        config = self.tenants.get(name)
        if config is None:
            return TenantConfig.from_defaults(name, self.defaults)
        return config

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def derive_key(self, purpose: str) -> bytes:
        """A secret for `purpose` (e.g. signing page tokens): HMAC-SHA256 keyed by the stored
        key hashes. The same on every replica that reads the same tenants file, and unknown to
        any tenant, who knows at most its own keys."""
        material = b"".join(sorted(entry.digest for entry in self._keys))
        return hmac.new(material, purpose.encode("utf-8"), hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"KeyRing(tenants={sorted(self.tenants)}, keys={len(self._keys)})"


class Tenants:
    """The `KeyRing` in force. The server replaces it as a whole when the tenants file changes;
    the interceptor, the gateway and admission read it through this one object, so a request
    sees either the old file or the new one, never a mix, and a revoked key is refused as soon
    as the new ring is in place."""

    def __init__(self, keyring: KeyRing) -> None:
        self._current = keyring
        self.generation = 0
        """How many times the ring was replaced."""

    @property
    def current(self) -> KeyRing:
        return self._current

    def replace(self, keyring: KeyRing) -> None:
        self._current = keyring
        self.generation += 1

    def authenticate(self, authorization: str | None) -> Principal:
        return self._current.authenticate(authorization)

    def tenant(self, name: str) -> TenantConfig:
        return self._current.tenant(name)

    @property
    def tenants(self) -> Mapping[str, TenantConfig]:
        return self._current.tenants

    @property
    def defaults(self) -> TenantDefaults:
        return self._current.defaults

    @property
    def key_count(self) -> int:
        return self._current.key_count

    def __repr__(self) -> str:
        return f"Tenants({self._current!r}, generation={self.generation})"


def _check_fields(where: str, raw: Mapping[Any, Any], allowed: frozenset[str]) -> None:
    plaintext = sorted(str(k) for k in raw if str(k).lower() in _PLAINTEXT_FIELDS)
    if plaintext:
        raise InvalidArgument(
            f"{where}: field {plaintext[0]!r} is not allowed: never store API keys in the "
            "tenants file; store `sha256: <hex>` of the key instead "
            "(python -c 'from lora_gateway.tenancy import hash_key; print(hash_key(\"KEY\"))')"
        )
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown field(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _name(value: object, what: str) -> str:
    try:
        return check_name(value, what)
    except InvalidAdapter as exc:
        raise InvalidArgument(str(exc)) from None


def _minimum(limit: str) -> int:
    return 0 if limit in _ZERO_MEANS_UNLIMITED else 1


def _check_limit(what: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgument(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _key_entry(where: str, tenant: str, raw: object) -> _KeyEntry:
    if not isinstance(raw, Mapping):
        raise InvalidArgument(f"{where}: expected a mapping with id, sha256 and role")
    _check_fields(where, raw, _KEY_FIELDS)
    missing = sorted(_KEY_FIELDS - set(raw))
    if missing:
        raise InvalidArgument(f"{where}: missing field(s) {', '.join(missing)}")
    key_id = _name(raw["id"], "key id")
    where = f"{where} ({key_id})"
    sha = raw["sha256"]
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise InvalidArgument(f"{where}: sha256 must be 64 lowercase hex digits")
    try:
        role = Role(raw["role"])
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise InvalidArgument(
            f"{where}: role must be one of {roles}, got {raw['role']!r}"
        ) from None
    return _KeyEntry(sha.encode("ascii"), Principal(tenant=tenant, role=role, key_id=key_id))


# --- policy ---------------------------------------------------------------------------------


class Policy:
    """The access rules as pure functions (static methods; no state)."""

    @staticmethod
    def authorize(principal: Principal, method: str) -> None:
        """Raise PermissionDenied unless the principal's role grants the method's permission.

        Unknown methods are denied (deny by default).
        """
        permission = permission_for(method)
        if permission is None or not principal.has(permission):
            raise PermissionDenied(PERMISSION_DENIED_TEXT)

    @staticmethod
    def can_use(principal: Principal, owner_tenant: str, shared_with: Collection[str]) -> bool:
        """May the principal generate with an adapter of `owner_tenant` shared with these?

        The store's rule (`adapter_store.model.can_use`, the one every read path runs) with the
        principal's role: operators act on every tenant.
        """
        return can_use(
            principal.tenant,
            owner_tenant,
            shared_with,
            operator=principal.role is Role.OPERATOR,
        )

    @staticmethod
    def effective_tenant_for_adapter(principal: Principal, requested: str) -> str:
        """The tenant an adapter-level admin RPC (get, alias, share, revoke, pin, ...) acts on.

        "" means the caller's own tenant. Operators may name any tenant. Anyone else naming
        another tenant gets NOT_FOUND with the text of a missing adapter, so that the answer
        does not tell whether that tenant or adapter exists. Callers should answer it after the
        same amount of work as a real miss where that is observable (e.g. a store lookup).
        """
        tenant = requested or principal.tenant
        _name(tenant, "tenant")
        if tenant == principal.tenant or principal.role is Role.OPERATOR:
            return tenant
        raise NotFound(ADAPTER_NOT_FOUND_TEXT)

    @staticmethod
    def effective_tenant_for_listing(principal: Principal, requested: str) -> str:
        """The tenant ListAdapters / GetResidency act on ("" = the caller's own).

        No adapter is named, so naming another tenant without the operator role is a plain
        PERMISSION_DENIED.
        """
        tenant = requested or principal.tenant
        _name(tenant, "tenant")
        if tenant == principal.tenant or principal.role is Role.OPERATOR:
            return tenant
        raise PermissionDenied(PERMISSION_DENIED_TEXT)


# --- admission ------------------------------------------------------------------------------


def check_max_tokens(requested: int, tenant: TenantConfig) -> None:
    """Raise ResourceExhausted if a request asks for more tokens than its tenant allows."""
    if requested > tenant.max_tokens:
        raise ResourceExhausted(
            f"max_tokens {requested} exceeds the limit of tenant {tenant.name} "
            f"({tenant.max_tokens} tokens per request)"
        )


class Hold:
    """Something counted while in use (an upload, an RPC, a stream); a sync and async context
    manager. Released on exit, whatever the exit (error, cancellation); `release` is idempotent.
    """

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class _Counts:
    """In-flight counts per key under a per-key cap and a total cap. Single event loop (or one
    thread): no awaits between check and increment, so no lock is needed."""

    def __init__(self, total_cap: int | None = None) -> None:
        self.total_cap = total_cap
        self.by_key: dict[str, int] = {}
        self.total = 0

    def full(self, key: str, cap: int) -> str | None:
        """Why one more for `key` is refused: "key" (its own cap), "total", or None (room)."""
        if self.by_key.get(key, 0) >= cap:
            return "key"
        if self.total_cap is not None and self.total >= self.total_cap:
            return "total"
        return None

    def add(self, key: str) -> int:
        count = self.by_key.get(key, 0) + 1
        self.by_key[key] = count
        self.total += 1
        return count

    def discard(self, key: str) -> None:
        self.remove(key)

    def remove(self, key: str) -> int:
        count = self.by_key[key] - 1
        if count:
            self.by_key[key] = count
        else:
            del self.by_key[key]
        self.total -= 1
        return count


@dataclass
class _Bucket:
    """A token bucket holding at most one minute's worth of `per_minute`."""

    level: float
    stamp: float

    def refill(self, per_minute: int, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.level = min(float(per_minute), self.level + elapsed * per_minute / 60.0)
        self.stamp = now

    def wait_for(self, amount: float, per_minute: int) -> float:
        """Seconds until the bucket holds `amount` (0 when it already does)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / per_minute


def retry_after_seconds(seconds: float) -> int:
    """A `retry-after` value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(round(seconds, 6)))


class Admission:
    """Per-tenant and global caps on concurrent requests, per-tenant rates, and per-tenant caps
    on uploads in progress. Never queues: full means refused.

    Single event loop, no awaits between check and increment, so no lock is needed. `on_change`
    (e.g. `Metrics.set_inflight`) is called with (tenant, in-flight count) on every change.
    `clock` (monotonic seconds) drives the rate buckets. `on_refused` (e.g. `Metrics.refused`)
    is called with "rate" or "uploads" when a rate or the upload cap refuses.
    """

    def __init__(
        self,
        max_total: int,
        on_change: Callable[[str, int], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        _check_limit("max_total", max_total)
        self.max_total = max_total
        self._on_change = on_change
        self._on_refused = on_refused
        self._clock = clock
        self._requests = _Counts(max_total)
        self._uploads = _Counts()
        self._request_rate: dict[str, _Bucket] = {}
        self._token_rate: dict[str, _Bucket] = {}

    def slot(self, principal: Principal, tenant: TenantConfig, *, tokens: int = 0) -> Slot:
        """A slot for one request of `principal`, limited by `tenant` (its own tenant's config).

        `tokens` is the request's max_tokens: reserved from the tenant's `tokens_per_minute`
        bucket on entry; what was not generated (`Slot.generated`) goes back on exit.

        Use as `async with admission.slot(p, keyring.tenant(p.tenant), tokens=n):` (or plain
        `with`). Entering raises ResourceExhausted at once when the tenant or the server is full,
        or the tenant is over its rate (then with `retry_after_s`); the slot is released on exit,
        whatever the exit (error, cancellation).
        """
        if tenant.name != principal.tenant:
            raise ValueError("slot(): tenant config must be the principal's own tenant's")
        return Slot(self, tenant, tokens)

    def upload(self, principal: Principal, tenant: TenantConfig) -> Hold:
        """Count one upload or composition of `principal`'s tenant while it runs.

        Raises ResourceExhausted at once when the tenant already has `max_concurrent_uploads`.
        """
        if tenant.name != principal.tenant:
            raise ValueError("upload(): tenant config must be the principal's own tenant's")
        name = tenant.name
        if self._uploads.full(name, tenant.max_concurrent_uploads):
            self._refused("uploads")
            raise ResourceExhausted(
                f"tenant {name} has {self._uploads.by_key.get(name, 0)} uploads or compositions "
                f"in progress (limit {tenant.max_concurrent_uploads}); try again when one finishes"
            )
        self._uploads.add(name)
        return Hold(functools.partial(self._uploads.discard, name))

    def in_flight(self, tenant: str) -> int:
        return self._requests.by_key.get(tenant, 0)

    def uploads_in_progress(self, tenant: str) -> int:
        return self._uploads.by_key.get(tenant, 0)

    @property
    def total_in_flight(self) -> int:
        return self._requests.total

    def _acquire(self, tenant: TenantConfig, tokens: int) -> None:
        name = tenant.name
        full = self._requests.full(name, tenant.max_concurrent)
        if full == "key":
            raise ResourceExhausted(
                f"tenant {name} has {self.in_flight(name)} requests in flight "
                f"(limit {tenant.max_concurrent})"
            )
        if full == "total":
            raise ResourceExhausted(
                f"server is at capacity ({self._requests.total} requests in flight)"
            )
        self._take_rates(tenant, tokens)
        self._notify(name, self._requests.add(name))

    def _take_rates(self, tenant: TenantConfig, tokens: int) -> None:
        """Take one request and `tokens` tokens from the tenant's buckets, or refuse."""
        now = self._clock()
        rpm, tpm = tenant.requests_per_minute, tenant.tokens_per_minute
        if tpm and tokens > tpm:
            raise ResourceExhausted(
                f"max_tokens {tokens} exceeds the rate limit of tenant {tenant.name} "
                f"({tpm} generated tokens per minute)"
            )
        requests = self._bucket(self._request_rate, tenant.name, rpm, now) if rpm else None
        generated = self._bucket(self._token_rate, tenant.name, tpm, now) if tpm else None
        waits: list[tuple[float, str]] = []
        if requests is not None:
            wait = requests.wait_for(1, rpm)
            if wait > 0:
                waits.append((wait, f"{rpm} requests per minute"))
        if generated is not None and tokens > 0:
            wait = generated.wait_for(tokens, tpm)
            if wait > 0:
                waits.append((wait, f"{tpm} generated tokens per minute"))
        if waits:
            self._refused("rate")
            wait, what = max(waits)
            after = retry_after_seconds(wait)
            raise ResourceExhausted(
                f"tenant {tenant.name} is over its rate limit of {what}; retry after {after} s",
                retry_after_s=after,
            )
        if requests is not None:
            requests.level -= 1
        if generated is not None:
            generated.level -= tokens

    def _bucket(
        self, buckets: dict[str, _Bucket], tenant: str, per_minute: int, now: float
    ) -> _Bucket:
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = _Bucket(float(per_minute), now)
        bucket.refill(per_minute, now)
        return bucket

    def _release(self, tenant: TenantConfig, unused_tokens: int) -> None:
        name = tenant.name
        if unused_tokens > 0 and tenant.tokens_per_minute:
            bucket = self._token_rate.get(name)
            if bucket is not None:
                bucket.refill(tenant.tokens_per_minute, self._clock())
                bucket.level = min(float(tenant.tokens_per_minute), bucket.level + unused_tokens)
        self._notify(name, self._requests.remove(name))

    def _notify(self, tenant: str, count: int) -> None:
        if self._on_change is not None:
            self._on_change(tenant, count)

    def _refused(self, limit: str) -> None:
        if self._on_refused is not None:
            self._on_refused(limit)


class Slot:
    """One admitted request; a sync and async context manager. Single use.

    `generated(n)` records tokens produced, so that the unused part of the `tokens_per_minute`
    reservation goes back to the tenant's bucket on exit.
    """

    def __init__(self, admission: Admission, tenant: TenantConfig, tokens: int = 0) -> None:
        self._admission = admission
        self._tenant = tenant
        self._tokens = max(0, tokens)
        self._generated = 0
        self._held = False
        self._used = False

    def generated(self, count: int) -> None:
        self._generated += count

    def __enter__(self) -> Slot:
        if self._held or self._used:
            raise RuntimeError("slot already entered")
        self._admission._acquire(self._tenant, self._tokens)
        self._held = self._used = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._held:
            self._held = False
            self._admission._release(self._tenant, self._tokens - self._generated)

    async def __aenter__(self) -> Slot:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


# --- RPC limits (every RPC but Generate, which `Admission` limits) ---------------------------


#: Methods whose admission is `Admission.slot` (in the gateway), not `RpcLimits.rpc`.
GENERATE_METHODS = frozenset({_INFERENCE + "Generate", _INFERENCE + "GenerateStream"})


class RpcLimits:
    """What unauthenticated callers and tenants' non-Generate RPCs may hold at once.

    - Public streams (Health/Watch, reflection: no credentials, and they stay open) are capped
      per peer address and in total, so they can never use up what authenticated traffic and
      probes need. Unary public calls (Health/Check) hold nothing and are not capped.
    - Authenticated RPCs other than Generate (admin, reads, uploads) are capped per tenant and
      in total; Generate has its own admission (`Admission`), so a flood of one RPC kind from
      one tenant starves neither another tenant nor anyone's Generate.

    gRPC's own `maximum_concurrent_rpcs` is not used: when it is reached, grpc.aio stops taking
    new calls, which then wait until their deadline (measured: 256 Watch streams made Generate
    and Health/Check end in DEADLINE_EXCEEDED). These caps answer RESOURCE_EXHAUSTED at once.
    """

    def __init__(
        self,
        *,
        max_public_streams: int,
        max_public_streams_per_peer: int,
        max_rpcs: int,
        max_rpcs_per_tenant: int,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        for what, value in (
            ("max_public_streams", max_public_streams),
            ("max_public_streams_per_peer", max_public_streams_per_peer),
            ("max_rpcs", max_rpcs),
            ("max_rpcs_per_tenant", max_rpcs_per_tenant),
        ):
            _check_limit(what, value)
        self.max_public_streams_per_peer = max_public_streams_per_peer
        self.max_rpcs_per_tenant = max_rpcs_per_tenant
        self._public = _Counts(max_public_streams)
        self._rpcs = _Counts(max_rpcs)
        self._on_refused = on_refused

    def public_stream(self, peer: str) -> Hold:
        """Count one open public stream of `peer` (an address without its port)."""
        full = self._public.full(peer, self.max_public_streams_per_peer)
        if full is not None:
            self._refused("public_streams_per_peer" if full == "key" else "public_streams")
            if full == "key":
                raise ResourceExhausted(
                    f"too many open health/reflection streams from this address "
                    f"(limit {self.max_public_streams_per_peer})"
                )
            raise ResourceExhausted(
                f"too many open health/reflection streams (limit {self._public.total_cap})"
            )
        self._public.add(peer)
        return Hold(functools.partial(self._public.discard, peer))

    def rpc(self, tenant: str) -> Hold:
        """Count one RPC (other than Generate) of `tenant` while it runs."""
        full = self._rpcs.full(tenant, self.max_rpcs_per_tenant)
        if full is not None:
            self._refused("tenant_rpcs" if full == "key" else "rpcs")
            if full == "key":
                raise ResourceExhausted(
                    f"tenant {tenant} has {self._rpcs.by_key.get(tenant, 0)} RPCs in progress "
                    f"(limit {self.max_rpcs_per_tenant})"
                )
            raise ResourceExhausted(f"server is at capacity ({self._rpcs.total} RPCs in progress)")
        self._rpcs.add(tenant)
        return Hold(functools.partial(self._rpcs.discard, tenant))

    def public_streams(self, peer: str | None = None) -> int:
        return self._public.total if peer is None else self._public.by_key.get(peer, 0)

    def rpcs(self, tenant: str | None = None) -> int:
        return self._rpcs.total if tenant is None else self._rpcs.by_key.get(tenant, 0)

    def _refused(self, limit: str) -> None:
        if self._on_refused is not None:
            self._on_refused(limit)
