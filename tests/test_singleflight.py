"""`adapter_store.singleflight.SingleFlight`: sharing, errors, cancellation, cleanup (fast)."""

from __future__ import annotations

import asyncio

import pytest

from adapter_store.singleflight import SingleFlight


class Work:
    """A coroutine factory that counts its runs and finishes when `release` is set."""

    def __init__(self, result: str = "done", error: Exception | None = None) -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.result = result
        self.error = error

    async def __call__(self) -> str:
        self.runs += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_callers_share_one_run() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work, other = Work("a"), Work("b")
    waiters = [asyncio.create_task(flight.do("a", work)) for _ in range(10)]
    waiter_b = asyncio.create_task(flight.do("b", other))
    await asyncio.sleep(0)
    assert sorted(flight.keys()) == ["a", "b"]
    assert "a" in flight
    work.release.set()
    other.release.set()
    assert await asyncio.gather(*waiters) == ["a"] * 10
    assert await waiter_b == "b"
    assert (work.runs, other.runs) == (1, 1)  # one run per key, keys independent


async def test_error_reaches_every_waiter_and_next_call_starts_afresh() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    failing = Work(error=ValueError("store down"))
    waiters = [asyncio.create_task(flight.do("k", failing)) for _ in range(5)]
    await asyncio.sleep(0)
    failing.release.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(o) for o in outcomes] == [ValueError] * 5
    assert all(str(o) == "store down" for o in outcomes)
    assert failing.runs == 1
    assert "k" not in flight  # failed work is not cached
    assert len(flight) == 0
    again = Work("ok")
    again.release.set()
    assert await flight.do("k", again) == "ok"
    assert again.runs == 1


async def test_cancelling_one_waiter_does_not_cancel_the_work() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work("shared")
    first = asyncio.create_task(flight.do("k", work))
    second = asyncio.create_task(flight.do("k", work))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert "k" in flight  # still running for the other waiter
    work.release.set()
    assert await second == "shared"
    assert work.runs == 1


async def test_work_finishes_when_every_waiter_cancelled() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    finished = asyncio.Event()

    async def work() -> str:
        await asyncio.sleep(0.01)
        finished.set()
        return "x"

    waiter = asyncio.create_task(flight.do("k", work))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    async with asyncio.timeout(5):
        await finished.wait()
    await asyncio.sleep(0)  # the done callback runs on the next loop turn
    assert len(flight) == 0


async def test_entry_removed_when_done_and_forget_starts_new_work() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    old = Work("old")
    old_waiter = asyncio.create_task(flight.do("k", old))
    await asyncio.sleep(0)
    flight.forget("k")
    new = Work("new")
    new_waiter = asyncio.create_task(flight.do("k", new))
    await asyncio.sleep(0)
    old.release.set()
    assert await old_waiter == "old"  # a forgotten run still answers its own waiters
    await asyncio.sleep(0)
    assert "k" in flight  # the old run's end did not remove the new run's entry
    new.release.set()
    assert await new_waiter == "new"
    await asyncio.sleep(0)
    assert len(flight) == 0
    assert (old.runs, new.runs) == (1, 1)


async def test_settle_waits_for_the_run_whatever_its_outcome() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    await flight.settle("nothing")  # nothing in flight: returns at once
    failing = Work(error=RuntimeError("boom"))
    task = flight.start("k", failing)
    settled = asyncio.create_task(flight.settle("k"))
    await asyncio.sleep(0)
    assert not settled.done()
    failing.release.set()
    await settled  # the error is not raised to the settler
    with pytest.raises(RuntimeError):
        await task


async def test_a_cancelled_settler_gets_its_cancellation_and_the_work_runs_on() -> None:
    """Before: settle() swallowed the caller's own CancelledError (a task cancelled while it
    settled went on as if nothing happened)."""
    flight: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 7

    running = flight.start("k", work)
    settler = asyncio.create_task(flight.settle("k"))
    await asyncio.sleep(0)
    settler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settler
    assert not running.done()
    release.set()
    assert await running == 7
