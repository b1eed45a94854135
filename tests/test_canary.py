"""The runtime canary's policy, on a fake engine: when it checks, how deep, and whom it blames.

The real engine, the real poison and the recovery are in tests/faults/test_engine_poisoning.py;
this file pins the rules of `CanaryMonitor` down exactly (a fake engine is fine for a policy).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from pathlib import Path

import pytest

from lora_gateway import errors
from lora_gateway.config import Settings
from lora_gateway.engine.base import (
    GenerateParams,
    LoadedAdapter,
    Prompt,
    TokenChunk,
    TokenizerInfo,
)
from lora_gateway.engine.canary import (
    CANARY_PROMPTS,
    Canary,
    CanaryEngine,
    CanaryMonitor,
    CanaryReport,
)
from lora_gateway.metrics import Metrics


class FakeEngine:
    """Outputs depend on (base or canary, prompt); `poisoned` turns them all into zeros."""

    max_loras = 2
    max_cpu_loras = 3
    max_model_len = 256

    def __init__(self) -> None:
        self.canary_adapter = LoadedAdapter(1, "canary", Path("/nonexistent"))
        self.poisoned = False
        self.dead = False
        self.submitted = 0
        self._listeners: list[Callable[[int], None]] = []

    async def generate(
        self,
        request_id: str,
        prompt: Prompt,
        params: GenerateParams,
        adapter: LoadedAdapter | None,
    ) -> AsyncIterator[TokenChunk]:
        if self.dead:
            raise errors.EngineDead("engine is not running")
        self.submitted += 1
        await asyncio.sleep(0)
        seed = len(prompt.text or "") + (100 if adapter is not None else 0)
        tokens = [0] * params.max_tokens if self.poisoned else [seed + i for i in range(8)]
        yield TokenChunk(token_ids=tokens, text="")
        if adapter is not None and adapter is not self.canary_adapter:
            self.finish(adapter.lora_int_id)

    def finish(self, lora_int_id: int) -> None:
        for listener in list(self._listeners):
            listener(lora_int_id)

    def watch_finished(self, listener: Callable[[int], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def restart(self) -> None:
        self.poisoned = False

    async def abort(self, request_ids: Sequence[str]) -> None: ...

    async def add_adapter(self, adapter: LoadedAdapter) -> None: ...

    async def remove_adapter(self, lora_int_id: int) -> int:
        return 0

    async def list_adapters(self) -> set[int]:
        return set()

    async def check_health(self) -> None: ...

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [len(text)]

    def tokenizer_info(self) -> TokenizerInfo:
        return TokenizerInfo(chat_template=None)

    async def shutdown(self) -> None: ...


class Harness:
    def __init__(self) -> None:
        self.engine = FakeEngine()
        assert isinstance(self.engine, CanaryEngine)
        self.canary = Canary(self.engine)
        self.failures: list[tuple[CanaryReport, list[Hashable]]] = []
        self.results: list[str] = []
        self.monitor = CanaryMonitor(
            self.canary, 3600.0, self.on_failure, on_result=self.results.append
        )

    async def on_failure(self, report: CanaryReport, suspects: list[Hashable]) -> bool:
        self.failures.append((report, suspects))
        await self.engine.restart()
        return True


@pytest.fixture
async def h() -> Harness:
    harness = Harness()
    await harness.canary.record()
    harness.engine.watch_finished(harness.monitor.finished)
    return harness


async def test_references_are_recorded_once_per_engine() -> None:
    engine = FakeEngine()
    canary = Canary.of(engine)
    assert Canary.of(engine) is canary
    await canary.record()
    first = canary.references
    engine.poisoned = True
    await canary.record()  # a second gateway on the same engine keeps the good references
    assert canary.references == first
    assert len(canary.cases) == 2 * len(CANARY_PROMPTS)


async def test_a_passing_check_blames_nobody(h: Harness) -> None:
    assert await h.monitor.check_once()
    assert h.results == ["pass"]
    assert h.failures == []


async def test_first_use_asks_for_a_check_and_the_poisoned_version_is_blamed(h: Harness) -> None:
    h.monitor.loaded("poison", 7)
    assert not h.monitor._requested.is_set()  # not in the same batch as its first request
    h.engine.finish(7)
    assert h.monitor._requested.is_set()
    h.engine.poisoned = True
    assert await h.monitor.check_once()  # the handler restarted the engine: keep checking
    assert h.results == ["fail"]
    [(report, suspects)] = h.failures
    assert suspects == ["poison"]
    assert "base / 'the quick brown fox jumps'" in report.mismatches


async def test_suspects_are_the_used_and_the_recently_loaded_not_the_covered(h: Harness) -> None:
    h.monitor.loaded("old-idle", 3)  # loaded before a good check, never used: covered
    assert await h.monitor.check_once()
    h.monitor.loaded("used-early", 4)
    h.engine.finish(4)
    assert await h.monitor.check_once()  # passes: "used-early" leaves probation
    h.monitor.loaded("served", 5)
    h.engine.finish(5)
    h.monitor.loaded("fresh-idle", 6)  # loaded since the last good check: a suspect
    h.engine.poisoned = True
    await h.monitor.check_once()
    [(_, suspects)] = h.failures
    assert sorted(map(str, suspects)) == ["fresh-idle", "served"]


async def test_a_version_used_during_a_check_stays_on_probation(h: Harness) -> None:
    """The check that ran while its first request ran does not clear it; the next one does."""
    h.monitor.loaded("a", 8)

    async def use_during_check() -> None:
        await asyncio.sleep(0)
        h.engine.finish(8)

    task = asyncio.create_task(use_during_check())
    assert await h.monitor.check_once()
    await task
    assert 8 in h.monitor._probation
    h.engine.poisoned = True
    await h.monitor.check_once()
    assert h.failures[0][1] == ["a"]


async def test_a_check_in_flight_makes_the_next_one_deeper(h: Harness) -> None:
    """Its requests free their KV blocks on top of the poisoned one (LIFO): one round more."""
    h.monitor.loaded("a", 9)
    per_round = len(h.canary.cases)

    async def first_use_during_check() -> None:
        await asyncio.sleep(0)
        h.engine.finish(9)

    task = asyncio.create_task(first_use_during_check())
    await h.monitor.check_once()  # 1 round in flight when the first use ended
    await task
    assert h.monitor._pending_rounds == 2
    before = h.engine.submitted
    await h.monitor.check_once()
    assert h.engine.submitted - before == 2 * per_round


async def test_an_engine_that_cannot_answer_is_an_error_not_a_mismatch(h: Harness) -> None:
    h.monitor.loaded("a", 10)
    h.engine.finish(10)
    h.engine.dead = True
    assert await h.monitor.check_once()
    assert h.results == ["error"]
    assert h.failures == []
    assert 10 in h.monitor._probation


async def test_the_monitor_runs_on_first_use_without_waiting_for_the_interval(h: Harness) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(h.monitor.run(stop))
    await asyncio.sleep(0.05)
    h.monitor.loaded("poison", 11)
    h.engine.poisoned = True
    h.engine.finish(11)
    for _ in range(100):
        if h.failures:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert h.failures[0][1] == ["poison"]


def test_canary_interval_setting_is_bounded() -> None:
    assert Settings(canary_interval_s=0).canary_interval_s == 0
    with pytest.raises(errors.InvalidArgument, match="canary_interval_s"):
        Settings(canary_interval_s=-1)


def test_canary_metrics() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.canary_check("pass")
    metrics.canary_check("fail")
    metrics.quarantined(2)
    metrics.engine_restarted()
    text = metrics.render().decode()
    assert 'lora_gateway_canary_checks_total{result="fail"} 1.0' in text
    assert "lora_gateway_quarantined_versions_total 2.0" in text
    assert "lora_gateway_engine_restarts_total 1.0" in text
    with pytest.raises(ValueError):
        metrics.canary_check("maybe")
