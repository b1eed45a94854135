"""What a caller may do: roles, permissions, the method -> permission table, and `Policy`.

Pure functions of a `Principal` (who is calling, from `keys.KeyRing.authenticate`) and a method
or an adapter's owner; no state, no I/O. Access rules (DESIGN.md invariant 6):

- Deny by default. `METHOD_PERMISSIONS` names the permission of every RPC the server serves; an
  unknown method is refused (`Policy.authorize`). A test walks the service descriptors.
- `user`: generate, read its own tenant's adapters. `tenant-admin`: also manage its own tenant's
  adapters. `operator`: everything, on every tenant.
- A tenant uses its own adapters and those shared with it (`Policy.can_use`, which is the
  store's `adapter_store.model.can_use`: one rule, used by every read path).
- Another tenant's adapter is answered exactly like a missing one: NOT_FOUND with
  `errors.ADAPTER_NOT_FOUND_TEXT` (`Policy.effective_tenant_for_adapter`).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from adapter_store.errors import InvalidAdapter
from adapter_store.model import can_use, check_name
from lora_gateway.errors import ADAPTER_NOT_FOUND_TEXT, InvalidArgument, NotFound, PermissionDenied

__all__ = [
    "GENERATE_METHODS",
    "METHOD_PERMISSIONS",
    "PERMISSION_DENIED_TEXT",
    "ROLE_PERMISSIONS",
    "Permission",
    "Policy",
    "Principal",
    "Role",
    "is_public",
    "permission_for",
]

PERMISSION_DENIED_TEXT = "permission denied"


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
    _ADMIN + "SetAliasWeights": Permission.MANAGE_ADAPTERS,
    _ADMIN + "SetRetention": Permission.MANAGE_ADAPTERS,
    _ADMIN + "ShareAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "UnshareAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "ComposeAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "RevokeAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "PinAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "UnpinAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "PrefetchAdapter": Permission.MANAGE_ADAPTERS,
    # Evaluation sets and gated promotion (lora_gateway.evaluation).
    _ADMIN + "PutEvaluationSet": Permission.MANAGE_ADAPTERS,
    _ADMIN + "EvaluateAdapter": Permission.MANAGE_ADAPTERS,
    _ADMIN + "SetAliasPolicy": Permission.MANAGE_ADAPTERS,
    _ADMIN + "GetEvaluations": Permission.READ_ADAPTERS,
    # Automatic rollback (lora_gateway.rollback).
    _ADMIN + "SetRollbackPolicy": Permission.MANAGE_ADAPTERS,
    "/grpc.health.v1.Health/Check": Permission.HEALTH,
    "/grpc.health.v1.Health/Watch": Permission.HEALTH,
    "/grpc.health.v1.Health/List": Permission.HEALTH,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Permission.HEALTH,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Permission.HEALTH,
}

#: Methods whose admission is `limits.Admission.slot` (in the gateway), not `limits.RpcLimits.rpc`.
GENERATE_METHODS = frozenset({_INFERENCE + "Generate", _INFERENCE + "GenerateStream"})


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
        tenant = _tenant(principal, requested)
        if tenant == principal.tenant or principal.role is Role.OPERATOR:
            return tenant
        raise NotFound(ADAPTER_NOT_FOUND_TEXT)

    @staticmethod
    def effective_tenant_for_listing(principal: Principal, requested: str) -> str:
        """The tenant ListAdapters / GetResidency act on ("" = the caller's own).

        No adapter is named, so naming another tenant without the operator role is a plain
        PERMISSION_DENIED.
        """
        tenant = _tenant(principal, requested)
        if tenant == principal.tenant or principal.role is Role.OPERATOR:
            return tenant
        raise PermissionDenied(PERMISSION_DENIED_TEXT)


def _tenant(principal: Principal, requested: str) -> str:
    """The tenant a request names ("" = the caller's own), checked like any stored name."""
    tenant = requested or principal.tenant
    try:
        return check_name(tenant, "tenant")
    except InvalidAdapter as exc:
        raise InvalidArgument(str(exc)) from None
