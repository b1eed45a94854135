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
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import re
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
    "METHOD_PERMISSIONS",
    "PERMISSION_DENIED_TEXT",
    "ROLE_PERMISSIONS",
    "Admission",
    "KeyRing",
    "Permission",
    "Policy",
    "Principal",
    "Role",
    "Slot",
    "TenantConfig",
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
        if not str(path):
            raise InvalidArgument(
                "no tenants file configured: set tenants_file (`--tenants FILE`); "
                "without one every request would be refused"
            )
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidArgument(f"tenants file {path}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"tenants file {path}: not valid YAML: {exc}") from None
        try:
            return cls.from_mapping(data, defaults)
        except InvalidArgument as exc:
            raise InvalidArgument(f"tenants file {path}: {exc}") from None

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


class Admission:
    """Per-tenant and global caps on concurrent requests. Never queues: full means refused.

    Single event loop, no awaits between check and increment, so no lock is needed. `on_change`
    (e.g. `Metrics.set_inflight`) is called with (tenant, in-flight count) on every change.
    """

    def __init__(self, max_total: int, on_change: Callable[[str, int], None] | None = None) -> None:
        _check_limit("max_total", max_total)
        self.max_total = max_total
        self._on_change = on_change
        self._by_tenant: dict[str, int] = {}
        self._total = 0

    def slot(self, principal: Principal, tenant: TenantConfig) -> Slot:
        """A slot for one request of `principal`, limited by `tenant` (its own tenant's config).

        Use as `async with admission.slot(p, keyring.tenant(p.tenant)):` (or plain `with`).
        Entering raises ResourceExhausted at once when the tenant or the server is full; the
        slot is released on exit, whatever the exit (error, cancellation).
        """
        if tenant.name != principal.tenant:
            raise ValueError("slot(): tenant config must be the principal's own tenant's")
        return Slot(self, tenant)

    def in_flight(self, tenant: str) -> int:
        return self._by_tenant.get(tenant, 0)

    @property
    def total_in_flight(self) -> int:
        return self._total

    def _acquire(self, tenant: TenantConfig) -> None:
        current = self._by_tenant.get(tenant.name, 0)
        if current >= tenant.max_concurrent:
            raise ResourceExhausted(
                f"tenant {tenant.name} has {current} requests in flight "
                f"(limit {tenant.max_concurrent})"
            )
        if self._total >= self.max_total:
            raise ResourceExhausted(f"server is at capacity ({self._total} requests in flight)")
        self._by_tenant[tenant.name] = current + 1
        self._total += 1
        self._notify(tenant.name, current + 1)

    def _release(self, tenant: TenantConfig) -> None:
        remaining = self._by_tenant[tenant.name] - 1
        if remaining:
            self._by_tenant[tenant.name] = remaining
        else:
            del self._by_tenant[tenant.name]
        self._total -= 1
        self._notify(tenant.name, remaining)

    def _notify(self, tenant: str, count: int) -> None:
        if self._on_change is not None:
            self._on_change(tenant, count)


class Slot:
    """One admitted request; a sync and async context manager. Single use."""

    def __init__(self, admission: Admission, tenant: TenantConfig) -> None:
        self._admission = admission
        self._tenant = tenant
        self._held = False

    def __enter__(self) -> Slot:
        if self._held:
            raise RuntimeError("slot already entered")
        self._admission._acquire(self._tenant)
        self._held = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._held:
            self._held = False
            self._admission._release(self._tenant)

    async def __aenter__(self) -> Slot:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
