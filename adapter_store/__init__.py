"""adapter_store: tenant LoRA adapters in S3 or a local folder, validated, versioned, cached.

One job per module:

    model.py        names, references, versions, manifests, the base model (dataclasses)
    errors.py       the store's exception tree
    registry.py     `AdapterStore` (what the gateway codes against) and `Registry`: publish,
                    resolve, aliases, revoke, quarantine, over the modules below
    keys.py         the object layout: keys built from validated names and hex digests only
    upload.py       the streamed, hashed, size-capped upload into the spool
    manifests.py    manifest reads and conditional writes (conditional.py: the retry loop)
    changes.py      the change feed: one event per manifest write, listed in time order
    sharing.py      grants and each grantee's share index
    quota.py        per-tenant storage usage and quotas
    pages.py        paged listings: one backend listing per page
    compose.py      ComposeAdapter's workflow: bounded, fetched, written, published
    rollback.py     automatic rollback's state in the manifest: policies, stable versions,
                    rollback records, scheduled evaluations' claims
    rewrite.py      the exact arithmetic of LoRA weights: AdaLoRA -> LoRA, composition
    validate.py     adapter_config.json + safetensors checks
    spool.py        the upload spool's folder and byte budget
    backend.py      `BlobBackend`, the interface of local.py (a folder) and s3.py (boto3)
    cache.py        the local disk cache: byte budget, verified, atomic, single flight
    singleflight.py `SingleFlight`: one task per key for concurrent callers (the cache's
                    downloads; the gateway's residency uses it too)

Never imports lora_gateway. `S3Backend` lives in `adapter_store.s3` (the only boto3 user) and is
imported from there, so that the local store works without loading boto3.
"""

from adapter_store.backend import BlobBackend
from adapter_store.cache import CacheEntry, CacheStats, DiskCache
from adapter_store.errors import (
    AdapterNotFound,
    CapacityExceeded,
    Conflict,
    Incompatible,
    IntegrityError,
    InvalidAdapter,
    Quarantined,
    StoreError,
    StoreUnavailable,
)
from adapter_store.local import LocalBackend
from adapter_store.model import (
    DEFAULT_ALIAS,
    AdapterRef,
    AdapterVersion,
    BaseModelSpec,
    FileEntry,
    Limits,
    Manifest,
    can_use,
    check_name,
)
from adapter_store.registry import AdapterStore, Registry
from adapter_store.upload import SpooledAdapter, Upload

__all__ = [
    "DEFAULT_ALIAS",
    "AdapterNotFound",
    "AdapterRef",
    "AdapterStore",
    "AdapterVersion",
    "BaseModelSpec",
    "BlobBackend",
    "CacheEntry",
    "CacheStats",
    "CapacityExceeded",
    "Conflict",
    "DiskCache",
    "FileEntry",
    "Incompatible",
    "IntegrityError",
    "InvalidAdapter",
    "Limits",
    "LocalBackend",
    "Manifest",
    "Quarantined",
    "Registry",
    "SpooledAdapter",
    "StoreError",
    "StoreUnavailable",
    "Upload",
    "can_use",
    "check_name",
]
