"""API keys -> principals: the `KeyRing` of a tenants file, and `Tenants`, the ring in force.

A ring is immutable. The tenants file can change while the server runs: the server's reload task
reads and validates the new file in a thread and puts the new ring in force with
`Tenants.replace`; an invalid file keeps the old ring. Everything (the interceptor, the gateway,
admission) reads the ring in force through one `Tenants` object, so a request sees either the
old file or the new one, never a mix.

The file's format and its error messages are `tenants_file`'s; pure and in-memory here, except
`KeyRing.load` and `KeyRing.read_file` (blocking file I/O: call them in a thread).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gateway.config import TenantDefaults
from lora_gateway.errors import Unauthenticated
from lora_gateway.tenancy import tenants_file
from lora_gateway.tenancy.limits import TenantConfig
from lora_gateway.tenancy.policy import Principal

__all__ = [
    "INVALID_CREDENTIALS_TEXT",
    "MISSING_CREDENTIALS_TEXT",
    "KeyRing",
    "Tenants",
    "hash_key",
]

MISSING_CREDENTIALS_TEXT = "missing credentials"
INVALID_CREDENTIALS_TEXT = "invalid credentials"

#: Longer authorization values are refused without hashing them.
_MAX_AUTHORIZATION_LEN = 4096


def hash_key(key: str) -> str:
    """The lowercase hex sha256 of an API key: what the tenants file stores."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Key:
    digest: bytes
    principal: Principal


@dataclass(frozen=True)
class KeyRing:
    """API key hashes -> principals, and per-tenant limits. Immutable; reload by replacing it.

    Built from a tenants file (`load`, `parse`, `from_mapping`; the format is in
    `tenants_file`'s docstring): `defaults` are the limits of whatever a tenant's entry leaves
    out (`Settings.tenant_defaults()`).
    """

    defaults: TenantDefaults
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    _keys: tuple[_Key, ...] = ()

    # --- construction -----------------------------------------------------------------------
    read_file = staticmethod(tenants_file.read)

    @classmethod
    def load(cls, path: str | Path, defaults: TenantDefaults) -> KeyRing:
        """Read and validate a tenants file (blocking file I/O: call it in a thread)."""
        return cls.parse(cls.read_file(path), defaults, where=str(path))

    @classmethod
    def parse(cls, data: bytes, defaults: TenantDefaults, *, where: str) -> KeyRing:
        """Validate the bytes of a tenants file (`where` names it in error messages)."""
        return cls._build(tenants_file.load_document(data, where=where), defaults)

    @classmethod
    def from_mapping(cls, data: Any, defaults: TenantDefaults) -> KeyRing:
        """Validate a parsed tenants document (None: no tenants)."""
        return cls._build(tenants_file.validate(data), defaults)

    @classmethod
    def _build(cls, document: tenants_file.TenantsFile, defaults: TenantDefaults) -> KeyRing:
        tenants = {
            name: TenantConfig.from_defaults(name, defaults, **entry.limits())
            for name, entry in document.tenants.items()
        }
        keys = tuple(
            _Key(key.sha256.encode("ascii"), Principal(tenant=name, role=key.role, key_id=key.id))
            for name, entry in document.tenants.items()
            for key in entry.keys
        )
        return cls(defaults=defaults, tenants=tenants, _keys=keys)

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
