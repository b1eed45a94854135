"""The disk cache: single-flight, verification, LRU under a byte budget, pins, full disks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from adapter_store import AdapterVersion, CapacityExceeded, DiskCache, Registry
from adapter_store.model import CHAT_TEMPLATE_FILE, WEIGHTS_FILE
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


async def test_a_chat_template_is_cached_and_verified_with_the_version(
    tmp_path: Path, local_registry: Registry, good_adapter: Path, fetch: CountingFetch
) -> None:
    folder = tmp_path / "templated"
    shutil.copytree(good_adapter, folder)
    (folder / CHAT_TEMPLATE_FILE).write_text("{{ messages }}")
    version = local_registry.upload_dir(
        "acme", "bot", folder, created_by="t", check_template=lambda text: None
    )
    root = tmp_path / "cache"
    path = await DiskCache(root, 10**7, fetch).ensure(version)
    assert (path / CHAT_TEMPLATE_FILE).read_text() == "{{ messages }}"
    assert version.total_bytes == sum(f.stat().st_size for f in path.iterdir())
    (path / CHAT_TEMPLATE_FILE).write_text("{{ message }}")  # same size, other bytes
    again = DiskCache(root, 10**7, fetch)  # a restart: kept, then fully verified on first use
    assert [e.sha for e in again.entries()] == [version.sha]
    assert await again.ensure(version) == path
    assert again.stats.verify_failures == 1
    assert (path / CHAT_TEMPLATE_FILE).read_text() == "{{ messages }}"
    (path / "tokenizer.json").write_text("{}")  # a file no version holds: the entry goes
    assert DiskCache(root, 10**7, fetch).entries() == []


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


# --- hostile tenants: the byte budget under concurrency, shared bytes (issue 12) -------------


def bytes_on_disk(root: Path) -> int:
    """What the cache really holds on disk: every file under its root, temp folders included."""
    total = 0
    for folder, _, files in os.walk(root):  # os.walk skips folders deleted while it walks
        for name in files:
            with contextlib.suppress(OSError):  # deleted while we walked
                total += os.stat(os.path.join(folder, name)).st_size
    return total


class DiskSampler:
    """A thread measuring the real size of a folder every millisecond; keeps the peak."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, bytes_on_disk(self.root))
            self.samples += 1
            self._stop.wait(0.001)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class SlowFetch(CountingFetch):
    """Writes each file, then holds it in the temp folder a while: downloads overlap."""

    def __init__(self, registry: Registry, hold_s: float) -> None:
        super().__init__(registry)
        self.hold_s = hold_s

    def __call__(self, version: AdapterVersion, filename: str, dest: Path) -> None:
        super().__call__(version, filename, dest)
        time.sleep(self.hold_s)


@pytest.fixture
def six_versions(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> list[AdapterVersion]:
    return [
        local_registry.upload_dir(
            "acme", f"six-{seed}", make_test_adapter(seed=seed), created_by="t"
        )
        for seed in range(21, 27)
    ]


async def test_concurrent_cold_downloads_never_overshoot_the_budget(
    tmp_path: Path, local_registry: Registry, six_versions: list[AdapterVersion]
) -> None:
    """Room for two and a half versions, two cached, four cold downloads at once: the bytes
    really on disk (sampled every ms, temp folders included) never exceed the budget. Before
    the fix each download took its reservation after awaiting its evictions, so concurrent
    downloads counted the same free bytes: the peak was about 4 versions."""
    size = six_versions[0].total_bytes
    assert all(v.total_bytes == size for v in six_versions)
    budget = 2 * size + size // 2
    root = tmp_path / "cache"
    cache = DiskCache(root, budget, SlowFetch(local_registry, hold_s=0.15))
    for version in six_versions[:2]:
        await cache.ensure(version)
    with DiskSampler(root) as sampler:
        results = await asyncio.gather(
            *(cache.ensure(v) for v in six_versions[2:]), return_exceptions=True
        )
    served = [r for r in results if isinstance(r, Path)]
    refused = [r for r in results if isinstance(r, CapacityExceeded)]
    assert len(served) + len(refused) == 4, results
    assert len(served) >= 2, results  # what fits is served; the rest is refused cleanly
    print(
        f"\nconcurrent cold downloads: budget {budget} B ({budget / size:.1f} versions), peak "
        f"on disk {sampler.peak} B ({sampler.peak / size:.2f} versions) over {sampler.samples} "
        f"samples; {len(served)} served, {len(refused)} refused"
    )
    assert sampler.samples > 20
    assert sampler.peak <= budget
    assert cache.used_bytes <= budget
    assert cache.reserved_bytes == 0
    assert bytes_on_disk(root) == cache.used_bytes
    assert leftovers(root) == []


async def test_shared_bytes_are_kept_while_another_owner_uses_them(
    tmp_path: Path, local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    """Two tenants, identical bytes, one folder: one owner's release keeps the folder for the
    other; the last release deletes it. `contains(owner=...)` answers per owner."""
    folder = make_test_adapter(seed=31)
    a = local_registry.upload_dir("acme", "same", folder, created_by="t")
    b = local_registry.upload_dir("globex", "twin", folder, created_by="t")
    assert a.sha == b.sha
    fetch = CountingFetch(local_registry)
    cache = DiskCache(tmp_path / "cache", 10**7, fetch)
    path = await cache.ensure(a, owner="acme/same")
    assert cache.contains(a.sha, owner="acme/same")
    assert not cache.contains(b.sha, owner="globex/twin")  # never fetched for globex
    assert cache.contains(a.sha)  # the bytes are there
    assert await cache.ensure(b, owner="globex/twin") == path
    assert fetch.calls == 2  # one download (two files) for both
    assert cache.owners(a.sha) == {"acme/same", "globex/twin"}

    assert not await cache.release(a.sha, "acme/same")
    assert path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == sorted(f.filename for f in b.files)
    assert cache.contains(b.sha, owner="globex/twin")
    assert not cache.contains(a.sha, owner="acme/same")

    assert await cache.release(b.sha, "globex/twin")
    assert not path.exists()
    assert not cache.contains(b.sha)


async def test_release_waits_for_a_download_another_owner_joined(
    tmp_path: Path, local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    """acme's release starts while the download is in flight and no owner is left; globex then
    asks for the same bytes: the check is repeated after the download, and the folder stays."""
    folder = make_test_adapter(seed=32)
    a = local_registry.upload_dir("acme", "same", folder, created_by="t")
    b = local_registry.upload_dir("globex", "twin", folder, created_by="t")
    fetch = CountingFetch(local_registry)
    cache = DiskCache(tmp_path / "cache", 10**7, fetch)
    fetch.gate.clear()
    first = asyncio.create_task(cache.ensure(a, owner="acme/same"))
    await asyncio.sleep(0.05)
    released = asyncio.create_task(cache.release(a.sha, "acme/same"))
    await asyncio.sleep(0.05)  # acme's release now waits for the download: no owner is left
    second = asyncio.create_task(cache.ensure(b, owner="globex/twin"))
    await asyncio.sleep(0.05)
    fetch.gate.set()
    path = await second
    assert await first == path
    assert not await released
    assert path.is_dir()
    assert cache.contains(b.sha, owner="globex/twin")
