"""`SingleFlight`: one task per key, however many callers ask for it at once.

The first caller for a key starts the work as its own task; callers that arrive while it runs
await that same task. Every waiter gets its result or its exception. A waiter is shielded: if it
is cancelled, only its wait ends, and the work goes on for the others (and finishes even when
every waiter has gone). The entry is removed when the task is done, so the next call starts
afresh; `forget` removes it earlier (a result computed from data known to be stale).

One event loop, no locks: the check for a running task and the start of a new one happen with
no await in between. It lives in `adapter_store` because the disk cache uses it and the store
never imports `lora_gateway`; the gateway's residency (manifest reads, share indexes, cold
loads) uses the same one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Keyed single flight over asyncio tasks (see the module docstring)."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def keys(self) -> list[K]:
        """The keys with work in flight."""
        return list(self._tasks)

    def start(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The task in flight for `key`, or a new one running `work()`; nothing is awaited."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(work())
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return task

    async def do(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """`work()`'s result, shared with every concurrent caller for `key`. Cancelling this
        caller does not cancel the work."""
        return await asyncio.shield(self.start(key, work))

    async def settle(self, key: K) -> None:
        """Wait until the work in flight for `key` (if any) is over, whatever its outcome. A
        caller that is cancelled while it waits gets its CancelledError (the work runs on)."""
        task = self._tasks.get(key)
        if task is not None:
            await asyncio.wait({task})

    def forget(self, key: K) -> None:
        """Let the next call for `key` start new work; the task in flight runs on, and its
        current waiters still get its result."""
        self._tasks.pop(key, None)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone
