"""A LoRA resolver for stock `vllm serve`: adapters from the gateway's store, by name.

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 VLLM_PLUGINS=lora_gateway_resolver,lora_gateway_guard \\
    LORA_GATEWAY_STORE=s3://bucket/prefix vllm serve /models/base --enable-lora --max-lora-rank 16
    curl .../v1/completions -d '{"model": "acme/support-bot@prod", "prompt": "..."}'

`register` is the `vllm.general_plugins` entry point (see pyproject.toml). vLLM calls it in every
process it starts (API server, engine core, workers); it registers a resolver under
`RESOLVER_NAME` only when runtime LoRA updating is allowed and a store is configured, and it
touches neither the store nor the disk until the first adapter is asked for, which only happens
in the API server process. When a request names a model that vLLM does not know, vLLM calls
`resolve_lora(base_model_name, "<tenant>/<adapter>[@alias|@sha256:<hex>]")`:

    AdapterRef.parse → Registry.resolve (thread) → DiskCache.ensure (sha256-verified, single
    flight) → validate_adapter (thread) → LoRARequest(lora_name="<tenant>/<adapter>@sha256:<hex>",
    lora_path=<cache folder>)

the same store (opened by `stores.open_store`, as the gateway's server opens it), cache layout
(`<cache_dir>/<sha[:2]>/<sha>/`) and checks as the gateway's `Residency`. A missing, revoked,
malformed, invalid or incompatible adapter, and a store that cannot be reached, give None: vLLM
then answers 404. The reason class is logged, never the request's text.

Configuration comes from `Settings.load()` only (`LORA_GATEWAY_STORE`, `LORA_GATEWAY_S3_*`,
`LORA_GATEWAY_CACHE_DIR`, `LORA_GATEWAY_CACHE_BUDGET_BYTES`, `LORA_GATEWAY_MODEL` (default: the
model vLLM serves, which must then be a local folder), `LORA_GATEWAY_MAX_LORA_RANK` (keep it
equal to vLLM's `--max-lora-rank`), `LORA_GATEWAY_BASE_MODEL_ALIASES`, ...). S3 credentials come
from boto3's usual chain (`AWS_ACCESS_KEY_ID`, an instance role, ...).

Trust model (README, "Use the vLLM plugin"):

- `vllm serve` has no tenants. The `<tenant>/` in a model name selects the adapter's owner; it
  is not checked against the caller, so anyone who can reach the vLLM server can use any
  tenant's adapter. Put it behind something that authenticates, or use the gateway, which is
  the multi-tenant path (keys, roles, sharing, quotas, revocation).
- `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, which vLLM 0.32 requires before it asks a resolver,
  also attaches `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`
  (vllm/entrypoints/serve/lora/api_router.py), and through them SageMaker's `POST /adapters`
  and `DELETE /adapters/{name}`, for every client: load any folder the server can read, under
  any name (unvalidated: a bad adapter kills the engine core), or unload anyone's adapter.
  vLLM's `--api-key` does not help: one key for inference and these, and `/adapters` is not
  under its guarded prefixes. So the package ships a second plugin, the `vllm.endpoint_plugins`
  entry point `lora_gateway_guard` (`GuardPlugin`), whose ASGI middleware
  (`AdapterRoutesGuard`) answers those paths 403 before any route sees them, and `register`
  refuses to start `vllm serve` unless vLLM will load the guard: vLLM loads endpoint plugins
  only when `VLLM_PLUGINS` names them, so set
  `VLLM_PLUGINS=lora_gateway_resolver,lora_gateway_guard`. Where something in front of vLLM
  blocks those paths instead, `LORA_GATEWAY_VLLM_OPEN_ADAPTER_ROUTES=1` lets it start without.

Adapter ids: `StoreResolver.lora_id` gives each version, keyed by (tenant, name, sha256), one id
from `engine.base.next_lora_id`, the process-wide counter the gateway's own engine uses: stable
for the life of the process (the same version asked for as `@latest`, `@prod` or `@sha256:` gets
the same id), unique per version, never reused and never colliding (no hashing, unlike vLLM's
filesystem resolver's `abs(hash(name))`). vLLM 0.32's `OpenAIServingModels.resolve_lora`
overwrites `lora_int_id` with its own per-name counter before `add_lora`, so under `vllm serve`
the engine sees vLLM's id; the `lora_name` carries the sha256, so the engine and its prefix cache
still key the weights by content.

Limits of the `vllm serve` path, all from vLLM's side of the interface:
- vLLM remembers a resolved name for the life of the process and never asks again, so an alias
  move or a revocation is not seen for a name already used: restart (the guard refuses
  `POST /v1/unload_lora_adapter`, which any client could call). The gateway polls manifests.
- vLLM keys what it resolved by the requested name, so one version asked for under two names
  (`acme/bot` and `acme/bot@sha256:...`) takes two engine slots; clients should use one.
- vLLM may reload an adapter from `lora_path` whenever it evicts and needs it again, so a
  resolved version stays pinned in the disk cache for the life of the process; once pinned
  versions fill `cache_budget_bytes`, new adapters are refused (logged as `capacity`).
- Do not point a gateway and a `vllm serve` at the same cache folder at the same time: each
  process evicts by its own bookkeeping.

The plugin also carries two fixes to vLLM itself, needed by the gateway's own engine as much as
by `vllm serve`, because an entry point is the only code of ours that runs inside vLLM's
engine-core and worker processes: `allow_lora_on_prepacked_int8` (LoRA on a W8A8 int8 base on
CPU), `quiet_cpu_queue_waits` (the engine core and the worker sleep between looks at their
shared-memory queue instead of spinning; only where `LORA_GATEWAY_CPU_QUEUE_WAIT_US` is set, as
the gateway's engine sets it for the processes it starts) and `constant_time_lora_lookup` (the
worker's per-step "is this adapter loaded?" no longer copies every registered adapter).

This module is the second, deliberate exception to "engine/vllm_engine.py is the only module
that imports vllm": it is vLLM's plugin entry point. vLLM is imported only inside `register`,
`allow_lora_on_prepacked_int8`, `quiet_cpu_queue_waits`, `constant_time_lora_lookup`,
`fixes_in_place` and `vllm_resolver`; `StoreResolver`, which does the work, does not know vLLM.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from adapter_store import (
    AdapterNotFound,
    AdapterRef,
    AdapterVersion,
    CapacityExceeded,
    Incompatible,
    IntegrityError,
    InvalidAdapter,
    StoreError,
    StoreUnavailable,
)
from adapter_store.validate import validate_adapter
from lora_gateway.config import QUEUE_WAIT_ENV, QueueWaitUs, Settings
from lora_gateway.engine.base import next_lora_id
from lora_gateway.errors import InvalidArgument
from lora_gateway.stores import Store, open_store

if TYPE_CHECKING:
    from vllm.lora.resolver import LoRAResolver

__all__ = [
    "GUARD_PLUGIN",
    "RESOLVER_NAME",
    "RESOLVER_PLUGIN",
    "AdapterRoutesGuard",
    "GuardPlugin",
    "Resolved",
    "StoreResolver",
    "register",
    "vllm_resolver",
]

log = logging.getLogger(__name__)

#: The name the resolver is registered under in vLLM's `LoRAResolverRegistry`.
RESOLVER_NAME = "lora_gateway"
#: Entry point names (pyproject.toml), as `VLLM_PLUGINS` lists them.
RESOLVER_PLUGIN = "lora_gateway_resolver"
GUARD_PLUGIN = "lora_gateway_guard"
_GUARD_GROUP = "vllm.endpoint_plugins"
_GUARD_VALUE = "lora_gateway.vllm_plugin:GuardPlugin"

VersionKey = tuple[str, str, str]


@dataclass(frozen=True)
class Resolved:
    """An adapter version ready for the engine: verified, validated, on local disk."""

    lora_name: str
    lora_int_id: int
    path: Path
    version: AdapterVersion


def _reason(exc: StoreError) -> str:
    """The class of a refusal, for the log (by exception type, never by message text)."""
    if isinstance(exc, AdapterNotFound):
        return "not_found"
    if isinstance(exc, Incompatible):
        return "incompatible"
    if isinstance(exc, InvalidAdapter):
        return "invalid"
    if isinstance(exc, IntegrityError):
        return "integrity"
    if isinstance(exc, StoreUnavailable):
        return "store_unavailable"
    if isinstance(exc, CapacityExceeded):
        return "capacity"
    return "store_error"


class StoreResolver:
    """Resolves `<tenant>/<adapter>[@alias|@sha256:<hex>]` to a verified, validated folder.

    Knows nothing of vLLM. Opened lazily on first use (in the caller's event loop), once.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._opening = asyncio.Lock()
        self._ids: dict[VersionKey, int] = {}
        self._pinned: set[str] = set()

    def lora_id(self, key: VersionKey) -> int:
        """The version's id: assigned on first use, then the same for the life of the process."""
        if key not in self._ids:
            self._ids[key] = next_lora_id()
        return self._ids[key]

    async def _open(self, base_model_name: str) -> Store:
        async with self._opening:
            if self._store is None:
                self._store = await asyncio.to_thread(self._open_blocking, base_model_name)
            return self._store

    def _open_blocking(self, base_model_name: str) -> Store:
        settings = self.settings
        if settings.model and settings.model != base_model_name:
            log.warning(
                "adapters are validated against LORA_GATEWAY_MODEL, not the model vLLM serves"
            )
        store = open_store(settings, model=settings.model or base_model_name, uploads=False)
        log.info("lora_gateway resolver: store opened, disk cache at %s", settings.cache_path)
        return store

    async def resolve(self, base_model_name: str, lora_name: str) -> Resolved | None:
        """The adapter `lora_name` names, ready to load; None (reason logged) if it cannot be."""
        try:
            ref = AdapterRef.parse(lora_name)
        except InvalidAdapter:
            log.info("adapter refused (malformed_reference)")
            return None
        if ref.owner is None:
            log.info("adapter refused (no_tenant): names must be <tenant>/<adapter>[@alias]")
            return None
        try:
            store = await self._open(base_model_name)
        except StoreError as exc:
            log.error("lora_gateway resolver cannot open the store (%s): %s", _reason(exc), exc)
            return None
        try:
            return await self._resolve(store, ref.owner, ref)
        except StoreError as exc:
            level = logging.INFO if isinstance(exc, AdapterNotFound) else logging.WARNING
            log.log(level, "adapter %s refused (%s)", ref, _reason(exc))
            return None
        except OSError as exc:  # the cache folder: permissions, a read-only disk, ...
            log.error("adapter %s refused (cache_io): %s", ref, exc)
            return None

    async def _resolve(self, store: Store, tenant: str, ref: AdapterRef) -> Resolved:
        version = await asyncio.to_thread(store.registry.resolve, tenant, ref)
        path = await store.cache.ensure(version)
        store.cache.pin(version.sha)
        try:
            files = {entry.filename: path / entry.filename for entry in version.files}
            await asyncio.to_thread(validate_adapter, files, store.spec, store.limits)
        except BaseException:
            store.cache.unpin(version.sha)
            raise
        # vLLM keeps the name resolved for good and may reload from the path: keep it pinned.
        if version.sha in self._pinned:
            store.cache.unpin(version.sha)
        else:
            self._pinned.add(version.sha)
        key = (version.tenant, version.name, version.sha)
        resolved = Resolved(
            lora_name=f"{version.tenant}/{version.name}@sha256:{version.sha}",
            lora_int_id=self.lora_id(key),
            path=path,
            version=version,
        )
        log.info("adapter %s resolved to %s", ref, resolved.lora_name)
        return resolved


def vllm_resolver(resolver: StoreResolver) -> LoRAResolver:
    """Wrap `resolver` in vLLM's `LoRAResolver` interface (the only vLLM-facing glue)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class StoreLoRAResolver(LoRAResolver):
        """vLLM's view of `StoreResolver`."""

        def __init__(self, core: StoreResolver) -> None:
            self.core = core

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            found = await self.core.resolve(base_model_name, lora_name)
            if found is None:
                return None
            return LoRARequest(
                lora_name=found.lora_name,
                lora_int_id=found.lora_int_id,
                lora_path=str(found.path),
            )

    return StoreLoRAResolver(resolver)


class _ToVLLM(logging.Handler):
    """Hands records to vLLM's logger, whose handlers and format `vllm serve` configured."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("vllm")
        if target.isEnabledFor(record.levelno):  # its level as configured now, not at import
            target.handle(record)


def _log_through_vllm() -> None:
    """vLLM configures only the `vllm` logger: send ours and the store's through it (unless
    something already configured them), else INFO lines such as refusals would be lost."""
    for name in ("lora_gateway", "adapter_store"):
        ours = logging.getLogger(name)
        if ours.handlers:
            continue
        ours.addHandler(_ToVLLM())
        ours.setLevel(logging.DEBUG)  # the handler applies vLLM's level
        ours.propagate = False


# --- the guard of vLLM's runtime adapter routes ------------------------------------------------

#: Paths that load or unload adapters by request: vLLM's own and the SageMaker ones it adds.
_BLOCKED_EXACT = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters"})
_BLOCKED_UNDER = ("/adapters/",)
_REFUSED = json.dumps(
    {
        "error": {
            "message": (
                "loading and unloading adapters through the API is disabled by lora_gateway: "
                "adapters come from the store, by name (<tenant>/<adapter>[@alias])"
            ),
            "type": "PermissionDenied",
            "param": None,
            "code": 403,
        }
    }
).encode()

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def blocked_path(path: str, root_path: str = "") -> bool:
    """Whether a request path reaches one of the adapter routes (however it is spelled:
    repeated or trailing slashes, dot segments, letter case)."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    parts = [p for p in re.split(r"/+", path.lower()) if p not in ("", ".")]
    normal: list[str] = []
    for part in parts:
        if part == "..":
            if normal:
                normal.pop()
        else:
            normal.append(part)
    clean = "/" + "/".join(normal)
    return clean in _BLOCKED_EXACT or clean.startswith(_BLOCKED_UNDER)


class AdapterRoutesGuard:
    """ASGI middleware: answers the adapter load/unload routes with 403, passes the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind in ("http", "websocket") and blocked_path(
            str(scope.get("path", "")), str(scope.get("root_path", ""))
        ):
            log.warning(
                "refused %s %s: runtime adapter routes are disabled",
                kind,
                ascii(str(scope.get("path", ""))[:120]),  # escaped: a path is client text
            )
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_REFUSED)).encode()),
            ]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": _REFUSED})
            return
        await self.app(scope, receive, send)


class GuardPlugin:
    """The `vllm.endpoint_plugins` entry point `lora_gateway_guard`: puts `AdapterRoutesGuard`
    in front of every route of the API server (vLLM calls `attach_router` while it builds the
    app; the middleware also covers routes added after it, such as SageMaker's)."""

    name = GUARD_PLUGIN
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        app.add_middleware(AdapterRoutesGuard)
        log.info("lora_gateway guard: runtime adapter load/unload routes answer 403")

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        return None


def guard_problem(allowed: list[str] | None) -> str | None:
    """Why vLLM would not load the guard (None when it will)."""
    installed = any(
        ep.name == GUARD_PLUGIN and ep.value == _GUARD_VALUE
        for ep in entry_points(group=_GUARD_GROUP)
    )
    if not installed:
        return (
            f"the {GUARD_PLUGIN} endpoint plugin is not installed (its {_GUARD_GROUP} entry "
            "point is missing: reinstall lora-gateway)"
        )
    if allowed is None or GUARD_PLUGIN not in allowed:
        return (
            f"VLLM_PLUGINS does not name {GUARD_PLUGIN}, and vLLM loads only the endpoint "
            "plugins it names"
        )
    return None


def register() -> None:
    """The `vllm.general_plugins` entry point: register the resolver if it can be used.

    Invalid LORA_GATEWAY_* settings raise `InvalidArgument`, which stops `vllm serve` at start-up
    with the list of problems; a missing store or runtime updating turned off is not an error.
    Runtime updating on without the guard of its routes (`guard_problem`) is one: `vllm serve`
    stops with the reason, unless `vllm_open_adapter_routes` says a proxy blocks them.
    """
    import vllm.envs as envs
    from vllm.lora.resolver import LoRAResolverRegistry

    allow_lora_on_prepacked_int8()
    quiet_cpu_queue_waits(os.environ.get(QUEUE_WAIT_ENV))
    constant_time_lora_lookup()
    if not envs.VLLM_ALLOW_RUNTIME_LORA_UPDATING:
        log.debug("lora_gateway resolver not registered: VLLM_ALLOW_RUNTIME_LORA_UPDATING is off")
        return
    settings = Settings.load()
    if not settings.store:
        log.info("lora_gateway resolver not registered: LORA_GATEWAY_STORE is not set")
        return
    problem = guard_problem(envs.VLLM_PLUGINS)
    if problem is not None and not settings.vllm_open_adapter_routes:
        raise InvalidArgument(
            "lora_gateway refuses to start: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 also opens POST "
            "/v1/load_lora_adapter, /v1/unload_lora_adapter and /adapters to every client "
            f"(load any folder under any name, unload anyone's adapter), and {problem}. Set "
            f"VLLM_PLUGINS={RESOLVER_PLUGIN},{GUARD_PLUGIN} (the guard answers those routes "
            "403), or LORA_GATEWAY_VLLM_OPEN_ADAPTER_ROUTES=1 if a proxy in front blocks them"
        )
    if problem is not None:
        log.warning(
            "lora_gateway: runtime adapter routes are open (vllm_open_adapter_routes): %s", problem
        )
    _log_through_vllm()
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, vllm_resolver(StoreResolver(settings)))
    log.info("lora_gateway resolver registered (store %s)", settings.store)


#: The attribute that marks a function of vLLM's as replaced by one of these fixes.
_FIX_MARK = "_lora_gateway_fix"


def quiet_cpu_queue_waits(value: str | None) -> float | None:
    """Make vLLM's shared-memory queue waits sleep `value` microseconds instead of spinning;
    the sleep in seconds if the fix is (now) in place, None where it does not apply.

    vLLM 0.32's `MessageQueue` (distributed/device_communicators/shm_broadcast.py), between the
    engine core and its worker, has a reader look at its ring buffer in a loop calling
    `sched_yield()` for 1 s after each message it read (`SpinCondition`, `busy_loop_s = 1`) and
    a writer do the same while the buffer is full. Under load both processes wait that way on
    each other at every step, and on a few CPU cores the two spinners take the cores the worker's
    forward pass, the engine core's scheduler and the server need: measured on 2 cores, the
    engine core burned 75 % of a core waiting and the mixed workload ran at half speed, in
    phases (docs/benchmarks.md, "The CPU slow phase"). A `sched_yield` gives the core away only
    to a thread queued on the same core; a short sleep gives it to anyone. The fix replaces the
    module's `sched_yield` with `time.sleep(value µs)`: a look costs at most that much latency.

    Applied only on the CPU platform, only where `value` (`LORA_GATEWAY_CPU_QUEUE_WAIT_US`, set
    by the gateway's engine for the processes it starts) is set and not 0, and only where vLLM
    still has that function. A value outside `cpu_queue_wait_us`'s range raises InvalidArgument.
    """
    if value is None:
        return None
    try:
        micros = TypeAdapter(QueueWaitUs).validate_python(value)
    except ValidationError as exc:
        raise InvalidArgument(
            f"{QUEUE_WAIT_ENV}={value!r} is not a whole number of microseconds in 0..10000"
        ) from exc
    from vllm.platforms import current_platform

    if micros == 0 or not current_platform.is_cpu():
        return None
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return None
    if not callable(getattr(shm_broadcast, "sched_yield", None)):
        return None
    seconds = micros / 1e6

    def wait() -> None:
        time.sleep(seconds)

    setattr(wait, _FIX_MARK, True)
    setattr(shm_broadcast, "sched_yield", wait)  # noqa: B010 (vLLM's module global)
    log.debug("vLLM patched: shared-memory queue waits sleep %d µs", micros)
    return seconds


class _RegisteredIds:
    """What `LRUCacheWorkerLoRAManager.add_adapter` asks `list_adapters()` for: membership."""

    def __init__(self, registered: Any) -> None:
        self._registered = registered

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._registered  # cachetools: O(1), the LRU order untouched


def constant_time_lora_lookup() -> bool:
    """Make the worker's "is this adapter loaded?" O(1); True if the fix is (now) in place.

    vLLM 0.32's `LRUCacheWorkerLoRAManager.add_adapter` (vllm/lora/worker_manager.py), called at
    every step for every adapter in the batch, tests `lora_int_id not in self.list_adapters()`,
    and `list_adapters` builds a set of every registered adapter through a copy of the LRU
    cache (`LoRAModelManager.list_adapters` → `dict(self._registered_adapters.cache)`, a
    `_MappingOrderCacheView` copied item by item). With 6,000 adapters in the host tier that was
    about 70 % of the worker's time (py-spy) and the engine served 38 req/s where it served 95
    with 1,000 (docs/benchmarks.md, "Many adapters"). The fix gives `add_adapter`, for its own
    call only, a `list_adapters` that answers membership from the cache directly; everything
    else of vLLM's `add_adapter` runs unchanged, and `list_adapters` keeps returning a set to
    every other caller. The worker calls it from its single engine loop (vLLM's comment there).

    Applied in every process vLLM loads the plugin in, stock `vllm serve` included (it changes
    no result, only the cost), and only where vLLM still has that method.
    """
    try:
        from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    except ImportError:
        return False

    def fixed(original: Callable[..., Any]) -> Callable[..., Any]:
        def add_adapter(self: Any, lora_request: Any) -> Any:
            manager = getattr(self, "_adapter_manager", None)
            registered = getattr(manager, "_registered_adapters", None)
            if registered is None or "list_adapters" in vars(self):
                return original(self, lora_request)
            self.list_adapters = lambda: _RegisteredIds(registered)
            try:
                return original(self, lora_request)
            finally:
                del self.list_adapters

        return add_adapter

    return _patch_once(LRUCacheWorkerLoRAManager, "add_adapter", fixed, "loaded-adapter lookup")


#: `worker_extension_cls` of the gateway's engine: what it asks each worker at start.
WORKER_CHECKS = "lora_gateway.vllm_plugin.WorkerChecks"


class WorkerChecks:
    """Mixed into vLLM's worker class (vLLM's `worker_extension_cls`, set by the gateway's
    engine), so that the engine can ask each worker, with `collective_rpc`, which of this
    plugin's fixes are in place in the worker's own process (they are applied by `register`,
    which vLLM calls in every process that loads its plugins)."""

    def lora_gateway_fixes(self) -> dict[str, bool]:
        return fixes_in_place()


def fixes_in_place() -> dict[str, bool]:
    """Which of the plugin's fixes are in place in this process."""

    def fixed(module: str, name: str) -> bool:
        try:
            target: Any = importlib.import_module(module)
        except ImportError:
            return False
        for part in name.split("."):
            target = getattr(target, part, None)
        return bool(getattr(target, _FIX_MARK, False))

    return {
        "constant_time_lora_lookup": fixed(
            "vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter"
        ),
        "quiet_cpu_queue_waits": fixed(
            "vllm.distributed.device_communicators.shm_broadcast", "sched_yield"
        ),
        "lora_on_prepacked_int8": fixed("vllm.lora.layers.base_linear", "_get_lora_device"),
    }


def _patch_once(
    owner: Any, name: str, fix: Callable[[Callable[..., Any]], Callable[..., Any]], what: str
) -> bool:
    """Replace vLLM's `owner.name` with `fix(original)`, once per process; False where vLLM no
    longer has it (a later vLLM may fix or rename it), True where the fix is (now) in place."""
    original = getattr(owner, name, None)
    if original is None:
        return False
    if getattr(original, _FIX_MARK, False):
        return True
    replacement = fix(original)
    setattr(replacement, _FIX_MARK, True)
    setattr(owner, name, replacement)
    log.debug("vLLM patched: %s", what)
    return True


def allow_lora_on_prepacked_int8() -> bool:
    """Let vLLM wrap a W8A8 int8 layer with LoRA on CPU; True if the fix is (now) in place.

    vLLM 0.32's CPU int8 kernel (`CPUInt8ScaledMMLinearKernel`, its oneDNN path: every x86 CPU
    without AMX) hands the int8 weight to a oneDNN handle and sets `layer.weight = None`. With
    LoRA enabled, `BaseLinearLayerWithLoRA.__init__` then asks `_get_lora_device(layer)`, which
    reads `layer.weight.device` whenever a `weight` attribute exists, and the worker dies at
    start-up (`AttributeError: 'NoneType' object has no attribute 'device'`): no W8A8 base could
    serve adapters on such a CPU. The fix places the LoRA tensors of such a layer on the CPU,
    where the layer computes; any other layer gets vLLM's own answer. Applied only on the CPU
    platform and only where vLLM still has that function (a later vLLM may fix or rename it);
    it runs in every vLLM process, because vLLM loads this plugin in each.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    try:
        import torch
        from vllm.lora.layers import base_linear
    except ImportError:
        return False

    def fixed(original: Callable[..., Any]) -> Callable[..., Any]:
        def lora_device(base_layer: Any) -> Any:
            if getattr(base_layer, "weight", 0) is None:
                return torch.device("cpu")
            return original(base_layer)

        return lora_device

    return _patch_once(
        base_linear, "_get_lora_device", fixed, "LoRA on prepacked int8 (W8A8) layers on CPU"
    )
