"""The adapter store from Settings: the one place the server and the vLLM plugin open it.

`open_store(settings)` builds, from the settings alone:

- the backend: `file:///path` → a local folder, `s3://bucket/prefix` → S3, MinIO or SeaweedFS
  (`s3_endpoint`, `s3_region`, timeouts and attempts);
- the base-model spec adapters are validated against (`model`, `max_lora_rank`,
  `base_model_aliases`, `dtype`) and the size limits (`max_upload_bytes`, `compose_max_*`,
  `chat_template_max_bytes`);
- the upload spool (`spool_dir`, `spool_budget_bytes`) and the `Registry` over all of these;
- the disk cache (`cache_dir`, `cache_budget_bytes`), fetching through the registry.

Per-tenant quotas are not here: they come with each call, from the tenant's limits.
Blocking (it reads the model's config and scans the cache folder): run it in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapter_store import BaseModelSpec, BlobBackend, DiskCache, Limits, LocalBackend, Registry
from adapter_store.spool import Spool
from lora_gateway.config import Settings
from lora_gateway.errors import InvalidArgument

__all__ = ["Store", "base_model_spec", "open_backend", "open_store", "store_limits"]


@dataclass(frozen=True)
class Store:
    """The registry (over its backend, spec, limits and spool) and the disk cache it fills."""

    registry: Registry
    cache: DiskCache

    @property
    def spec(self) -> BaseModelSpec:
        return self.registry.spec

    @property
    def limits(self) -> Limits:
        return self.registry.limits

    @property
    def spool(self) -> Spool:
        return self.registry.spool


def open_backend(settings: Settings) -> BlobBackend:
    """`file:///path` → a local folder; `s3://bucket/prefix` → S3 / MinIO / SeaweedFS."""
    if settings.store.startswith("file://"):
        return LocalBackend(Path(settings.store.removeprefix("file://")))
    if settings.store.startswith("s3://"):
        from adapter_store.s3 import S3Backend  # boto3 is loaded only for an S3 store

        bucket, _, prefix = settings.store.removeprefix("s3://").partition("/")
        return S3Backend(
            bucket,
            prefix.strip("/"),
            endpoint_url=settings.s3_endpoint,
            region=settings.s3_region,
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
            max_attempts=settings.s3_max_attempts,
        )
    raise InvalidArgument("no adapter store configured (--store file:///path or s3://bucket)")


def base_model_spec(settings: Settings, model: str | None = None) -> BaseModelSpec:
    """What adapters must fit: the config of `model` (default: `settings.model`)."""
    return BaseModelSpec.from_hf_config(
        Path(model or settings.model),
        max_rank=settings.max_lora_rank,
        aliases=settings.base_model_aliases,
        dtype=settings.dtype,
    )


def store_limits(settings: Settings) -> Limits:
    """The size caps on uploads and compositions, and the most versions of a weighted alias."""
    return Limits(
        max_file_bytes=settings.max_upload_bytes,
        max_compose_parts=settings.compose_max_parts,
        max_compose_bytes=settings.compose_max_bytes,
        max_chat_template_bytes=settings.chat_template_max_bytes,
        max_alias_versions=settings.max_alias_versions,
    )


def open_store(settings: Settings, *, model: str | None = None, uploads: bool = True) -> Store:
    """The registry and the disk cache that `settings` describe (see the module docstring).

    `model` replaces `settings.model` as the base model adapters are validated against (the
    vLLM plugin: the model vLLM serves). With `uploads`, this process's spool session is opened
    now, which removes the spool folders of processes that are gone; a reader that never
    uploads (the vLLM plugin) passes False and leaves the spool folder untouched.
    """
    spec = base_model_spec(settings, model)
    backend = open_backend(settings)
    spool = Spool(settings.spool_path, settings.spool_budget_bytes, sessions=True)
    if uploads:
        spool.open()
    registry = Registry(backend, spec, store_limits(settings), spool=spool)
    cache = DiskCache(settings.cache_path, settings.cache_budget_bytes, registry.fetch_file)
    return Store(registry, cache)
