"""Settings: one validated, frozen object, and the only reader of `os.environ` in the gateway.

Sources, later ones winning: defaults < YAML config file < environment (`LORA_GATEWAY_<FIELD>`,
e.g. `LORA_GATEWAY_MAX_LORAS=8`) < explicit overrides (the CLI's flags). Every field carries its
documentation as the docstring under it; cross-field checks live in `Settings.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml

from lora_gateway.errors import InvalidArgument

ENV_PREFIX = "LORA_GATEWAY_"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

NullAdapterMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class TenantDefaults:
    """Per-tenant limits; every field can be set per tenant in the tenants file."""

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


@dataclass(frozen=True)
class Settings:
    # --- engine -----------------------------------------------------------------------------
    model: str = ""
    """Base model: a local directory (or a hub name where the deployment may download)."""
    base_model_aliases: tuple[str, ...] = ()
    """Other names adapters may give as `base_model_name_or_path` for this base model."""
    dtype: str = "auto"
    """Engine dtype: auto, float16, bfloat16, float32."""
    quantization: str | None = None
    """Quantized base model (e.g. awq, gptq, bitsandbytes for QLoRA-style serving)."""
    max_loras: int = 4
    """Adapters usable in one batch (the engine's GPU slots)."""
    max_cpu_loras: int = 8
    """Adapters the engine keeps loaded; the residency capacity (LRU beyond it)."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted (one of vLLM's: 1, 8, 16, 32, 64, 128, 256, 320, 512)."""
    max_model_len: int | None = None
    """Context length; default the model's."""
    max_num_seqs: int = 64
    """Sequences the engine schedules at once."""
    gpu_memory_utilization: float = 0.9
    """Fraction of accelerator memory for the engine (of CPU memory on the CPU build)."""
    kv_cache_space_gib: int | None = None
    """CPU build only: KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE)."""
    tensor_parallel_size: int = 1
    """GPUs per replica."""
    enforce_eager: bool = False
    """Disable CUDA graphs / compilation (faster start, slower steps)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks across requests with a shared prefix (keyed per adapter version)."""
    prefix_cache_per_tenant: bool = True
    """Salt the prefix cache per tenant (vLLM's `cache_salt`: an HMAC-SHA256 of the tenant name
    under a random key made at start-up, so salts cannot be guessed): a tenant never reuses, and
    so can never time, another tenant's cached prompt prefixes. Off: tenants share them."""
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    """Any other vLLM engine argument, passed through as is."""
    null_adapter: NullAdapterMode = "auto"
    """Serve base-model requests through a pinned zero adapter, so that no request in a mixed
    batch runs with vLLM's "no adapter" index (-1). vLLM's CPU LoRA kernels index slots with it
    and read the last slot's weights. auto = on for the CPU build."""
    self_test: bool = True
    """Run the mixed-batch isolation self-test before reporting SERVING."""

    # --- store and cache --------------------------------------------------------------------
    store: str = ""
    """Adapter store: `file:///path` (local folder) or `s3://bucket/prefix`."""
    s3_endpoint: str | None = None
    """S3 endpoint URL (MinIO: http://minio:9000); default AWS."""
    s3_region: str | None = None
    """S3 region."""
    s3_connect_timeout_s: float = 2.0
    """Connect timeout for each S3 call."""
    s3_read_timeout_s: float = 10.0
    """Read timeout for each S3 call."""
    s3_max_attempts: int = 3
    """Attempts per S3 call (bounded retries)."""
    cache_dir: str = ""
    """Local disk cache for adapter files; default a folder under the system temp dir."""
    cache_budget_bytes: int = 4 << 30
    """Disk cache byte budget (LRU beyond it; pinned entries excepted)."""
    max_upload_bytes: int = 512 << 20
    """Largest adapter file accepted by UploadAdapter."""
    poll_interval_s: float = 2.0
    """How often manifests of resident adapters are re-read (conditional GET) so that other
    replicas' revocations, alias moves and shares take effect: the propagation bound."""
    manifest_cache_size: int = 1024
    """Manifests kept in memory and polled (least recently used beyond it; a manifest whose
    versions are in use, loading, resident or pinned is never dropped). Bounds the poll set,
    whatever names callers probe."""
    warm_adapters: tuple[str, ...] = ()
    """`tenant/name[@alias]` references loaded and pinned at start."""
    prefetch_on_upload: bool = False
    """Load a newly uploaded version into the engine right away."""

    # --- server -----------------------------------------------------------------------------
    listen: str = "127.0.0.1:50051"
    """gRPC listen address host:port (port 0 picks a free one)."""
    metrics_listen: str | None = None
    """Prometheus metrics HTTP address host:port; None disables it."""
    tenants_file: str = ""
    """YAML file mapping sha256 of API keys to tenants and roles."""
    tls_cert: str | None = None
    """Server certificate (PEM) for TLS."""
    tls_key: str | None = None
    """Server private key (PEM)."""
    tls_client_ca: str | None = None
    """CA bundle for client certificates; set to require mTLS."""
    max_message_bytes: int = 8 << 20
    """Largest gRPC message in either direction (upload chunks are smaller)."""
    max_concurrent_streams: int = 256
    """HTTP/2 streams per connection."""
    max_concurrent_requests: int = 64
    """Generate requests admitted at once across tenants (RESOURCE_EXHAUSTED beyond)."""
    tenant_max_concurrent: int = 16
    """Default per-tenant concurrent Generate requests (a tenant may set its own)."""
    tenant_max_tokens: int = 2048
    """Default per-tenant max_tokens per request."""
    default_max_tokens: int = 64
    """max_tokens used when a request leaves it 0."""
    tenant_max_engine_slots: int = 0
    """Default per-tenant cap on engine-resident adapter versions its requests hold at once,
    so that other tenants always find a slot (0 = max_cpu_loras - 1, at least 1)."""
    tenant_max_pins: int = 1
    """Default per-tenant cap on pinned adapter versions."""
    engine_slot_wait_s: float = 30.0
    """How long a request waits for an engine adapter slot (first its tenant's share, then a
    free or evictable slot, each in arrival order) before RESOURCE_EXHAUSTED."""
    tenant_max_concurrent_uploads: int = 2
    """Default per-tenant cap on UploadAdapter / ComposeAdapter calls in progress."""
    tenant_max_stored_bytes: int = 16 << 30
    """Default per-tenant quota on stored adapter bytes (every live version counted)."""
    tenant_max_adapters: int = 10_000
    """Default per-tenant quota on the number of adapters (names) stored."""
    tenant_tokens_per_minute: int = 0
    """Default per-tenant rate limit on generated tokens per minute (0 = unlimited)."""
    tenant_requests_per_minute: int = 0
    """Default per-tenant rate limit on inference requests per minute (0 = unlimited)."""
    drain_grace_s: float = 20.0
    """On SIGTERM: how long in-flight requests may finish before they are aborted."""
    upload_timeout_s: float = 600.0
    """Whole-upload deadline."""
    upload_min_rate_bytes_s: int = 64 << 10
    """Slowest accepted upload: after `upload_rate_grace_s`, an UploadAdapter stream that has
    received fewer than `upload_min_rate_bytes_s * (elapsed - grace)` bytes is refused with
    DEADLINE_EXCEEDED ("upload too slow"), also while it sends nothing at all; 0 disables it."""
    upload_rate_grace_s: float = 5.0
    """How long an upload may send nothing before the minimum rate applies."""
    max_connection_idle_s: float = 600.0
    """Client connections with no RPC for this long are closed by the server (GOAWAY)."""
    engine_watch_interval_s: float = 5.0
    """How often the engine's health is checked; when it fails, health goes NOT_SERVING and
    `lora-gateway serve` exits 1 (Kubernetes restarts the pod)."""
    audit_log: str | None = None
    """JSON-lines audit log of admin actions and denials; None logs to the `audit` logger."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.max_loras < 1:
            problems.append("max_loras must be >= 1")
        if self.max_cpu_loras < self.max_loras:
            problems.append(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            problems.append(f"max_lora_rank must be one of {VLLM_LORA_RANKS}")
        if self.null_adapter not in get_args(NullAdapterMode):
            problems.append("null_adapter must be auto, on or off")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append("gpu_memory_utilization must be in (0, 1]")
        if self.store and not self.store.startswith(("file://", "s3://")):
            problems.append("store must be file:///path or s3://bucket/prefix")
        if self.poll_interval_s <= 0:
            problems.append("poll_interval_s must be > 0")
        if self.engine_slot_wait_s <= 0:
            problems.append("engine_slot_wait_s must be > 0")
        if self.engine_watch_interval_s <= 0:
            problems.append("engine_watch_interval_s must be > 0")
        if self.upload_timeout_s <= 0:
            problems.append("upload_timeout_s must be > 0")
        if self.max_connection_idle_s <= 0:
            problems.append("max_connection_idle_s must be > 0")
        if self.upload_min_rate_bytes_s < 0 or self.upload_rate_grace_s < 0:
            problems.append("upload_min_rate_bytes_s and upload_rate_grace_s must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.default_max_tokens > self.tenant_max_tokens:
            problems.append("default_max_tokens must be <= tenant_max_tokens")
        for name in (
            "max_num_seqs",
            "max_concurrent_requests",
            "tenant_max_concurrent",
            "tenant_max_tokens",
            "tenant_max_pins",
            "tenant_max_concurrent_uploads",
            "tenant_max_stored_bytes",
            "tenant_max_adapters",
            "manifest_cache_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in (
            "tenant_max_engine_slots",
            "tenant_tokens_per_minute",
            "tenant_requests_per_minute",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if problems:
            raise InvalidArgument("invalid settings: " + "; ".join(problems))

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Defaults < config file < environment < overrides (None values are ignored)."""
        values: dict[str, Any] = {}
        if config_file:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise InvalidArgument(f"{config_file}: expected a mapping of settings")
            values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        env = os.environ if environ is None else environ
        for name in cls.field_names():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        hints = get_type_hints(cls)
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise InvalidArgument(f"unknown settings: {', '.join(unknown)}")
        return cls(**{name: _coerce(name, hints[name], value) for name, value in values.items()})

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # --- derived ----------------------------------------------------------------------------
    def tenant_defaults(self) -> TenantDefaults:
        """The per-tenant limits a tenant gets unless the tenants file sets its own."""
        return TenantDefaults(
            max_concurrent=self.tenant_max_concurrent,
            max_tokens=self.tenant_max_tokens,
            max_engine_slots=self.tenant_max_engine_slots or max(1, self.max_cpu_loras - 1),
            max_pins=self.tenant_max_pins,
            max_concurrent_uploads=self.tenant_max_concurrent_uploads,
            max_stored_bytes=self.tenant_max_stored_bytes,
            max_adapters=self.tenant_max_adapters,
            tokens_per_minute=self.tenant_tokens_per_minute,
            requests_per_minute=self.tenant_requests_per_minute,
        )

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        import tempfile

        return Path(tempfile.gettempdir()) / "lora-gateway-cache"


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert a file/env/flag value to the field's type, or raise InvalidArgument."""
    text_like = isinstance(value, str)
    try:
        origin = getattr(hint, "__origin__", None)
        args = get_args(hint)
        if hint is bool or (args and bool in args and type(None) in args):
            if isinstance(value, bool):
                return value
            if text_like and value.lower() in ("1", "true", "yes", "on"):
                return True
            if text_like and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected a boolean")
        if origin is tuple:
            items = value.split(",") if text_like else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if hint is int or int in args:
            if value is None or (text_like and value == "" and type(None) in args):
                return None
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float or float in args:
            return float(value)
        if origin is Literal or (args and all(isinstance(a, str) for a in args)):
            return str(value)
        if "Mapping" in str(hint):
            if text_like:
                value = yaml.safe_load(value) or {}
            if not isinstance(value, Mapping):
                raise ValueError("expected a mapping")
            return dict(value)
        if value is None:
            return None
        return str(value)
    except (TypeError, ValueError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"setting {name}: {exc}") from None
