"""Start-up isolation self-test: the server runs it before it reports SERVING.

It loads random "canary" adapters into every engine slot and runs a few greedy prompts: for the
base model before any adapter is loaded and for each canary alone (solo), then all of them at
once (a mixed batch). Two of the requests carry a structured-output constraint (a JSON schema on
the base model, a regex on a canary), so the mixed batch also holds rows that the grammar's
token mask applies to and rows it must not touch. It fails if any request's mixed output differs
from its solo output. With vLLM's CPU kernels and the null
adapter guard off, the base-model requests in the mixed batch pick up the last slot's canary and
the test fails (`tests/test_engine.py` shows it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from lora_gateway import errors
from lora_gateway.engine.base import (
    Engine,
    GenerateParams,
    LoadedAdapter,
    OutputConstraint,
    Prompt,
    next_lora_id,
)
from lora_gateway.engine.vllm_engine import write_q_proj_adapter

log = logging.getLogger(__name__)

CANARY_PROMPTS = ("the quick brown fox jumps", "one two three four five six")
CANARY_TOKENS = 8
#: The constrained requests of the mixed batch (compact JSON: a random model would otherwise
#: fill max_tokens with whitespace, and every row must produce tokens).
CONSTRAINTS = (
    OutputConstraint(
        json_schema='{"type": "object", "properties": {"n": {"type": "integer"}}, '
        '"required": ["n"], "additionalProperties": false}',
        disable_any_whitespace=True,
    ),
    OutputConstraint(regex="[a-z]{2,6}( [a-z]{2,6}){1,4}"),
)


@dataclass(frozen=True)
class SelfTestReport:
    requests: int
    mismatches: list[str]

    @property
    def ok(self) -> bool:
        return not self.mismatches


async def collect(
    engine: Engine, prompt: Prompt, params: GenerateParams, adapter: LoadedAdapter | None
) -> list[int]:
    out: list[int] = []
    async for chunk in engine.generate(uuid.uuid4().hex, prompt, params, adapter):
        out.extend(chunk.token_ids)
    return out


async def run_self_test(engine: Engine, model: str) -> SelfTestReport:
    """Fill every slot with a canary, compare mixed-batch outputs with solo ones."""
    canaries = max(1, min(engine.max_loras, engine.max_cpu_loras))
    folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="lora-gateway-selftest-"))
    adapters: list[LoadedAdapter] = []
    params = GenerateParams(max_tokens=CANARY_TOKENS, temperature=0.0, ignore_eos=True)
    constrained = [
        GenerateParams(max_tokens=CANARY_TOKENS, temperature=0.0, structured=c) for c in CONSTRAINTS
    ]
    prompts = [Prompt(text=text) for text in CANARY_PROMPTS]
    try:
        # Base-model outputs first, while no adapter occupies any slot.
        solo = [await collect(engine, prompt, params, None) for prompt in prompts]
        for index in range(canaries):
            path = await asyncio.to_thread(
                write_q_proj_adapter,
                model,
                folder / f"canary-{index}",
                rank=8,
                seed=index,
                scale=0.5,
            )
            adapter = LoadedAdapter(next_lora_id(), f"selftest-canary-{index}", path)
            await engine.add_adapter(adapter)
            adapters.append(adapter)
        cases: list[tuple[Prompt, LoadedAdapter | None, GenerateParams]] = [
            (p, None, params) for p in prompts
        ]
        cases += [(prompt, adapter, params) for prompt in prompts for adapter in adapters]
        # Constrained rows: the base model, and the last canary (the slot -1 would read).
        cases += [(prompts[0], None, constrained[0]), (prompts[1], adapters[-1], constrained[1])]
        solo += [
            await collect(engine, prompt, case_params, adapter)
            for prompt, adapter, case_params in cases[len(prompts) :]
        ]
        mixed = await asyncio.gather(
            *(collect(engine, prompt, p, adapter) for prompt, adapter, p in cases)
        )
        mismatches = [
            f"{'base' if adapter is None else adapter.lora_name} / {prompt.text!r}"
            + (f" / {p.structured.kind}" if p.structured is not None else "")
            for (prompt, adapter, p), alone, batched in zip(cases, solo, mixed, strict=True)
            if alone != batched
        ]
        return SelfTestReport(requests=len(cases) * 2, mismatches=mismatches)
    finally:
        for adapter in adapters:
            try:
                await engine.remove_adapter(adapter.lora_int_id)
            except errors.GatewayError:
                log.warning("could not remove self-test canary %s", adapter.lora_name)
        await asyncio.to_thread(shutil.rmtree, folder, True)


async def require_isolation(engine: Engine, model: str) -> SelfTestReport:
    """Run the self-test and raise `errors.Unavailable` if any output crossed requests."""
    report = await run_self_test(engine, model)
    if not report.ok:
        raise errors.Unavailable(
            "isolation self-test failed: mixed-batch outputs differ from solo outputs for "
            + ", ".join(report.mismatches)
        )
    log.info("isolation self-test passed (%d requests)", report.requests)
    return report
