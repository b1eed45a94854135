"""Who is calling and what they may do and hold: one job per module.

- `keys`: API keys -> principals (`KeyRing`, `hash_key`), and `Tenants`, the ring in force that
  the server replaces when the tenants file changes.
- `tenants_file`: the tenants file's format (pydantic models, `extra="forbid"`), reading it, and
  its error messages.
- `policy`: roles, permissions, the method -> permission table (deny by default), and `Policy`,
  whose sharing rule is the store's one rule (`adapter_store.model.can_use`).
- `limits`: a tenant's limits (`TenantConfig`), `Admission` (concurrent Generate requests, token
  and request rates with retry-after, uploads in progress) and `RpcLimits` (public streams, other
  RPCs).

Pure and in-memory, except reading the tenants file, which the server does in a thread. The
names below are the package's public surface (a test pins them); import the modules for the rest.
"""

from lora_gateway.tenancy.keys import KeyRing, Tenants, hash_key
from lora_gateway.tenancy.limits import (
    Admission,
    Hold,
    RpcLimits,
    Slot,
    TenantConfig,
    check_max_tokens,
)
from lora_gateway.tenancy.policy import (
    GENERATE_METHODS,
    METHOD_PERMISSIONS,
    PERMISSION_DENIED_TEXT,
    ROLE_PERMISSIONS,
    Permission,
    Policy,
    Principal,
    Role,
    is_public,
    permission_for,
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
