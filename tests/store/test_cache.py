"""The disk cache: single-flight, verification, LRU under a byte budget, pins, full disks."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from adapter_store import AdapterVersion, CapacityExceeded, DiskCache, Registry
from adapter_store.model import WEIGHTS_FILE
from tests.conftest import AdapterFactory


class CountingFetch:
    """Registry.fetch_file, counted, optionally held at a gate or failing with ENOSPC."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.enospc = 0

    def __call__(self, version: AdapterVersion, filename: str, dest: Path) -> None:
        self.calls += 1
        assert self.gate.wait(10)
        if self.enospc:
            self.enospc -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.registry.fetch_file(version, filename, dest)


@pytest.fixture
def versions(local_registry: Registry, make_test_adapter: AdapterFactory) -> list[AdapterVersion]:
    return [
        local_registry.upload_dir(
            "acme", f"bot-{seed}", make_test_adapter(seed=seed), created_by="t"
        )
        for seed in (1, 2, 3)
    ]


@pytest.fixture
def fetch(local_registry: Registry) -> CountingFetch:
    return CountingFetch(local_registry)


def leftovers(root: Path) -> list[Path]:
    return list((root / ".tmp").iterdir())


async def test_single_flight_and_cancelled_waiter(
    tmp_path: Path, versions: list[AdapterVersion], fetch: CountingFetch
) -> None:
    cache = DiskCache(tmp_path / "cache", 10**7, fetch)
    fetch.gate.clear()
    tasks = [asyncio.create_task(cache.ensure(versions[0])) for _ in range(100)]
    await asyncio.sleep(0.05)
    tasks[0].cancel()
    fetch.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert {str(r) for r in results[1:]} == {str(cache.path_for(versions[0].sha))}
    assert cache.stats.downloads == 1
    assert fetch.calls == 2
    assert cache.contains(versions[0].sha)
    assert leftovers(cache.root) == []
    assert await cache.ensure(versions[0]) == results[1]
    assert cache.stats.hits == 1
    assert fetch.calls == 2


async def test_corrupt_file_is_detected_and_fetched_again(
    tmp_path: Path, versions: list[AdapterVersion], fetch: CountingFetch
) -> None:
    cache = DiskCache(tmp_path / "cache", 10**7, fetch, verify=True)
    path = await cache.ensure(versions[0])
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    assert await cache.ensure(versions[0]) == path
    assert cache.stats.verify_failures == 1
    assert cache.stats.downloads == 2
    assert weights.read_bytes() != bytes(data)


async def test_truncated_file_is_detected_and_fetched_again(
    tmp_path: Path, versions: list[AdapterVersion], fetch: CountingFetch
) -> None:
    cache = DiskCache(tmp_path / "cache", 10**7, fetch)
    path = await cache.ensure(versions[0])
    entry = versions[0].file(WEIGHTS_FILE)
    with (path / WEIGHTS_FILE).open("r+b") as f:
        f.truncate(entry.size // 2)
    assert await cache.ensure(versions[0]) == path
    assert (path / WEIGHTS_FILE).stat().st_size == entry.size
    assert cache.stats.verify_failures == 1
    assert cache.stats.downloads == 2


async def test_restart_scan_verifies_and_cleans(
    tmp_path: Path, versions: list[AdapterVersion], fetch: CountingFetch
) -> None:
    root = tmp_path / "cache"
    first = DiskCache(root, 10**7, fetch)
    path = await first.ensure(versions[0])
    await first.ensure(versions[1])
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[100] ^= 0x01
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    (root / ".tmp" / "partial").mkdir()
    junk = root / "ab" / ("ab" + "0" * 62)
    junk.mkdir(parents=True)
    (junk / "adapter_config.json").write_text("{}")

    second = DiskCache(root, 10**7, fetch)
    assert leftovers(root) == []
    assert not junk.exists()
    assert {e.sha for e in second.entries()} == {versions[0].sha, versions[1].sha}
    await second.ensure(versions[0])  # found at start-up: full sha256 check catches the flip
    assert second.stats.verify_failures == 2
    assert second.stats.downloads == 1
    await second.ensure(versions[1])
    assert second.stats.hits == 1


async def test_lru_eviction_under_budget_with_pins(
    tmp_path: Path, versions: list[AdapterVersion], fetch: CountingFetch
) -> None:
    a, b, c = versions
    size = a.total_bytes
    assert b.total_bytes == size == c.total_bytes
    cache = DiskCache(tmp_path / "cache", 2 * size + size // 2, fetch)
    await cache.ensure(a)
    await cache.ensure(b)
    await cache.ensure(a)  # a becomes the most recently used
    await cache.ensure(c)  # evicts b
    assert [e.sha for e in cache.entries()] == [a.sha, c.sha]
    assert not cache.path_for(b.sha).exists()
    assert cache.stats.evictions == 1
    assert cache.used_bytes == 2 * size <= cache.budget_bytes

    cache.pin(a.sha)
    await cache.ensure(b)  # a is the LRU but pinned: c goes
    assert [e.sha for e in cache.entries()] == [a.sha, b.sha]
    cache.pin(b.sha)
    with pytest.raises(CapacityExceeded, match="pinned"):
        await cache.ensure(c)
    assert [e.sha for e in cache.entries()] == [a.sha, b.sha]
    assert leftovers(cache.root) == []
    cache.unpin(b.sha)
    await cache.ensure(c)
    assert [(e.sha, e.pinned) for e in cache.entries()] == [(a.sha, True), (c.sha, False)]

    assert await cache.remove(a.sha)
    assert not cache.contains(a.sha)
    assert not cache.path_for(a.sha).exists()

    with pytest.raises(CapacityExceeded, match="exceeds the cache budget"):
        await DiskCache(tmp_path / "small", size - 1, fetch).ensure(a)


async def test_full_disk_evicts_and_retries_once(
    tmp_path: Path, versions: list[AdapterVersion], fetch: CountingFetch
) -> None:
    a, b, c = versions
    cache = DiskCache(tmp_path / "cache", 10**7, fetch)
    await cache.ensure(a)
    fetch.enospc = 1
    await cache.ensure(b)  # ENOSPC: evicts a, retries, succeeds
    assert [e.sha for e in cache.entries()] == [b.sha]
    assert cache.stats.evictions == 1

    cache.pin(b.sha)
    fetch.enospc = 2
    with pytest.raises(CapacityExceeded, match="disk is full"):
        await cache.ensure(c)
    assert not cache.contains(c.sha)
    assert not cache.path_for(c.sha).exists()
    assert leftovers(cache.root) == []
