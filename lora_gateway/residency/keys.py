"""The keys residency tracks adapters by, and the answer it gives about one version.

Versions are keyed by (tenant, name, sha256): two tenants may upload the same bytes, and revoking
one must not touch the other. Manifests (and whole-adapter revocations) are keyed by (tenant,
name).
"""

from __future__ import annotations

from dataclasses import dataclass

from adapter_store import AdapterVersion

VersionKey = tuple[str, str, str]
NameKey = tuple[str, str]


def key_of(version: AdapterVersion) -> VersionKey:
    return (version.tenant, version.name, version.sha)


def owner_of(key: VersionKey) -> str:
    """The disk cache's owner label of a version key: who uses the bytes."""
    return f"{key[0]}/{key[1]}"


@dataclass(frozen=True)
class ResidencyEntry:
    version: AdapterVersion
    tier: str  # "engine" | "disk" | "store"
    pinned: bool
    lora_int_id: int
