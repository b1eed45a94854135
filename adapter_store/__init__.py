"""adapter_store: tenant LoRA adapters in S3 or a local folder, validated, versioned, cached.

Never imports lora_gateway. `S3Backend` lives in `adapter_store.s3` (the only boto3 user) and is
imported from there, so that the local store works without loading boto3.
"""

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
from adapter_store.store import AdapterStore, BlobBackend, Registry, Upload

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
    "StoreError",
    "StoreUnavailable",
    "Upload",
    "can_use",
    "check_name",
]
