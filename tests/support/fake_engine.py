"""An in-memory `engine.base.Engine` for fast unit tests of residency policies.

It never stands in for vLLM in an end-to-end test. It checks what the real engine would punish:
an add beyond `max_cpu_loras` (vLLM would evict on its own), an adapter whose files are missing
when it is added (a vLLM worker would die), a request naming an adapter it does not hold. It
records the peak number of adapters held, and every add and remove, for assertions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from lora_gateway import errors
from lora_gateway.engine.base import (
    FinishReason,
    GenerateParams,
    LoadedAdapter,
    Prompt,
    TokenChunk,
    TokenizerInfo,
)


@dataclass
class FakeEngine:
    max_loras: int = 2
    max_cpu_loras: int = 3
    max_model_len: int = 256
    #: Seconds each add_adapter takes (the engine reading the files).
    add_delay_s: float = 0.0
    #: Seconds each remove_adapter takes once the adapter's requests have ended.
    remove_delay_s: float = 0.0
    #: Seconds between generated tokens.
    token_delay_s: float = 0.005
    held: dict[int, LoadedAdapter] = field(default_factory=dict)
    peak: int = 0
    adds: list[str] = field(default_factory=list)
    removes: list[int] = field(default_factory=list)
    #: Failures the engine would have died of (missing files, capacity overshoot).
    faults: list[str] = field(default_factory=list)
    _inflight: dict[str, int | None] = field(default_factory=dict)
    _ended: dict[str, asyncio.Event] = field(default_factory=dict)
    _aborted: set[str] = field(default_factory=set)

    def generate(
        self,
        request_id: str,
        prompt: Prompt,
        params: GenerateParams,
        adapter: LoadedAdapter | None,
    ) -> AsyncIterator[TokenChunk]:
        return self._generate(request_id, params, adapter)

    async def _generate(
        self, request_id: str, params: GenerateParams, adapter: LoadedAdapter | None
    ) -> AsyncIterator[TokenChunk]:
        if adapter is not None and adapter.lora_int_id not in self.held:
            raise errors.Aborted("the adapter was removed from the engine")
        self._inflight[request_id] = adapter.lora_int_id if adapter else None
        ended = self._ended.setdefault(request_id, asyncio.Event())
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.token_delay_s)
                if request_id in self._aborted:
                    yield TokenChunk([], "", FinishReason.ABORT)
                    return
                last = i == params.max_tokens - 1
                yield TokenChunk([i], "x", FinishReason.LENGTH if last else None)
        finally:
            self._inflight.pop(request_id, None)
            self._aborted.discard(request_id)
            self._ended.pop(request_id, None)
            ended.set()

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def tokenizer_info(self) -> TokenizerInfo:
        return TokenizerInfo(chat_template=None)

    async def abort(self, request_ids: Sequence[str]) -> None:
        self._aborted.update(r for r in request_ids if r in self._inflight)

    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        if adapter.lora_int_id in self.held:
            return
        if len(self.held) >= self.max_cpu_loras:
            self.faults.append(f"add beyond capacity: {adapter.lora_name}")
            raise errors.ResourceExhausted("engine adapter capacity is full")
        if self.add_delay_s:
            await asyncio.sleep(self.add_delay_s)
        missing = [
            name
            for name in ("adapter_config.json", "adapter_model.safetensors")
            if not (adapter.path / name).is_file()
        ]
        if missing:
            self.faults.append(f"files missing at add: {adapter.lora_name} {missing}")
            raise errors.EngineDead("engine died loading an adapter whose files are gone")
        self.held[adapter.lora_int_id] = adapter
        self.adds.append(adapter.lora_name)
        self.peak = max(self.peak, len(self.held))

    async def remove_adapter(self, lora_int_id: int) -> int:
        self.held.pop(lora_int_id, None)
        doomed = [r for r, i in self._inflight.items() if i == lora_int_id]
        waits = [self._ended[r].wait() for r in doomed if r in self._ended]
        await self.abort(doomed)
        await asyncio.gather(*waits)
        if self.remove_delay_s:
            await asyncio.sleep(self.remove_delay_s)
        self.removes.append(lora_int_id)
        return len(doomed)

    async def list_adapters(self) -> set[int]:
        return set(self.held)

    async def check_health(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None
