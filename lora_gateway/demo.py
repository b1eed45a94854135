"""`lora-gateway demo`: the whole story on a tiny generated model and a local store, offline.

1. generate a tiny Llama and three PEFT adapters;
2. start the gateway on 127.0.0.1 (local folder store, two tenants, an operator);
3. upload the adapters through the Admin API, generate with each and with the base model;
4. ask an adapter for JSON that follows a schema, from a chat conversation, through gRPC (the SDK)
   and through the OpenAI-compatible HTTP API (any OpenAI client works; the demo uses the
   standard library's HTTP client so that it needs nothing more);
5. show a cross-tenant request refused, roll an alias back, revoke an adapter and show the next
   request refused; print a summary and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, ChatMessage, GenerateOptions, ResidencyTier
from lora_gateway.config import Settings
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key

PROMPT = "the tenant sends a request to the gateway"
TOKENS = 12
GREEDY = GenerateOptions(max_tokens=TOKENS)  # temperature unset: the server's default, 0
#: Structured output: what an extraction adapter would be asked for.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"urgent": {"type": "boolean"}, "team": {"enum": ["billing", "tech", "sales"]}},
    "required": ["urgent", "team"],
    "additionalProperties": False,
}
CHAT = [
    ChatMessage("system", "Route the ticket: answer in JSON."),
    ChatMessage("user", "my invoice is wrong and I am charged twice"),
]


def _post_json(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """One OpenAI-style HTTP call with the standard library (run in a thread)."""
    request = urllib.request.Request(  # noqa: S310 (an http URL to 127.0.0.1, built here)
        url,
        data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (127.0.0.1)
        answer: dict[str, Any] = json.load(response)
    return answer


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(number: int, text: str) -> None:
    _say(f"\n[{number}] {text}")


def _write_tenants(path: Path, roles: dict[str, tuple[str, str]], keys: dict[str, str]) -> None:
    """The tenants file stores only sha256 hashes of the keys."""
    tenants: dict[str, dict[str, list[dict[str, str]]]] = {}
    for key_id, (tenant, role) in roles.items():
        tenants.setdefault(tenant, {"keys": []})["keys"].append(
            {"id": key_id, "sha256": hash_key(keys[key_id]), "role": role}
        )
    path.write_text(yaml.safe_dump({"tenants": tenants}, sort_keys=True))


async def _run(work: Path) -> None:
    started = time.perf_counter()
    _step(1, f"generating a tiny Llama and three LoRA adapters in {work}")
    model = await asyncio.to_thread(devtools.make_model, work / "model")
    specs = {
        "support": devtools.AdapterSpec(seed=1, rank=8),
        "legal": devtools.AdapterSpec(seed=2, rank=16, target_modules=devtools.ALL_MODULES),
        "legal-v2": devtools.AdapterSpec(seed=3, rank=8, use_rslora=True),
    }
    folders = {
        name: await asyncio.to_thread(devtools.make_adapter, model, work / "adapters" / name, spec)
        for name, spec in specs.items()
    }

    roles = {
        "acme-admin": ("acme", "tenant-admin"),
        "acme-app": ("acme", "user"),
        "globex-app": ("globex", "user"),
    }
    keys = {key_id: secrets.token_urlsafe(24) for key_id in roles}
    _write_tenants(work / "tenants.yaml", roles, keys)
    settings = Settings.from_mapping(
        {
            "model": str(model),
            "base_model_aliases": [devtools.TINY_MODEL_NAME],
            "store": f"file://{work / 'store'}",
            "cache_dir": str(work / "cache"),
            "tenants_file": str(work / "tenants.yaml"),
            "listen": "127.0.0.1:0",
            "openai_listen": "127.0.0.1:0",
            "dtype": "float32",
            "max_loras": 2,
            "max_cpu_loras": 3,
            "max_lora_rank": 16,
            "max_model_len": 256,
            "max_num_seqs": 8,
            "enforce_eager": True,
            "kv_cache_space_gib": 1,
            "drain_grace_s": 2.0,
        }
    )
    _step(2, "starting the gateway (vLLM engine in-process, isolation self-test) ...")
    server = await GatewayServer.start(settings)
    target = f"127.0.0.1:{server.port}"
    _say(
        f"    serving on {target} after {time.perf_counter() - started:.0f}s; tenants: acme, globex"
    )
    _say(f"    OpenAI-compatible API on http://127.0.0.1:{server.openai_port}/v1")

    def client(key_id: str) -> AsyncGatewayClient:
        return AsyncGatewayClient(target, keys[key_id])

    try:
        async with (
            client("acme-admin") as admin,
            client("acme-app") as app,
            client("globex-app") as globex,
        ):
            _step(3, "acme's admin uploads three adapters through the Admin API")
            versions = {}
            for name in ("support", "legal"):
                info = await admin.upload_adapter(name, folders[name], aliases=("prod",))
                versions[name] = info.version
                _say(f"    {name:<8} rank {info.rank:<3} {info.version[:19]}...  latest, prod")
            v2 = await admin.upload_adapter("legal", folders["legal-v2"], aliases=("prod",))
            _say(f"    legal    rank {v2.rank:<3} {v2.version[:19]}...  (v2: moves latest, prod)")

            _step(4, f"acme's app generates {TOKENS} tokens (greedy) after: {PROMPT!r}")
            _say("    (a random tiny model: the token ids are what to compare, not the text)")
            for adapter in ("", "support", "legal@prod"):
                result = await app.generate(adapter, PROMPT, GREEDY)
                served = result.adapter.version[:19] + "..." if result.adapter else "base model"
                _say(f"    {adapter or '(base)':<11} -> {result.token_ids}  [{served}]")

            _step(5, "structured output: a chat conversation, JSON following a schema")
            constrained = GenerateOptions(
                max_tokens=64, json_schema=json.dumps(SCHEMA), disable_any_whitespace=True
            )
            result = await app.generate("support", CHAT, constrained)
            _say(f"    gRPC   support -> {json.loads(result.text)}")
            body = {
                "model": "support",
                "messages": [{"role": m.role, "content": m.content} for m in CHAT],
                "max_tokens": 64,
                "temperature": 0,  # OpenAI's default is 1; the SDK call above is greedy
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "ticket", "schema": SCHEMA},
                },
                "structured_outputs": {"disable_any_whitespace": True},
            }
            url = f"http://127.0.0.1:{server.openai_port}/v1/chat/completions"
            answer = await asyncio.to_thread(_post_json, url, keys["acme-app"], body)
            content = answer["choices"][0]["message"]["content"]
            _say(f"    OpenAI support -> {json.loads(content)}")
            _say("    (random adapters: the values are arbitrary, the shape is the schema's)")

            _step(6, "globex asks for acme's adapter: refused exactly like a missing one")
            for ref in ("acme/support", "acme/no-such-adapter"):
                try:
                    await globex.generate(ref, PROMPT, GREEDY)
                    raise RuntimeError("cross-tenant request was served")
                except errors.NotFound as exc:
                    _say(f"    {ref:<22} -> NOT_FOUND: {exc}")

            _step(7, "roll legal@prod back to the first version")
            await admin.set_alias("legal", "prod", versions["legal"])
            result = await app.generate("legal@prod", PROMPT, GREEDY)
            assert result.adapter is not None
            _say(f"    legal@prod  -> {result.token_ids}  [{result.adapter.version[:19]}...]")
            if result.adapter.version != versions["legal"]:
                raise RuntimeError("rollback did not take effect")

            _step(8, "revoke 'support'; the next request is refused")
            revoked = await admin.revoke_adapter("support")
            _say(f"    revoked {len(revoked.revoked_versions)} version(s)")
            try:
                await app.generate("support", PROMPT, GREEDY)
                raise RuntimeError("revoked adapter was served")
            except errors.NotFound as exc:
                _say(f"    support -> NOT_FOUND: {exc}")

            residency = await admin.get_residency()
            in_engine = sum(1 for e in residency.entries if e.tier is ResidencyTier.ENGINE)
    finally:
        await server.stop(grace=2.0)

    _say("\nsummary")
    _say("    3 adapters uploaded (validated, content-addressed), 3 generations served")
    _say("    JSON-schema output from a conversation, through gRPC and the OpenAI-compatible API")
    _say("    cross-tenant access refused; alias rolled back; revoked adapter refused")
    _say(f"    {in_engine} adapter version(s) were resident in the engine at the end")
    _say(f"    demo finished in {time.perf_counter() - started:.0f}s")


def main(workdir: Path | None = None) -> int:
    """Run the demo in `workdir` (default: a temporary folder, removed afterwards)."""
    logging.basicConfig(level=logging.WARNING)
    # Keep the engine's own start-up chatter out of the story (set before vllm is imported).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="lora-gateway-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_run(work))
    except (errors.GatewayError, RuntimeError) as exc:
        print(f"demo failed: {exc}", flush=True)
        return 1
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return 0
