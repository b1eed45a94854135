"""Why one NaN adapter poisons other requests on vLLM's CPU build (docs/reliability.md).

Two experiments, run on the CPU (no gateway involved):

    PYTHONPATH=. .venv/bin/python scripts/poison_root_cause.py kernel   # ~10 s
    PYTHONPATH=. .venv/bin/python scripts/poison_root_cause.py engine   # ~40 s, own engine

kernel: vLLM's CPU attention op (`cpu_attention_with_kv_cache`) on a KV cache written with the
engine's own `cpu_attn_reshape_and_cache`: positions [0, seq_len) random, the rest of the
request's last 128-slot block set to a tail value. Does the output depend on the tail?

engine: a tiny model's engine; a LoRA with lora_alpha 1e300 (NaN/Inf effective weights) runs
one request, then base-model requests of various lengths. If the poison lives in the freed KV
block (reused LIFO), a request shorter than the poisoned one is wrong however often it is
repeated, a longer one is right (it overwrites every poisoned slot) and heals the block.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BLOCK, HEADS, KV_HEADS, HEAD = 128, 2, 1, 64


def kernel() -> None:
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    dtype = torch.float32
    isa = _get_attn_isa(dtype, BLOCK, HEAD)

    def run(seq_len: int, tail: float, query_len: int) -> torch.Tensor:
        blocks = (seq_len + BLOCK - 1) // BLOCK
        kv = torch.zeros(4, KV_HEADS, BLOCK * 2, HEAD, dtype=dtype)
        key_cache, value_cache = kv.chunk(2, dim=2)
        table = torch.tensor([[2, 3][:blocks]], dtype=torch.int32)
        total = blocks * BLOCK
        slots = torch.tensor([int(table[0, p // BLOCK]) * BLOCK + p % BLOCK for p in range(total)])
        gen = torch.Generator().manual_seed(1)
        k = torch.randn(total, KV_HEADS, HEAD, generator=gen, dtype=dtype)
        v = torch.randn(total, KV_HEADS, HEAD, generator=gen, dtype=dtype)
        k[seq_len:] = tail
        v[seq_len:] = tail
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        q = torch.randn(query_len, HEADS, HEAD, generator=torch.Generator().manual_seed(2))
        out = torch.empty_like(q)
        starts = torch.tensor([0, query_len], dtype=torch.int32)
        lengths = torch.tensor([seq_len], dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1,
            num_heads=HEADS,
            num_kv_heads=KV_HEADS,
            head_dim=HEAD,
            seq_lens=lengths,
            dtype=dtype,
            query_start_loc=starts,
            causal=True,
            sliding_window_size=-1,
            isa=isa,
            enable_kv_split=False,
        )
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=starts,
            seq_lens=lengths,
            scale=HEAD**-0.5,
            causal=True,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=table,
            softcap=0.0,
            scheduler_metadata=meta,
            s_aux=None,
        )
        return out

    print(f"isa {isa}, torch {torch.__version__}")
    print("seq_len query_len tail  | rows NaN | max |out - out(zero tail)|")
    for seq_len, query_len in ((1, 1), (20, 1), (20, 20), (127, 1), (128, 1), (129, 1), (200, 1)):
        reference = run(seq_len, 0.0, query_len)
        for tail in (5.0, 1e30, float("inf"), float("nan")):
            out = run(seq_len, tail, query_len)
            nan_rows = int(torch.isnan(out).any(-1).any(-1).sum())
            diff = float((out - reference).abs().max())
            rows = f"{nan_rows:3d}/{query_len:<3d}"
            print(f"{seq_len:7d} {query_len:9d} {tail!s:5} | {rows} | {diff:.3g}")


async def engine() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lora_gateway import devtools
    from lora_gateway.config import Settings
    from lora_gateway.engine.base import GenerateParams, LoadedAdapter, Prompt, next_lora_id
    from lora_gateway.engine.selftest import collect
    from lora_gateway.engine.vllm_engine import VLLMEngine

    root = Path(tempfile.mkdtemp(prefix="poison-root-cause-"))
    model = devtools.make_model(root / "tiny")
    bad = devtools.make_adapter(model, root / "bad", devtools.AdapterSpec(seed=3))
    config = json.loads((bad / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e300
    (bad / "adapter_config.json").write_text(json.dumps(config))
    settings = Settings(
        model=str(model),
        dtype="float32",
        max_loras=2,
        max_cpu_loras=3,
        max_lora_rank=16,
        max_model_len=256,
        max_num_seqs=16,
        enforce_eager=True,
        kv_cache_space_gib=1,
        enable_prefix_caching=False,
        canary_interval_s=0,
    )
    eng = await VLLMEngine.start(settings)
    params = GenerateParams(max_tokens=8, ignore_eos=True)

    def ids(n: int, base: int) -> Prompt:
        return Prompt(token_ids=tuple(base + (i * 7) % 300 for i in range(n)))

    short, long_ = ids(8, 20), ids(80, 30)
    want = {"short": await collect(eng, short, params, None)}
    want["long"] = await collect(eng, long_, params, None)
    poison = LoadedAdapter(next_lora_id(), "bad", bad)
    await eng.add_adapter(poison)

    async def step(label: str, prompt: Prompt, name: str) -> None:
        out = await collect(eng, prompt, params, None)
        print(f"  {label:48s} {'right' if out == want[name] else 'WRONG'}  {out}")

    try:
        print("A. poisoned request, 60-token prompt: NaN K/V in slots 0..66 of its block")
        print("  poisoned output:", await collect(eng, ids(60, 40), params, poison))
        for i in range(3):
            await step(f"base, 8-token prompt (slots 0..14) #{i + 1}", short, "short")
        await step("base, 80-token prompt (slots 0..86): overwrites all", long_, "long")
        await step("base, 8-token prompt again", short, "short")
        print("B. a long base request holds the freed block while a short one runs")
        print("  poisoned output:", await collect(eng, ids(60, 40), params, poison))
        holder = asyncio.create_task(
            collect(eng, ids(100, 60), GenerateParams(max_tokens=120, ignore_eos=True), None)
        )
        await asyncio.sleep(0.3)
        await step("base, 8-token prompt, the block held by another", short, "short")
        await holder
        await step("base, 8-token prompt, after the holder healed it", short, "short")
        print("C. a victim poisons again: a poisoned 4-token request (NaN K/V in slots 0..10)")
        print("  poisoned output:", await collect(eng, ids(4, 50), params, poison))
        await step("base, 8-token prompt: its prefill reads slots 8..10", short, "short")
        await step("base, 8-token prompt: NaN K/V the victim wrote", short, "short")
    finally:
        await eng.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["kernel"]:
        kernel()
    elif sys.argv[1:] == ["engine"]:
        asyncio.run(engine())
    else:
        sys.exit(__doc__)
