"""The disk cache full, through the gateway: evict, else RESOURCE_EXHAUSTED with nothing partial,
and the adapters already loaded keep serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapter_store import LocalBackend, Registry
from adapter_store.model import BaseModelSpec
from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, GenerateOptions
from lora_gateway.engine.vllm_engine import VLLMEngine
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key
from tests.conftest import AdapterFactory, engine_settings

pytestmark = pytest.mark.engine

KEY = "secret-budget-admin"


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def test_full_cache_refuses_cleanly_and_warm_adapters_keep_serving(
    engine: VLLMEngine, tiny_model: Path, make_test_adapter: AdapterFactory, tmp_path: Path
) -> None:
    tenants = {
        "tenants": {
            "acme": {"keys": [{"id": "a", "sha256": hash_key(KEY), "role": "tenant-admin"}]}
        }
    }
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    spec = BaseModelSpec.from_hf_config(
        tiny_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,)
    )
    registry = Registry(LocalBackend(tmp_path / "store"), spec)
    first = registry.upload_dir("acme", "first", make_test_adapter(seed=71, rank=8), created_by="t")
    second = registry.upload_dir(
        "acme", "second", make_test_adapter(seed=72, rank=8), created_by="t"
    )
    budget = first.total_bytes + second.total_bytes // 2  # room for one adapter, not two
    cache = tmp_path / "cache"
    settings = engine_settings(
        tiny_model,
        store=f"file://{tmp_path / 'store'}",
        cache_dir=str(cache),
        cache_budget_bytes=budget,
        tenants_file=str(tmp_path / "tenants.yaml"),
        listen="127.0.0.1:0",
        base_model_aliases=(devtools.TINY_MODEL_NAME,),
        self_test=False,
    )
    server = await GatewayServer.start(settings, engine=engine)
    try:
        async with AsyncGatewayClient(f"127.0.0.1:{server.port}", KEY) as client:
            await client.pin_adapter("first")  # pinned: on disk and in the engine, never evicted
            warm = await client.generate("first", "one two three", GenerateOptions(max_tokens=4))
            with pytest.raises(errors.ResourceExhausted):
                await client.generate("second", "one two three", GenerateOptions(max_tokens=4))
            # Nothing partial: the cache holds exactly the first version's files, no temp file.
            assert sorted(p.name for p in files_under(cache) if ".tmp" not in p.parts) == sorted(
                f.filename for f in first.files
            )
            assert [p for p in files_under(cache) if ".tmp" in p.parts] == []
            again = await client.generate("first", "one two three", GenerateOptions(max_tokens=4))
            assert again.token_ids == warm.token_ids
            # Unpinned, the first version can leave the disk (it stays in the engine's memory).
            await client.unpin_adapter("first")
            served = await client.generate("second", "one two three", GenerateOptions(max_tokens=4))
            assert served.adapter is not None
            assert served.adapter.version == second.version_id
            assert (
                await client.generate("first", "one two three", GenerateOptions(max_tokens=4))
            ).token_ids == warm.token_ids
    finally:
        await server.stop(grace=1.0)
