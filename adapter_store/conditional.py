"""Conditional writes: the one read-modify-write loop of the store's small JSON objects.

Manifests (adapter_store.manifests) and usage objects (adapter_store.quota) are updated the
same way: read the object with its etag → compute the new value → put it If-Match that etag (or
If-None-Match "*" when creating). A lost race (PreconditionFailed, or BlobNotFound: the object
was deleted meanwhile) re-reads and retries after a jittered backoff, a bounded number of times,
then raises Conflict. So two concurrent writers, on any number of replicas, never lose an
update.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, Protocol, TypeVar

from adapter_store.backend import BlobBackend
from adapter_store.errors import BlobNotFound, Conflict, PreconditionFailed

__all__ = ["Stored", "backoff", "update"]


class Stored(Protocol):
    """A value stored as one object: a dataclass with the etag it was read with."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def etag(self) -> str | None: ...

    def to_json(self) -> bytes: ...


_S = TypeVar("_S", bound=Stored)


def backoff(attempt: int, max_s: float) -> None:
    """Sleep a jittered, exponentially growing time (at most `max_s`) before a retry."""
    time.sleep(random.uniform(0, min(max_s, 0.002 * 2**attempt)))  # noqa: S311 - jitter


def update(
    backend: BlobBackend,
    key: str,
    read: Callable[[], _S | None],
    change: Callable[[_S | None], _S | None],
    *,
    retries: int,
    max_backoff_s: float,
    what: str,
) -> _S | None:
    """Read-modify-write the object under `key` with a conditional put; the value written
    (its new etag set), or `read()`'s value when `change` returns it unchanged (or None).

    `read` returns the current value (None: absent, then created with If-None-Match);
    `change` may raise to refuse, and is called again after a lost race. `what` names the
    object in the Conflict raised once `retries` attempts are lost.
    """
    for attempt in range(retries):
        current = read()
        new = change(current)
        if new is None or new is current:
            return current
        try:
            if current is None:
                etag = backend.put(key, new.to_json(), if_none_match=True)
            else:
                etag = backend.put(key, new.to_json(), if_match=current.etag)
            return replace(new, etag=etag)
        except (PreconditionFailed, BlobNotFound):
            backoff(attempt, max_backoff_s)
    raise Conflict(f"too many concurrent updates of {what}; try again")
