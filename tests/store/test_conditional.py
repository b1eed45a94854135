"""The one read-modify-write loop (adapter_store.conditional), on both backends: lost races are
retried on the winner's value, a bounded number of times, and nothing unchanged is written."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from adapter_store import BlobBackend, Conflict
from adapter_store.conditional import update
from adapter_store.errors import BlobNotFound
from adapter_store.keys import usage_key

KEY = usage_key("acme")


@dataclass(frozen=True)
class Counter:
    value: int
    etag: str | None = None

    def to_json(self) -> bytes:
        return json.dumps({"value": self.value}).encode()


def read(backend: BlobBackend) -> Counter | None:
    try:
        data, etag = backend.get(KEY)
    except BlobNotFound:
        return None
    return Counter(json.loads(data)["value"], etag)


def stored(backend: BlobBackend) -> int:
    found = read(backend)
    assert found is not None
    return found.value


def test_create_update_and_unchanged(backend: BlobBackend) -> None:
    def run(change: object) -> Counter | None:
        return update(
            backend,
            KEY,
            lambda: read(backend),
            change,  # type: ignore[arg-type]
            retries=3,
            max_backoff_s=0.01,
            what="the counter",
        )

    created = run(lambda current: Counter(1) if current is None else current)
    assert created is not None
    assert created.value == 1
    assert created.etag == backend.get(KEY)[1]
    etag = created.etag
    # Returning the value read (or None) writes nothing and gives the value read.
    assert run(lambda current: current) == Counter(1, etag)
    assert run(lambda current: None) == Counter(1, etag)
    assert backend.get(KEY)[1] == etag
    bumped = run(lambda current: Counter(current.value + 1))
    assert bumped is not None
    assert bumped.value == stored(backend) == 2
    assert bumped.etag == backend.get(KEY)[1] != etag


@pytest.mark.parametrize("exists", [False, True], ids=["create", "update"])
def test_a_lost_race_is_retried_on_the_winners_value(backend: BlobBackend, exists: bool) -> None:
    if exists:
        backend.put(KEY, Counter(1).to_json())
    seen: list[int | None] = []

    def change(current: Counter | None) -> Counter:
        seen.append(current.value if current is not None else None)
        if len(seen) == 1:  # another writer wins between this read and this write
            backend.put(KEY, Counter(10).to_json())
        return Counter((current.value if current is not None else 0) + 1)

    result = update(
        backend, KEY, lambda: read(backend), change, retries=3, max_backoff_s=0.01, what="x"
    )
    assert seen == [1 if exists else None, 10]
    assert result is not None
    assert result.value == stored(backend) == 11


def test_too_many_lost_races_is_a_conflict(backend: BlobBackend) -> None:
    backend.put(KEY, Counter(0).to_json())
    attempts: list[int] = []

    def change(current: Counter | None) -> Counter:
        assert current is not None
        attempts.append(current.value)
        backend.put(KEY, Counter(current.value + 100).to_json())  # always beaten
        return Counter(current.value + 1)

    with pytest.raises(Conflict, match="too many concurrent updates of the counter; try again"):
        update(
            backend,
            KEY,
            lambda: read(backend),
            change,
            retries=4,
            max_backoff_s=0.01,
            what="the counter",
        )
    assert attempts == [0, 100, 200, 300]
    assert stored(backend) == 400  # only the other writer's updates
