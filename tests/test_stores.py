"""`open_store` (lora_gateway.stores): the one way the server and the vLLM plugin open the store."""

from __future__ import annotations

import ast
import fcntl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lora_gateway
from adapter_store import AdapterRef, InvalidAdapter, LocalBackend
from adapter_store.model import sha256_file
from adapter_store.s3 import S3Backend
from lora_gateway import devtools, errors
from lora_gateway.config import Settings
from lora_gateway.stores import open_backend, open_store
from tests.conftest import AdapterFactory


def settings_for(tmp_path: Path, tiny_model: Path, **values: Any) -> Settings:
    return Settings.from_mapping(
        {
            "store": f"file://{tmp_path / 'store'}",
            "cache_dir": str(tmp_path / "cache"),
            "spool_dir": str(tmp_path / "spool"),
            "model": str(tiny_model),
            "base_model_aliases": devtools.TINY_MODEL_NAME,
            **values,
        }
    )


async def test_open_store_builds_everything_from_the_settings(
    tmp_path: Path, tiny_model: Path, make_test_adapter: AdapterFactory
) -> None:
    settings = settings_for(
        tmp_path,
        tiny_model,
        max_lora_rank=16,
        max_upload_bytes=1 << 20,
        spool_budget_bytes=2 << 20,
        cache_budget_bytes=3 << 20,
        compose_max_parts=3,
        compose_max_bytes=4 << 20,
    )
    store = open_store(settings)
    assert isinstance(store.registry.backend, LocalBackend)
    assert store.registry.backend.root == tmp_path / "store"
    assert store.spec.max_rank == 16
    assert devtools.TINY_MODEL_NAME in store.spec.aliases
    assert (store.limits.max_file_bytes, store.limits.max_compose_parts) == (1 << 20, 3)
    assert store.limits.max_compose_bytes == 4 << 20
    assert store.spool.budget_bytes == 2 << 20
    assert store.cache.root == tmp_path / "cache"
    assert store.cache.budget_bytes == 3 << 20
    # The pieces work together: an upload through the spool, read back through the cache.
    version = store.registry.upload_dir("acme", "bot", make_test_adapter(seed=3), created_by="t")
    assert store.registry.resolve("acme", AdapterRef.parse("bot")) == version
    path = await store.cache.ensure(version)
    assert path == tmp_path / "cache" / version.sha[:2] / version.sha
    assert {e.filename: sha256_file(path / e.filename) for e in version.files} == {
        e.filename: e.sha256 for e in version.files
    }


def test_the_spool_session_is_opened_for_uploads_only(tmp_path: Path, tiny_model: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    # A session folder left by a process that is gone (its lock file is not held).
    (spool / "session-gone").mkdir()
    (spool / "session-gone" / "upload-1").write_bytes(b"x")
    (spool / "session-gone.lock").write_bytes(b"")
    reader = open_store(settings_for(tmp_path, tiny_model), uploads=False)
    assert sorted(p.name for p in spool.iterdir()) == ["session-gone", "session-gone.lock"]
    store = open_store(settings_for(tmp_path, tiny_model))
    sessions = sorted(p.name for p in spool.iterdir())
    assert "session-gone" not in sessions
    assert len(sessions) == 2  # this process's session and its lock
    lock = next(p for p in spool.iterdir() if p.suffix == ".lock")
    with lock.open("rb") as handle, pytest.raises(BlockingIOError):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by this process
    store.spool.close()
    reader.spool.close()


def test_model_replaces_the_settings_model(tmp_path: Path, tiny_model: Path) -> None:
    elsewhere = settings_for(tmp_path, tiny_model, model=str(tmp_path / "absent"))
    with pytest.raises(InvalidAdapter, match=r"config\.json"):
        open_store(elsewhere, uploads=False)
    store = open_store(elsewhere, model=str(tiny_model), uploads=False)
    assert store.spec.num_layers > 0


def test_backends() -> None:
    s3 = open_backend(
        Settings.from_mapping(
            {
                "store": "s3://adapters/deploy/prod/",
                "s3_endpoint": "http://127.0.0.1:1",
                "s3_region": "eu-west-1",
            }
        )
    )
    assert isinstance(s3, S3Backend)
    assert (s3.bucket, s3.prefix) == ("adapters", "deploy/prod")
    with pytest.raises(errors.InvalidArgument, match="no adapter store configured"):
        open_backend(Settings.from_mapping({}))


def _imports(module: str) -> set[str]:
    path = Path(lora_gateway.__file__).parent / f"{module}.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_server_and_plugin_open_the_store_the_same_way() -> None:
    plugin, server = _imports("vllm_plugin"), _imports("server")
    assert "lora_gateway.stores.open_store" in plugin
    assert "lora_gateway.stores.open_store" in server
    assert not any(name.startswith("lora_gateway.server") for name in plugin)
    assert not any(name.startswith("lora_gateway.server") for name in _imports("stores"))
    for module in (plugin, server):  # neither builds a store of its own
        assert not module & {"adapter_store.Registry", "adapter_store.DiskCache"}


_PLUGIN_RESOLVES = """
import asyncio, sys
from lora_gateway.config import Settings
from lora_gateway.vllm_plugin import StoreResolver

settings = Settings.from_mapping(
    {"store": sys.argv[1], "cache_dir": sys.argv[2], "model": sys.argv[3],
     "base_model_aliases": sys.argv[4]}
)
resolved = asyncio.run(StoreResolver(settings).resolve(sys.argv[3], "acme/bot"))
assert resolved is not None, "not resolved"
print(resolved.version.sha)
print(sorted(m for m in sys.modules if m.startswith("lora_gateway.")))
"""


def test_the_plugin_resolves_without_loading_the_server(
    tmp_path: Path, tiny_model: Path, make_test_adapter: AdapterFactory
) -> None:
    """In a fresh process, the plugin's resolver opens the store (open_store) and serves an
    adapter without importing lora_gateway.server (before: `_open_blocking` imported it for
    `open_backend`, and with it grpc, the servicers and the residency)."""
    settings = settings_for(tmp_path, tiny_model)
    version = open_store(settings, uploads=False).registry.upload_dir(
        "acme", "bot", make_test_adapter(seed=5), created_by="t"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _PLUGIN_RESOLVES,
            settings.store,
            str(tmp_path / "plugin-cache"),
            str(tiny_model),
            devtools.TINY_MODEL_NAME,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sha, modules = done.stdout.splitlines()[-2:]
    assert sha == version.sha
    loaded = ast.literal_eval(modules)
    assert "lora_gateway.stores" in loaded
    assert "lora_gateway.vllm_plugin" in loaded
    assert not [m for m in loaded if m.startswith(("lora_gateway.server", "lora_gateway.services"))]
