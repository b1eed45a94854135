"""Runtime canary: the engine is checked while it serves, not only at start-up.

Why. One adapter with NaN/Inf effective weights (say `lora_alpha: 1e300`) poisons the engine:
vLLM's CPU attention reads the whole last KV block of a request, also the slots past its length,
and freed blocks are reused last-in first-out, so the NaN K/V a poisoned request leaves behind
turn the next requests' outputs into NaN, and those requests leave NaN K/V of their own
(docs/reliability.md, "Hostile tenants", "Engine poisoning"). Validation refuses such adapters;
the canary is the guard for whatever gets past it.

What. `Canary` holds a known set of greedy requests, base model and a canary adapter (random
weights, written like the self-test's canaries, in the engine's reserved canary slot), and their
references, recorded right after the isolation self-test passed. `check(rounds)` submits them all
at once (`rounds` copies), among whatever real traffic runs, and compares token for token.

When. `CanaryMonitor` runs a check every `canary_interval_s`, and one right after the first
request on each newly loaded adapter version has ended (residency's load path calls `loaded()`;
the engine reports ended requests). Each canary request takes one of the most recently freed KV
blocks (LIFO), so a check right after a poisoned request ended reads the block it left NaN in.
Two details make that hold: the check is not run in the same batch as the new version's first
request (it would take fresh blocks and free them on top of the poisoned one), and when another
check was running as that request ended (its blocks then lie on top), the check is made that
many rounds deeper. Detection: one check after the first poisoned request ended, and within
`canary_interval_s` plus one check in any case while the poison circulates.

Whom to blame. A version is on probation from its load until a check passes that started after
one of its requests had ended (a version that computed nothing cannot have poisoned
activations). On a mismatch the suspects are the versions on probation that served, and those
loaded since the last good check started. The monitor hands them to `on_failure`, which
quarantines them and restarts the engine (server.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from lora_gateway import errors
from lora_gateway.engine.base import Engine, GenerateParams, LoadedAdapter, Prompt

log = logging.getLogger(__name__)

#: Prompts of the check: short, so that a poisoned block tail lies past their length.
CANARY_PROMPTS = ("the quick brown fox jumps", "one two three four five six")
CANARY_TOKENS = 8
#: A check that takes longer than this (an overloaded engine) counts as "error", not "fail".
CHECK_TIMEOUT_S = 30.0
#: The deepest check, in rounds of every case (4 requests a round).
MAX_ROUNDS = 8

CheckResult = Literal["pass", "fail", "error"]


@runtime_checkable
class CanaryEngine(Engine, Protocol):
    """An engine with a canary adapter in a reserved slot, that reports ended requests."""

    canary_adapter: LoadedAdapter | None

    def watch_finished(self, listener: Callable[[int], None]) -> Callable[[], None]: ...

    async def restart(self) -> None: ...


@dataclass(frozen=True)
class CanaryReport:
    result: CheckResult
    #: "base / 'prompt'" or "canary / 'prompt'" for every output that differed.
    mismatches: tuple[str, ...] = ()
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "pass"


async def _collect(
    engine: Engine, prompt: Prompt, params: GenerateParams, adapter: LoadedAdapter | None
) -> list[int]:
    out: list[int] = []
    async for chunk in engine.generate(f"canary-{uuid.uuid4().hex}", prompt, params, adapter):
        out.extend(chunk.token_ids)
    return out


class Canary:
    """The known requests of one engine and their references (one per engine: see `of`)."""

    _by_engine: weakref.WeakKeyDictionary[CanaryEngine, Canary] = weakref.WeakKeyDictionary()

    def __init__(self, engine: CanaryEngine) -> None:
        if engine.canary_adapter is None:
            raise errors.FailedPrecondition("the engine has no canary adapter (canary off)")
        self.engine = engine
        self.params = GenerateParams(max_tokens=CANARY_TOKENS, temperature=0.0, ignore_eos=True)
        adapter = engine.canary_adapter
        self.cases: list[tuple[str, Prompt, LoadedAdapter | None]] = [
            (f"{label} / {text!r}", Prompt(text=text), target)
            for label, target in (("base", None), ("canary", adapter))
            for text in CANARY_PROMPTS
        ]
        self.references: list[list[int]] | None = None

    @classmethod
    def of(cls, engine: CanaryEngine) -> Canary:
        """The engine's canary; its references are recorded once per engine (several gateways
        may share one engine, and an in-process restart keeps the same references)."""
        canary = cls._by_engine.get(engine)
        if canary is None:
            canary = cls._by_engine[engine] = cls(engine)
        return canary

    async def record(self) -> None:
        """Record the references, one request at a time. Call it right after the isolation
        self-test passed (the engine is known good then); a second call keeps the first ones."""
        if self.references is not None:
            return
        self.references = [
            await _collect(self.engine, prompt, self.params, adapter)
            for _, prompt, adapter in self.cases
        ]
        base, canary = (
            self.references[: len(CANARY_PROMPTS)],
            self.references[len(CANARY_PROMPTS) :],
        )
        if base == canary:  # not one prompt changed: the canary could not tell a dropped delta
            raise errors.Unavailable("runtime canary: the canary adapter does not change outputs")
        log.info("runtime canary references recorded (%d requests)", len(self.cases))

    async def check(self, rounds: int = 1) -> CanaryReport:
        """Submit every known request at once (`rounds` copies of each) and compare with the
        references."""
        if self.references is None:
            raise errors.FailedPrecondition("runtime canary: references not recorded")
        cases = self.cases * rounds
        references = self.references * rounds
        started = time.perf_counter()
        try:
            outputs = await asyncio.wait_for(
                asyncio.gather(*(_collect(self.engine, p, self.params, a) for _, p, a in cases)),
                CHECK_TIMEOUT_S,
            )
        except (errors.GatewayError, TimeoutError) as exc:
            # An engine that is down or overloaded is the watcher's business, not a mismatch.
            return CanaryReport(
                "error", seconds=time.perf_counter() - started, detail=type(exc).__name__
            )
        mismatches = tuple(
            dict.fromkeys(
                label
                for (label, _, _), want, got in zip(cases, references, outputs, strict=True)
                if want != got
            )
        )
        return CanaryReport(
            "fail" if mismatches else "pass",
            mismatches=mismatches,
            seconds=time.perf_counter() - started,
        )


@dataclass
class _Probation:
    key: Hashable
    lora_int_id: int
    #: How many checks had started when the version was loaded.
    checks_started: int
    #: One of its requests has ended.
    used: bool = False


#: on_failure(report, suspect keys) -> whether the engine serves again (False: stop checking).
FailureHandler = Callable[[CanaryReport, list[Hashable]], Awaitable[bool]]


@dataclass
class CanaryMonitor:
    """Runs `canary.check()` periodically and after first uses; blames and hands over failures."""

    canary: Canary
    interval_s: float
    on_failure: FailureHandler
    on_result: Callable[[CheckResult], None] | None = None
    _probation: dict[int, _Probation] = field(default_factory=dict)
    _requested: asyncio.Event = field(default_factory=asyncio.Event)
    _started: int = 0
    #: Number (1, 2, ...) of the last check that passed.
    _last_good: int = 0
    #: Rounds of the check in flight (0: none), and of the next one asked for.
    _running_rounds: int = 0
    _pending_rounds: int = 0
    #: Checks completed, and the most recent report (for tests and logs).
    completed: int = 0
    last: CanaryReport | None = None

    def loaded(self, key: Hashable, lora_int_id: int) -> None:
        """Residency's hook: a version was just added to the engine; it is on probation, and a
        check runs as soon as its first request has ended."""
        self._probation[lora_int_id] = _Probation(key, lora_int_id, self._started)

    def finished(self, lora_int_id: int) -> None:
        """The engine's report: a request on this adapter ended."""
        probation = self._probation.get(lora_int_id)
        if probation is None or probation.used:
            return
        probation.used = True
        # A check in flight frees its blocks on top of the ones this request just freed: go
        # deeper by as many rounds.
        rounds = min(MAX_ROUNDS, 1 + self._running_rounds)
        self._pending_rounds = max(self._pending_rounds, rounds)
        self._requested.set()

    def reset(self) -> None:
        """Forget every probation (the engine was restarted: nothing is loaded any more)."""
        self._probation.clear()
        self._last_good = self._started

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: check every `interval_s`, or sooner when a first use asked for it."""
        engine = self.canary.engine
        unwatch = engine.watch_finished(self.finished)
        try:
            while not stop.is_set():
                waiters = {
                    asyncio.ensure_future(stop.wait()),
                    asyncio.ensure_future(self._requested.wait()),
                }
                try:
                    await asyncio.wait(
                        waiters, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                if stop.is_set():
                    return
                self._requested.clear()
                try:
                    if not await self.check_once():
                        return
                except Exception:
                    log.exception("runtime canary check failed to run")
        finally:
            unwatch()

    async def check_once(self) -> bool:
        """One check with its consequences; False when the engine is not to be checked again."""
        used_before = {i for i, p in self._probation.items() if p.used}
        rounds, self._pending_rounds = max(1, self._pending_rounds), 0
        self._started += 1
        number = self._started
        self._running_rounds = rounds
        try:
            report = await self.canary.check(rounds)
        finally:
            self._running_rounds = 0
        self.last = report
        self.completed += 1
        if self.on_result is not None:
            self.on_result(report.result)
        if report.result == "error":
            log.warning("runtime canary check could not run (%s)", report.detail)
            return True
        if report.ok:
            for lora_int_id in used_before:
                self._probation.pop(lora_int_id, None)
            self._last_good = max(self._last_good, number)
            return True
        # Loaded before the last good check started (checks_started < its number) and idle
        # since: covered by it.
        suspects = [
            p.key for p in self._probation.values() if p.used or p.checks_started >= self._last_good
        ]
        log.error(
            "runtime canary MISMATCH: %s; %d suspect version(s)",
            ", ".join(report.mismatches),
            len(suspects),
        )
        try:
            serving = await self.on_failure(report, suspects)
        finally:
            self.reset()
        return serving
