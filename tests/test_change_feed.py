"""The manifest poller on the change feed: cost per poll, missed events, partitions, clock skew.

The poller (lora_gateway.residency.manifests.ManifestPoller) is driven one `poll_once` at a
time over a real `Registry`; the backend is `MemoryBackend` (10,000 manifests in a second)
wrapped by `Recording` (counts requests, fails them all while `down`). Another replica's writes
are made with a second `Manifests` on the same backend, as a replica B would. The same feed on
the real backends (local folder, SeaweedFS) is tests/store/test_changes.py; two processes on
SeaweedFS are tests/test_replicas.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from adapter_store import BaseModelSpec, Manifest, Registry
from adapter_store.changes import ChangeFeed
from adapter_store.keys import manifest_key
from adapter_store.manifests import Manifests
from lora_gateway import devtools
from lora_gateway.metrics import Metrics
from lora_gateway.residency.keys import VersionKey
from lora_gateway.residency.manifests import ManifestCache, ManifestPoller
from lora_gateway.residency.pins import Blocks
from tests.support.memory_backend import MemoryBackend, Recording

RESYNC = 16


class NoHolder:
    """This replica holds no version (the poller's cost does not depend on it)."""

    def known(self) -> set[VersionKey]:
        return set()

    def is_resident(self, key: VersionKey) -> bool:
        return False

    def block(self, keys: list[VersionKey]) -> None:
        pass

    def unload_soon(self, keys: list[VersionKey]) -> None:
        pass


class Clock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Replica:
    """One replica's manifest cache and poller over `backend`; `applied` records what the
    poller handed over (tenant, name, shared_with)."""

    def __init__(
        self, backend: Recording, spec: BaseModelSpec, clock: Clock, *, size: int = 20_000
    ) -> None:
        self.registry = Registry(backend, spec)
        self.cache = ManifestCache(
            self.registry, Blocks(), NoHolder(), Metrics(process_metrics=False), size=size
        )
        self.applied: list[tuple[str, str, tuple[str, ...]]] = []
        self.revoked: list[tuple[str, str]] = []
        self.poller = ManifestPoller(
            self.cache,
            self._apply,
            self._revoke,
            self.cache.metrics,
            resync_per_poll=RESYNC,
            lookback_s=30.0,
            retention_s=3600.0,
            clock=clock,
        )

    async def _apply(self, manifest: Manifest) -> int:
        self.applied.append((manifest.tenant, manifest.name, manifest.shared_with))
        self.cache.take(manifest, fresh=False)
        return 0

    async def _revoke(self, tenant: str, name: str) -> int:
        self.revoked.append((tenant, name))
        self.cache.drop((tenant, name))
        return 0

    def cache_all(self, names: list[tuple[str, str]]) -> None:
        for tenant, name in names:
            self.cache.take(self.registry.get_manifest(tenant, name), fresh=True)

    async def poll(self) -> int:
        self.poller.poll_failures = 0
        return await self.poller.poll_once()


@pytest.fixture(scope="module")
def spec(tiny_model: Path) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(
        tiny_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,)
    )


def seed(backend: MemoryBackend, count: int) -> list[tuple[str, str]]:
    """`count` manifests written straight to the backend (no feed event: nobody changed them
    since the replica read them)."""
    names = [(f"t{i % 100:02d}", f"a{i:05d}") for i in range(count)]
    for tenant, name in names:
        backend.put(manifest_key(tenant, name), Manifest(tenant, name).to_json())
    return names


def writer(backend: MemoryBackend, clock: Clock) -> Manifests:
    """Another replica's manifest writer, its events stamped by `clock`."""
    manifests = Manifests(backend)
    manifests.feed = ChangeFeed(backend, clock=clock)
    return manifests


def share_with(writer: Manifests, tenant: str, name: str, grantee: str) -> None:
    """Another replica's write: the manifest changes (and the feed gets its event)."""
    writer.update(tenant, name, lambda m: replace(m, shared_with=(grantee,)))  # type: ignore[arg-type]


async def test_poll_cost_does_not_grow_with_cached_manifests(spec: BaseModelSpec) -> None:
    """10 or 10,000 manifests cached: a poll makes 1 listing + RESYNC re-reads, and a change
    made by another replica costs one more read. (Before the feed: one GET per cached
    manifest, one after another.)"""
    memory = MemoryBackend()
    names = seed(memory, 10_000)
    backend, clock = Recording(memory), Clock()
    other = writer(memory, clock)
    costs = {}
    for cached in (10, 10_000):
        clock.now += 100  # the other pass's events are out of the look-back window
        replica = Replica(backend, spec, clock)
        replica.cache_all(names[:cached])
        backend.calls.clear()
        await replica.poll()
        costs[cached] = dict(backend.calls)
        assert replica.poller.last_poll_requests == backend.total()

        changed = [names[3], names[cached // 2], names[cached - 1]]
        for tenant, name in changed:
            share_with(other, tenant, name, f"g{cached}")
        clock.now += 2
        backend.calls.clear()
        assert await replica.poll() >= 3
        assert {(t, n) for t, n, shared in replica.applied if shared == (f"g{cached}",)} == set(
            changed
        )
        assert backend.calls["list_page"] == 1
        assert backend.calls["get_if_changed"] <= RESYNC + len(changed)
        assert not replica.poller.poll_failures
    print(f"\nstore requests per poll, by cached manifests: {costs}")
    assert costs[10] == {"list_page": 1, "get_if_changed": 10}
    assert costs[10_000] == {"list_page": 1, "get_if_changed": RESYNC}


async def test_what_the_feed_names_is_re_read_before_the_resync_slice(
    spec: BaseModelSpec,
) -> None:
    """The propagation bound's critical path is the listing and the named manifest's re-read:
    the resync slice's reads come after it, never before or alongside."""
    memory = MemoryBackend()
    names = seed(memory, 100)
    backend, clock = Recording(memory), Clock()
    replica = Replica(backend, spec, clock)
    replica.cache_all(names)
    tenant, name = names[90]  # not in the first resync slice (sorted names, 16 from the start)
    share_with(writer(memory, clock), tenant, name, "first")
    clock.now += 2
    backend.order.clear()
    await replica.poll()
    methods = [method for method, _ in backend.order]
    assert methods == ["list_page"] + ["get_if_changed"] * (1 + RESYNC)
    assert backend.order[1] == ("get_if_changed", manifest_key(tenant, name))
    assert (tenant, name, ("first",)) in replica.applied


async def test_a_missed_event_is_caught_by_the_resync_pass(spec: BaseModelSpec) -> None:
    """A manifest rewritten without its event (a writer that died between the two) is applied
    within ceil(cached / RESYNC) polls."""
    memory = MemoryBackend()
    names = seed(memory, 100)
    replica = Replica(Recording(memory), spec, Clock())
    replica.cache_all(names)
    tenant, name = names[57]
    memory.put(manifest_key(tenant, name), Manifest(tenant, name, shared_with=("late",)).to_json())
    polls = 0
    while (tenant, name, ("late",)) not in replica.applied:
        polls += 1
        assert polls <= -(-100 // RESYNC), "the resync pass missed the change"
        await replica.poll()


async def test_a_partitioned_replica_converges(spec: BaseModelSpec) -> None:
    """While the store is unreachable the polls fail (and do not count as complete); 1,500
    changes made meanwhile (two listings' worth) all apply at the first poll after."""
    memory = MemoryBackend()
    names = seed(memory, 1_500)
    backend, clock = Recording(memory), Clock()
    replica = Replica(backend, spec, clock)
    replica.cache_all(names)
    replica.poller.resync_per_poll = 0  # only the feed can bring the changes
    await replica.poll()
    backend.down = True
    other = writer(memory, clock)
    for tenant, name in names:
        share_with(other, tenant, name, "after")
        clock.now += 0.01  # the writes take 15 s in all
    await replica.poll()
    assert replica.poller.poll_failures > 0
    assert replica.applied == []
    backend.down = False
    clock.now += 2
    backend.calls.clear()
    assert await replica.poll() == 1_500
    assert not replica.poller.poll_failures
    assert {(t, n) for t, n, shared in replica.applied if shared == ("after",)} == set(names)
    assert backend.calls["list_page"] == 2
    # Each change applies once: the next poll lists the same look-back window again (the
    # events are 2-17 s old) but re-reads none of them.
    replica.applied.clear()
    backend.calls.clear()
    clock.now += 2
    assert await replica.poll() == 0
    assert dict(backend.calls) == {"list_page": 2}


async def test_events_stamped_early_by_a_skewed_clock_are_seen(spec: BaseModelSpec) -> None:
    """A writer whose clock is 20 s behind (inside the 30 s look-back) stamps its event before
    the reader's last listing: the next poll still applies it."""
    memory = MemoryBackend()
    names = seed(memory, 20)
    clock = Clock()
    replica = Replica(Recording(memory), spec, clock)
    replica.cache_all(names)
    replica.poller.resync_per_poll = 0
    await replica.poll()
    behind = writer(memory, Clock(clock.now - 20))
    clock.now += 2
    share_with(behind, *names[4], "skewed")
    await replica.poll()
    assert (*names[4], ("skewed",)) in replica.applied


async def test_a_partition_longer_than_the_retention_resyncs_everything(
    spec: BaseModelSpec,
) -> None:
    """Down for longer than the events are kept: the first poll after re-reads every cached
    manifest (whatever the feed still holds), and a change whose event expired is applied."""
    memory = MemoryBackend()
    names = seed(memory, 200)
    backend, clock = Recording(memory), Clock()
    replica = Replica(backend, spec, clock)
    replica.cache_all(names)
    replica.poller.resync_per_poll = 0
    await replica.poll()
    backend.down = True
    tenant, name = names[150]
    memory.put(manifest_key(tenant, name), Manifest(tenant, name, shared_with=("old",)).to_json())
    clock.now += 3600
    await replica.poll()
    backend.down = False
    backend.calls.clear()
    await replica.poll()
    assert (tenant, name, ("old",)) in replica.applied
    assert backend.calls["get_if_changed"] == 200


async def test_other_replicas_uploads_are_found_at_once_and_a_deleted_adapter_is_revoked(
    spec: BaseModelSpec,
) -> None:
    """A name remembered as missing is forgotten when its event arrives (found on its next use,
    not one poll interval later); a cached manifest that is gone revokes the whole adapter."""
    memory = MemoryBackend()
    names = seed(memory, 3)
    clock = Clock()
    replica = Replica(Recording(memory), spec, clock)
    replica.cache_all(names)
    replica.cache.poll_interval_s = 3600.0  # misses would otherwise be remembered for an hour
    with pytest.raises(Exception, match="not found"):
        await replica.cache.manifest("t00", "new")
    writer(memory, clock).update("t00", "new", lambda m: Manifest("t00", "new"))
    clock.now += 2
    await replica.poll()
    assert (await replica.cache.manifest("t00", "new")).name == "new"
    memory.delete(manifest_key(*names[1]))
    replica.poller.resync_per_poll = 3
    await replica.poll()
    assert replica.revoked == [names[1]]


async def test_expired_events_are_deleted(spec: BaseModelSpec, tmp_path: Path) -> None:
    """Events older than the retention are deleted by the poller (about once a minute of
    retention / 60), newer ones kept; on the local folder nothing of them is left."""
    from adapter_store import LocalBackend

    local = LocalBackend(tmp_path / "store")
    clock = Clock()
    other = writer(local, clock)  # type: ignore[arg-type]
    for i in range(3):
        other.update("t00", f"n{i}", lambda m, i=i: Manifest("t00", f"n{i}"))
    clock.now += 3000
    other.update("t00", "n3", lambda m: Manifest("t00", "n3"))
    clock.now += 1000
    replica = Replica(Recording(local), spec, clock)  # type: ignore[arg-type]
    replica.poller.retention_s = 3600.0
    clock.now += 61
    await replica.poll()
    left = local.list("events/")
    assert len(left) == 1
    assert left[0].endswith("/n3")
    assert sorted(p.name for p in (tmp_path / "store" / "events").iterdir()) == [
        left[0].split("/")[1]
    ]


def test_settings_of_the_feed_are_validated() -> None:
    from lora_gateway import errors
    from lora_gateway.config import Settings

    settings = Settings()
    assert (settings.manifest_resync_per_poll, settings.change_feed_lookback_s) == (16, 30.0)
    with pytest.raises(errors.InvalidArgument, match="change_feed_retention_s"):
        Settings.from_mapping({"change_feed_retention_s": 60, "change_feed_lookback_s": 30})


async def test_the_resync_rotation_visits_every_cached_name_once_per_turn(
    spec: BaseModelSpec,
) -> None:
    """The round-robin resync takes the next names of a rotation (no sort of the whole cache
    each poll): every cached name once per turn, evicted ones skipped, and the rotation stays
    within twice the cache however much it churns."""
    memory = MemoryBackend()
    names = seed(memory, 30)
    replica = Replica(Recording(memory), spec, Clock())
    replica.cache_all(names)
    cache = replica.cache
    turn = [name for _ in range(5) for name in cache.next_to_resync(6)]
    assert sorted(turn) == sorted(names)
    for name in names[:10]:
        del cache.cached[name]
    turn = [name for _ in range(4) for name in cache.next_to_resync(5)]
    assert sorted(turn) == sorted(names[10:])
    small = Replica(Recording(memory), spec, Clock(), size=20).cache
    for i in range(1000):
        small.take(Manifest("t00", f"c{i % 50}"), fresh=True)
        assert len(small.rotation) <= 2 * len(small.cached) + 17
    assert len(small.cached) == 20
    assert sorted(small.next_to_resync(20)) == sorted(small.cached)


def test_caching_a_manifest_that_revokes_nothing_never_lists_every_held_version(
    spec: BaseModelSpec,
) -> None:
    """`take` looks through every version this replica holds only for a manifest that revokes
    something (with 10,000 resident, that look cost O(n) at every manifest read)."""

    class Counting(NoHolder):
        looks = 0

        def known(self) -> set[VersionKey]:
            Counting.looks += 1
            return {("t00", "a", "0" * 64)}

    cache = ManifestCache(
        Registry(Recording(MemoryBackend()), spec),
        Blocks(),
        Counting(),
        Metrics(process_metrics=False),
    )
    for i in range(5):
        cache.take(Manifest("t00", f"n{i}"), fresh=True)
    assert Counting.looks == 0
    assert cache.take(Manifest("t00", "a", revoked=("0" * 64,)), fresh=True) == [
        ("t00", "a", "0" * 64)
    ]
    assert Counting.looks == 1
