"""Settings: one validated, frozen pydantic-settings model, the only reader of `os.environ`.

Sources, later ones winning: defaults < YAML config file (`--config FILE`) < environment
(`LORA_GATEWAY_<FIELD>`, e.g. `LORA_GATEWAY_MAX_LORAS=8`) < explicit overrides (the CLI's flags).
Every field's documentation is the docstring under it (`use_attribute_docstrings`: the CLI's help
text and the chart's schema read it), single-field constraints are `Field(...)` arguments, and
cross-field checks live in one `model_validator`, as in vLLM's `LoRAConfig`.

Values from the file, the environment and flags are coerced by pydantic; lists are also accepted
as comma-separated text (`LORA_GATEWAY_WARM_ADAPTERS=acme/a,acme/b`) and `engine_args` as YAML
text. Every problem is reported as one `InvalidArgument` that names each setting concerned.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from lora_gateway.errors import InvalidArgument

ENV_PREFIX = "LORA_GATEWAY_"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: `max_cpu_loras` when neither it nor a host byte budget is set.
DEFAULT_CPU_LORAS = 8
#: The most `max_cpu_loras` derived from a host byte budget (vLLM's count is only an LRU's
#: capacity: nothing is allocated per entry).
MAX_DERIVED_CPU_LORAS = 65_536

NullAdapterMode = Literal["auto", "on", "off"]
Dtype = Literal["auto", "float16", "bfloat16", "float32", "half", "float"]


def _split_commas(value: object) -> object:
    """Text lists (`a,b`) from the environment or a flag; lists and tuples as they are."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple):
        return tuple(str(part).strip() for part in value if str(part).strip())
    return value


def _yaml_mapping(value: object) -> object:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of vLLM engine arguments")
    return dict(value)


def _vllm_rank(value: int) -> int:
    if value not in VLLM_LORA_RANKS:
        raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))}")
    return value


Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_split_commas)]
EngineArgs = Annotated[dict[str, Any], NoDecode, BeforeValidator(_yaml_mapping)]
LoraRank = Annotated[
    int, AfterValidator(_vllm_rank), Field(json_schema_extra={"enum": list(VLLM_LORA_RANKS)})
]


#: A tenant limit that must be at least 1; `UnlimitedAtZero`: at least 0, 0 = unlimited.
Limit = Annotated[int, Field(strict=True, ge=1)]
UnlimitedAtZero = Annotated[int, Field(strict=True, ge=0)]
#: `cpu_queue_wait_us`; also what vLLM's processes read from the environment (vllm_plugin).
QueueWaitUs = Annotated[int, Field(ge=0, le=10_000)]
#: The environment variable that carries `cpu_queue_wait_us` into vLLM's processes.
QUEUE_WAIT_ENV = f"{ENV_PREFIX}CPU_QUEUE_WAIT_US"


class TenantDefaults(BaseModel):
    """A tenant's limits: every field can be set per tenant in the tenants file (`tenancy`'s
    `TenantsFile`); `Settings.tenant_defaults()` gives the values of the fields a tenant's entry
    leaves out. Integers only (a YAML `"8"` or `yes` is a mistake, not a number)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    max_concurrent: Limit = 16
    """Generate requests of this tenant admitted at once."""
    max_tokens: Limit = 2048
    """Largest max_tokens per request."""
    max_engine_slots: Limit = 1
    """Engine-resident adapter versions its requests may hold at once."""
    max_host_bytes: Limit = 1 << 30
    """With a host byte budget (`host_lora_budget_bytes`): what the versions its requests hold
    at once may weigh in the host tier (one version is always allowed)."""
    max_pins: Limit = 1
    """Adapter versions it may pin."""
    max_concurrent_uploads: Limit = 2
    """Uploads and compositions in progress at once."""
    max_stored_bytes: Limit = 16 << 30
    """Stored adapter bytes (every live version)."""
    max_adapters: Limit = 10_000
    """Adapters (names) stored."""
    tokens_per_minute: UnlimitedAtZero = 0
    """Generated tokens per minute (0 = unlimited)."""
    requests_per_minute: UnlimitedAtZero = 0
    """Inference requests per minute (0 = unlimited)."""


class Settings(BaseSettings):
    """The gateway's configuration (see the module docstring for where values come from)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    # --- engine -----------------------------------------------------------------------------
    model: str = ""
    """Base model: a local directory (or a hub name where the deployment may download)."""
    base_model_aliases: Names = ()
    """Other names adapters may give as `base_model_name_or_path` for this base model."""
    dtype: Dtype = "auto"
    """Engine dtype: auto, float16, bfloat16, float32."""
    quantization: str | None = None
    """vLLM quantization method; leave unset for a quantized checkpoint (its config.json names
    its own: compressed-tensors, awq, gptq, ...), set it for online quantization (fp8, ...).
    On the CPU build a method with no CPU kernel here (W4A16, fp8 on AVX2) is refused at start
    (README, "Quantized base")."""
    max_loras: int = Field(4, ge=1)
    """Adapters usable in one batch (the engine's GPU slots)."""
    max_cpu_loras: int | None = Field(None, ge=1)
    """Adapters the engine keeps loaded (vLLM's CPU LoRA cache counts them); the residency
    capacity (a segmented LRU beyond it: versions used once since their load go first).
    Unset: 8 (at least max_loras), or, with `host_lora_budget_bytes`, derived from the budget
    (`engine_cpu_loras`) so that only the bytes bind."""
    host_lora_budget_bytes: int = Field(0, ge=0)
    """Bytes of adapter weights the host tier (vLLM's CPU LoRA cache: the versions loaded in the
    engine) may hold, counted by each version's real size (its weights file), and at least
    the smallest adapter that changes every layer of the base (rank 1 on its narrowest module,
    in the serving dtype). Loads evict idle versions until it fits; a version larger than the
    whole budget is refused (RESOURCE_EXHAUSTED). With `max_cpu_loras` unset, the count is
    derived: the budget over that smallest size, between max_loras and 65,536. 0 = bounded by
    `max_cpu_loras` only."""
    max_lora_rank: LoraRank = 64
    """Largest adapter rank accepted (one of vLLM's: 1, 8, 16, 32, 64, 128, 256, 320, 512)."""
    max_model_len: int | None = Field(None, ge=1)
    """Context length; default the model's."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences the engine schedules at once."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of accelerator memory for the engine (of CPU memory on the CPU build)."""
    kv_cache_space_gib: int | None = Field(None, ge=1)
    """CPU build only: KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs per replica."""
    enforce_eager: bool = False
    """Disable CUDA graphs / compilation (faster start, slower steps)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks across requests with a shared prefix (keyed per adapter version)."""
    prefix_cache_per_tenant: bool = True
    """Salt the prefix cache per tenant (vLLM's `cache_salt`: an HMAC-SHA256 of the tenant name
    under a random key made at start-up, so salts cannot be guessed): a tenant never reuses, and
    so can never time, another tenant's cached prompt prefixes. Off: tenants share them."""
    engine_args: EngineArgs = Field(default_factory=dict)
    """Any other vLLM engine argument, passed through as is."""
    cpu_queue_wait_us: QueueWaitUs = 100
    """CPU build only: microseconds vLLM's engine-core and worker processes sleep between two
    looks at the shared-memory queue between them. vLLM busy-waits (`sched_yield`) for 1 s after
    each message, so on a few cores its two waiting processes take the cores the worker's
    forward pass and the gateway need (the CPU slow phase, docs/benchmarks.md). 0 keeps vLLM's
    busy wait. Applied by the package's vLLM plugin in those processes; under `vllm serve` only
    where `LORA_GATEWAY_CPU_QUEUE_WAIT_US` is set in its environment."""
    null_adapter: NullAdapterMode = "auto"
    """Serve base-model requests through a pinned zero adapter, so that no request in a mixed
    batch runs with vLLM's "no adapter" index (-1). vLLM's CPU LoRA kernels index slots with it
    and read the last slot's weights. auto = on for the CPU build."""
    self_test: bool = True
    """Run the mixed-batch isolation self-test before reporting SERVING."""
    canary_interval_s: float = Field(30.0, ge=0, le=86_400)
    """Runtime canary: every this many seconds, and right after each adapter version is loaded,
    a known base-model and canary-adapter request (a random adapter in its own reserved engine
    slot) runs among real traffic and is compared with its reference, recorded at start-up. On a
    mismatch health goes NOT_SERVING, the versions loaded since the last good check are
    quarantined, and the engine is restarted (or `lora-gateway serve` exits). Detection bound:
    this interval plus one check (~1 s). 0 disables it (and frees the reserved slot)."""

    # --- store and cache --------------------------------------------------------------------
    store: str = ""
    """Adapter store: `file:///path` (local folder) or `s3://bucket/prefix`."""
    s3_endpoint: str | None = None
    """S3 endpoint URL (MinIO: http://minio:9000); default AWS."""
    s3_region: str | None = None
    """S3 region."""
    s3_connect_timeout_s: float = Field(2.0, gt=0)
    """Connect timeout for each S3 call."""
    s3_read_timeout_s: float = Field(10.0, gt=0)
    """Read timeout for each S3 call."""
    s3_max_attempts: int = Field(3, ge=1)
    """Attempts per S3 call (bounded retries)."""
    cache_dir: str = ""
    """Local disk cache for adapter files; default a folder under the system temp dir."""
    cache_budget_bytes: int = Field(4 << 30, ge=1)
    """Disk cache byte budget (LRU beyond it; pinned entries excepted)."""
    max_upload_bytes: int = Field(512 << 20, ge=1)
    """Largest adapter file accepted by UploadAdapter."""
    spool_dir: str = ""
    """Where uploads and compositions are spooled while they run (one folder each, removed at
    the end); default a folder under the system temp dir. The chart mounts a volume sized from
    `spool_budget_bytes` here."""
    spool_budget_bytes: int = Field(4 << 30, ge=1)
    """Bytes all uploads and compositions in progress may spool at once. An upload reserves its
    declared sizes when its header arrives (a composition: its parts and its result), before any
    byte is written; beyond the budget it is refused with RESOURCE_EXHAUSTED."""
    compose_max_parts: int = Field(8, ge=1)
    """Most parts one ComposeAdapter call may name."""
    compose_max_bytes: int = Field(1 << 30, ge=1)
    """Most stored bytes the parts of one ComposeAdapter call may total (checked from the
    manifests, before anything is fetched)."""
    max_alias_versions: int = Field(4, ge=2, le=64)
    """Most versions one weighted alias (a canary, SetAliasWeights) may split its traffic
    between; more are refused with INVALID_ARGUMENT."""
    poll_interval_s: float = Field(2.0, gt=0)
    """How often the store's change feed is listed, and the cached manifests it names re-read
    (conditional GET), so that other replicas' revocations, alias moves and shares take effect:
    the propagation bound. A poll costs 1 listing + the changed manifests +
    `manifest_resync_per_poll` store requests, however many manifests are cached."""
    manifest_resync_per_poll: int = Field(16, ge=0)
    """Cached manifests each poll also re-reads, round robin, whether or not the feed named
    them: the safety net for a change whose feed event was never written. Every cached manifest
    is re-read at least once per ceil(cached / this) polls. 0 turns it off."""
    change_feed_lookback_s: float = Field(30.0, gt=0)
    """Each poll lists the feed from its previous listing's start minus this: events stamped up
    to this much early (clock skew between replicas, a slow PUT) are still seen."""
    change_feed_retention_s: float = Field(3600.0, gt=0)
    """Feed events older than this are deleted. A replica that could not read the feed for
    longer than this minus `change_feed_lookback_s` re-reads every cached manifest (a full
    resync) once the store is back."""
    manifest_cache_size: int = Field(1024, ge=1)
    """Manifests kept in memory and kept fresh (least recently used beyond it; a manifest whose
    versions are in use, loading, resident or pinned is never dropped). Bounds the poll set,
    whatever names callers probe."""
    propagation_stale_after_s: float = Field(60.0, gt=0)
    """When no manifest poll has completed (the change feed read to its end) for this long, health
    reports NOT_SERVING for readiness (service "") until one completes: a replica that cannot
    see other replicas' revocations leaves the load balancer. Liveness ("liveness") stays
    SERVING. At least 2 x poll_interval_s."""
    warm_adapters: Names = ()
    """`tenant/name[@alias]` references loaded and pinned at start."""
    prefetch_on_upload: bool = False
    """Load a newly uploaded version into the engine right away."""

    # --- server -----------------------------------------------------------------------------
    listen: str = "127.0.0.1:50051"
    """gRPC listen address host:port (port 0 picks a free one)."""
    metrics_listen: str | None = None
    """Prometheus metrics HTTP address host:port; None disables it."""
    version_metrics_max: int = Field(8, ge=0, le=1000)
    """Per adapter, how many versions that no alias points at may have per-version metric
    labels of their own (`lora_gateway_version_*`) at once: a version takes a free slot on its
    call and keeps it while it serves within `version_metrics_window_s`. Versions an alias
    points at (plain or weighted) always have labels; the calls of any other version count
    under `version="other"`."""
    version_metrics_window_s: float = Field(300.0, gt=0, le=86400)
    """The window of the per-version metrics: GetAdapter's summary of each version covers the
    calls of the last this many seconds (at most 512 per version and caller tenant), and a
    version with no call for this long loses its labels unless an alias points at it."""
    tenants_file: str = ""
    """YAML file mapping sha256 of API keys to tenants and roles."""
    tenants_reload_interval_s: float = Field(5.0, ge=0)
    """How often the tenants file is re-read (in a thread); a changed, valid file replaces the
    keys and limits in force (a Kubernetes Secret update shows in the mounted file within about
    a minute), an invalid one is logged and the previous file stays. 0 disables reloading."""
    health_listen: str | None = None
    """An extra listener (host:port) serving only grpc.health.v1, for kubelet probes: nothing
    else is reachable there and the chart's NetworkPolicy admits no pod to it. None: off."""
    tls_cert: str | None = None
    """Server certificate (PEM) for TLS."""
    tls_key: str | None = None
    """Server private key (PEM)."""
    tls_client_ca: str | None = None
    """CA bundle for client certificates; set to require mTLS."""
    max_message_bytes: int = Field(8 << 20, ge=1024)
    """Largest gRPC message in either direction (upload chunks are smaller)."""
    max_concurrent_streams: int = Field(256, ge=1)
    """HTTP/2 streams per connection."""
    max_concurrent_requests: int = Field(64, ge=1)
    """Generate requests admitted at once across tenants (RESOURCE_EXHAUSTED beyond)."""
    max_concurrent_rpcs: int = Field(256, ge=1)
    """Authenticated RPCs other than Generate (admin, reads, uploads) in progress at once across
    tenants (RESOURCE_EXHAUSTED beyond)."""
    tenant_max_concurrent_rpcs: int = Field(32, ge=1)
    """Per-tenant cap on authenticated RPCs other than Generate in progress at once."""
    public_max_streams: int = Field(64, ge=1)
    """Open unauthenticated streams (grpc.health.v1 Watch, reflection) at once in total."""
    public_max_streams_per_peer: int = Field(4, ge=1)
    """Open unauthenticated streams at once per client address (behind a proxy every client
    shares the proxy's address: raise it there)."""
    tenant_max_concurrent: int = Field(16, ge=1)
    """Default per-tenant concurrent Generate requests (a tenant may set its own)."""
    tenant_max_tokens: int = Field(2048, ge=1)
    """Default per-tenant max_tokens per request."""
    default_max_tokens: int = Field(64, ge=1)
    """max_tokens used when a request leaves it 0."""
    tenant_max_engine_slots: int = Field(0, ge=0)
    """Default per-tenant cap on engine-resident adapter versions its requests hold at once,
    so that other tenants always find a slot (0 = max_cpu_loras - 1, at least 1)."""
    tenant_max_host_bytes: int = Field(0, ge=0)
    """Default per-tenant cap, with `host_lora_budget_bytes`, on the bytes of the versions its
    requests hold in the host tier at once, so that one tenant's large adapters leave room for
    others (0 = half the budget; one version is always allowed)."""
    tenant_max_pins: int = Field(1, ge=1)
    """Default per-tenant cap on pinned adapter versions."""
    engine_slot_wait_s: float = Field(30.0, gt=0)
    """How long a request waits for an engine adapter slot (first its tenant's share, then a
    free or evictable slot, each in arrival order) before RESOURCE_EXHAUSTED."""
    tenant_max_concurrent_uploads: int = Field(2, ge=1)
    """Default per-tenant cap on UploadAdapter / ComposeAdapter calls in progress."""
    tenant_max_stored_bytes: int = Field(16 << 30, ge=1)
    """Default per-tenant quota on stored adapter bytes (every live version counted)."""
    tenant_max_adapters: int = Field(10_000, ge=1)
    """Default per-tenant quota on the number of adapters (names) stored."""
    tenant_tokens_per_minute: int = Field(0, ge=0)
    """Default per-tenant rate limit on generated tokens per minute (0 = unlimited)."""
    tenant_requests_per_minute: int = Field(0, ge=0)
    """Default per-tenant rate limit on inference requests per minute (0 = unlimited)."""
    drain_grace_s: float = Field(20.0, ge=0)
    """On SIGTERM: how long in-flight requests may finish before they are aborted."""
    upload_timeout_s: float = Field(600.0, gt=0)
    """Whole-upload deadline."""
    upload_min_rate_bytes_s: int = Field(64 << 10, ge=0)
    """Slowest accepted upload: after `upload_rate_grace_s`, an UploadAdapter stream that has
    received fewer than `upload_min_rate_bytes_s * (elapsed - grace)` bytes is refused with
    DEADLINE_EXCEEDED ("upload too slow"), also while it sends nothing at all; 0 disables it."""
    upload_rate_grace_s: float = Field(5.0, ge=0)
    """How long an upload may send nothing before the minimum rate applies."""
    max_connection_idle_s: float = Field(600.0, gt=0)
    """Client connections with no RPC for this long are closed by the server (GOAWAY)."""
    engine_watch_interval_s: float = Field(5.0, gt=0)
    """How often the engine's health is checked; when it fails, health goes NOT_SERVING and
    `lora-gateway serve` exits 1 (Kubernetes restarts the pod)."""
    audit_log: str | None = None
    """JSON-lines audit log of admin actions and denials; None logs to the `audit` logger."""
    usage_log: str | None = None
    """JSON-lines usage records: one per inference call (Generate, GenerateStream, the OpenAI
    front's completions and chat completions), with its tenant, key id, adapter version, prompt
    and completion tokens, latency, finish reason, request id and status code, never a prompt
    or an output; written by a thread, like `audit_log`. `lora-gateway usage` sums them. None
    logs them to the `lora_gateway.usage` logger."""
    vllm_open_adapter_routes: bool = False
    """vLLM plugin only: let `vllm serve` start without the `lora_gateway_guard` endpoint
    plugin, with vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter and /adapters open to
    every client. Set it only when a proxy in front of vLLM blocks those paths."""
    admin_store_threads: int = Field(4, ge=1)
    """Threads for the store I/O of Admin RPCs: their own pool, apart from the one cold loads
    and revocation use, so a flood of admin reads cannot delay them. One tenant's calls hold
    at most half of these threads at once."""

    # --- requests: chat, structured output, logprobs ------------------------------------------
    chat_max_messages: int = Field(512, ge=1)
    """Most messages in one conversation (`messages` prompts); more is INVALID_ARGUMENT."""
    chat_max_prompt_chars: int = Field(200_000, ge=1)
    """Longest conversation, in characters: the messages' contents together, and the prompt the
    chat template renders from them (INVALID_ARGUMENT beyond)."""
    chat_template_max_bytes: int = Field(64 << 10, ge=1)
    """Largest chat template (UTF-8 bytes) the gateway compiles. A base model whose template is
    larger (or does not compile) is logged at start, and its chat requests are refused with
    FAILED_PRECONDITION; text and token prompts are served. An adapter's uploaded
    chat_template.jinja above it is refused (INVALID_ARGUMENT) and nothing is stored."""
    chat_render_timeout_s: float = Field(1.0, gt=0, le=60)
    """Longest a chat template may run to render one conversation (checked while it runs, in a
    thread of its own); beyond, the request is INVALID_ARGUMENT."""
    structured_max_schema_bytes: int = Field(32 << 10, ge=2)
    """Largest JSON schema of a structured-output request (UTF-8 bytes of its JSON text)."""
    structured_max_schema_depth: int = Field(32, ge=1)
    """Deepest nesting of objects and arrays in a JSON schema document (an object schema
    nested in another takes two levels: itself and the `properties` around it)."""
    structured_max_schema_properties: int = Field(256, ge=1)
    """Most properties a JSON schema declares, counted over every `properties` in it."""
    structured_max_enum_values: int = Field(256, ge=1)
    """Most `enum` values a JSON schema lists, counted over the whole schema; also the most
    `choice` strings of a choice constraint."""
    structured_max_regex_chars: int = Field(1024, ge=1)
    """Longest regex: the regex constraint, each `pattern` of a JSON schema, each choice."""
    structured_max_repeat: int = Field(4096, ge=1)
    """Budget of counted repetitions ({n}, {n,m}, {n,}) in a request's regexes and schema
    patterns: each costs the product of its bound and the bounds around it, summed over the
    request. vLLM parses these on its event loop and xgrammar expands them (measured:
    `(.{1,1000}){1,1000}` in a schema pattern took 0.38 s to parse)."""
    structured_max_grammar_bytes: int = Field(32 << 10, ge=1)
    """Largest grammar (EBNF/GBNF or Lark) of a grammar constraint, in UTF-8 bytes."""
    max_logprobs: int = Field(20, ge=0, le=1024)
    """Most alternatives per token a request may ask for (`logprobs`, `prompt_logprobs`, the
    OpenAI API's `top_logprobs`); also the engine's own `max_logprobs`."""

    # --- evaluations (EvaluateAdapter; lora_gateway.evaluation) -------------------------------
    evaluation_max_concurrent: int = Field(1, ge=1)
    """Evaluations that may run at once on this gateway, one tenant at most half of them (at
    least one); more are refused with RESOURCE_EXHAUSTED. Each runs one case at a time, so
    evaluations hold at most this many of the engine's request slots (vLLM's request priority
    is not used: it needs the whole engine scheduled by priority)."""
    evaluation_max_set_bytes: int = Field(256 << 10, ge=1)
    """Largest evaluation set (PutEvaluationSet), in UTF-8 bytes of its JSON."""
    evaluation_max_cases: int = Field(32, ge=1, le=64)
    """Most cases of one evaluation set (at most 64, what a manifest records per result)."""
    evaluation_max_case_tokens: int = Field(64, ge=1)
    """Most tokens a case of an evaluation set may generate (its `max_tokens`); the tenant's
    own `max_tokens` cap applies too."""

    # --- automatic rollback (SetRollbackPolicy; lora_gateway.rollback) ------------------------
    rollback_check_interval_s: float = Field(2.0, gt=0, le=3600)
    """How often this replica checks the canaries it serves (weighted aliases with a rollback
    policy, among the manifests it has cached) against their policies, and starts the scheduled
    evaluations that are due. A canary that crossed its policy is rolled back within about this
    long (plus one manifest write)."""
    rollback_min_eval_interval_s: float = Field(60.0, gt=0)
    """The shortest `eval_interval_s` a rollback policy may ask for: scheduled evaluations of a
    canary run at most once per that interval across all replicas (they hold one of the
    `evaluation_max_concurrent` slots while they run)."""

    # --- OpenAI-compatible HTTP ---------------------------------------------------------------
    openai_listen: str | None = None
    """OpenAI-compatible HTTP API on host:port (/v1/completions, /v1/chat/completions,
    /v1/models), served by this process next to gRPC: the same API keys (Authorization:
    Bearer), permissions, tenancy, limits, audit and metrics; TLS settings apply to it too;
    request bodies are limited to max_message_bytes. None: off."""
    openai_model_name: str = ""
    """The base model's name in the OpenAI API (`model`, /v1/models); default: its own name
    (config.json's `_name_or_path`, else the model folder's name)."""
    openai_max_models: int = Field(1000, ge=1)
    """Most adapters /v1/models lists (the caller's own, then those shared with it), read page
    by page from the store."""

    def __init__(self, **values: Any) -> None:
        """Validate `values` (and, inside `load`, the environment and file); InvalidArgument
        naming every bad setting otherwise."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidArgument(_explain(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _plain_values(cls, values: Any) -> Any:
        """Before field validation: an empty text means None for optional settings, and a
        boolean is not a number (YAML's `yes` for a count is a mistake, not 1)."""
        if not isinstance(values, dict):
            return values
        out = dict(values)
        for name, value in values.items():
            info = cls.model_fields.get(name)
            if info is None:
                continue
            kinds = get_args(info.annotation) or (info.annotation,)
            if value == "" and type(None) in kinds:
                out[name] = None
            elif isinstance(value, bool) and bool not in kinds and (int in kinds or float in kinds):
                raise ValueError(f"{name}: expected a number, got {value!r}")
        return out

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems: list[str] = []
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            problems.append(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        if self.store and not self.store.startswith(("file://", "s3://")):
            problems.append("store must be file:///path or s3://bucket/prefix")
        if self.change_feed_retention_s < 4 * self.change_feed_lookback_s:
            problems.append("change_feed_retention_s must be >= 4 x change_feed_lookback_s")
        if self.propagation_stale_after_s < 2 * self.poll_interval_s:
            problems.append("propagation_stale_after_s must be >= 2 x poll_interval_s")
        if self.spool_budget_bytes < self.max_upload_bytes:
            problems.append(
                "spool_budget_bytes must be >= max_upload_bytes (else no upload of the largest "
                "accepted size could ever be spooled)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.default_max_tokens > self.tenant_max_tokens:
            problems.append("default_max_tokens must be <= tenant_max_tokens")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- sources ----------------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides (init) > environment > YAML file. Plain construction (`from_mapping`,
        `Settings(...)`) reads neither the environment nor a file: only `load` does."""
        inputs = _inputs.get()
        if inputs is None:
            return (init_settings,)
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            _Environ(settings_cls, inputs.environ),
        ]
        if inputs.config_file is not None:
            sources.append(_YamlFile(settings_cls, inputs.config_file))
        return tuple(sources)

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Defaults < config file < environment (`os.environ` unless given) < overrides (None
        values are ignored). Raises InvalidArgument naming every bad setting."""
        import os

        token = _inputs.set(
            _Inputs(
                Path(config_file) if config_file else None,
                os.environ if environ is None else environ,
            )
        )
        try:
            given = {k: v for k, v in (overrides or {}).items() if v is not None}
            unknown = sorted(set(given) - set(cls.model_fields))
            if unknown:
                raise InvalidArgument(f"unknown settings: {', '.join(unknown)}")
            return cls(**given)
        finally:
            _inputs.reset(token)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Settings from plain values (no environment, no file); InvalidArgument if invalid."""
        return cls(**{str(k): v for k, v in values.items()})

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.model_fields)

    @classmethod
    def field_doc(cls, name: str) -> str:
        """The field's docstring on one line (the CLI's help text)."""
        return " ".join((cls.model_fields[name].description or name.replace("_", " ")).split())

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, validated like any other input."""
        return Settings.from_mapping({**self.model_dump(), **changes})

    # --- derived ----------------------------------------------------------------------------
    def tenant_defaults(self) -> TenantDefaults:
        """The per-tenant limits a tenant gets unless the tenants file sets its own: each field
        of `TenantDefaults` from the setting `tenant_<field>`."""
        values = {name: getattr(self, f"tenant_{name}") for name in TenantDefaults.model_fields}
        values["max_engine_slots"] = self.tenant_max_engine_slots or max(
            1, self.engine_cpu_loras(1) - 1
        )  # the residency caps it at its capacity - 1 anyway
        values["max_host_bytes"] = self.tenant_max_host_bytes or max(
            1, self.host_lora_budget_bytes // 2
        )  # applies only with a host budget
        return TenantDefaults(**values)

    def engine_cpu_loras(self, smallest_adapter_bytes: int) -> int:
        """The engine's `max_cpu_loras`: the setting, else, with a host byte budget, the budget
        over `smallest_adapter_bytes` (`BaseModelSpec.smallest_full_adapter_bytes`: what the
        host tier counts each version as at least, so the count never binds before the bytes)
        between max_loras and MAX_DERIVED_CPU_LORAS, else DEFAULT_CPU_LORAS."""
        if self.max_cpu_loras is not None:
            return self.max_cpu_loras
        if not self.host_lora_budget_bytes:
            return max(DEFAULT_CPU_LORAS, self.max_loras)
        derived = self.host_lora_budget_bytes // max(1, smallest_adapter_bytes)
        return max(self.max_loras, min(MAX_DERIVED_CPU_LORAS, derived))

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        import tempfile

        return Path(tempfile.gettempdir()) / "lora-gateway-cache"

    @property
    def spool_path(self) -> Path:
        if self.spool_dir:
            return Path(self.spool_dir)
        import tempfile

        return Path(tempfile.gettempdir()) / "lora-gateway-spool"


# --- sources and errors -----------------------------------------------------------------------


class _Inputs(NamedTuple):
    config_file: Path | None
    environ: Mapping[str, str]


_inputs: ContextVar[_Inputs | None] = ContextVar("settings_inputs", default=None)


class _Environ(EnvSettingsSource):
    """`LORA_GATEWAY_*` variables of a given mapping (os.environ, or a test's dict)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            dict(self._environ), self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


class _YamlFile(PydanticBaseSettingsSource):
    """The `--config` YAML file: a mapping of setting names (`-` or `_`) to values."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InvalidArgument(f"config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"config file {path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InvalidArgument(f"config file {path}: expected a mapping of settings")
        self._values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(self._values) - set(settings_cls.model_fields))
        if unknown:
            raise InvalidArgument(f"config file {path}: unknown settings: {', '.join(unknown)}")

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def _explain(exc: ValidationError) -> str:
    """One clear message for every problem: unknown names, then each bad setting."""
    unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden")
    problems = []
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            name = ".".join(str(part) for part in error["loc"])
            shown = repr(error.get("input"))
            problems.append(f"{name}: {message} (got {shown[:60]})")
        else:
            problems.append(message)
    parts = []
    if unknown:
        parts.append(f"unknown settings: {', '.join(unknown)}")
    if problems:
        parts.append("invalid settings: " + "; ".join(problems))
    return "; ".join(parts)
