"""Residency policies, fast: the LRU, slots, pins and revocation over an in-memory engine.

In the style of Ray Serve's `test_load_models_concurrently`: many concurrent users of more
versions than the engine holds, the capacity bound asserted throughout. The engine is
`tests/support/fake_engine.FakeEngine` (it refuses an add beyond capacity and "dies" on an
adapter whose files are gone); the store is a real `Registry` on a local folder, the disk cache
the real `DiskCache`. End-to-end behaviour on the real engine is in test_gateway.py and
tests/faults/test_residency_hostile.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter_store import (
    AdapterRef,
    AdapterVersion,
    BaseModelSpec,
    DiskCache,
    IntegrityError,
    Limits,
    LocalBackend,
    Registry,
)
from lora_gateway import devtools, errors
from lora_gateway.residency import Residency, key_of
from lora_gateway.tenancy import TenantConfig
from tests.conftest import AdapterFactory
from tests.support.fake_engine import FakeEngine
from tests.support.metrics import load_seconds, residency_counts


class GatedFetch:
    """Registry.fetch_file, held at a gate while the gate is closed; can corrupt one sha."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.gate = threading.Event()
        self.gate.set()
        self.corrupt: set[str] = set()

    def __call__(self, version: AdapterVersion, filename: str, dest: Path) -> None:
        assert self.gate.wait(10)
        self.registry.fetch_file(version, filename, dest)
        if version.sha in self.corrupt:
            dest.write_bytes(b"not what the manifest says")


@dataclass
class Env:
    engine: FakeEngine
    registry: Registry
    cache: DiskCache
    fetch: GatedFetch
    residency: Residency
    adapters: AdapterFactory

    async def upload(self, tenant: str, name: str, seed: int) -> AdapterVersion:
        folder = self.adapters(seed=seed, rank=8)
        return await asyncio.to_thread(
            self.registry.upload_dir, tenant, name, folder, created_by="t"
        )


@pytest.fixture(scope="module")
def spec(tiny_model: Path) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(
        tiny_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,)
    )


@pytest.fixture
def make_env(tmp_path: Path, spec: BaseModelSpec, make_test_adapter: AdapterFactory) -> object:
    made: list[Residency] = []

    def make(capacity: int = 3, **engine: float) -> Env:
        fake = FakeEngine(max_loras=min(2, capacity), max_cpu_loras=capacity, **engine)
        registry = Registry(LocalBackend(tmp_path / "store"), spec)
        fetch = GatedFetch(registry)
        cache = DiskCache(tmp_path / "cache", 10**8, fetch)
        residency = Residency(fake, registry, cache, spec, Limits(), poll_interval_s=0.2)
        residency.slot_wait_s = 5.0
        made.append(residency)
        return Env(fake, registry, cache, fetch, residency, make_test_adapter)

    return make


def tenant(name: str, *, slots: int = 2, pins: int = 2) -> TenantConfig:
    return TenantConfig(name, max_engine_slots=slots, max_pins=pins)


async def until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, 10 s at most (loads run in threads: their time is the
    machine's, not the test's)."""
    async with asyncio.timeout(10):
        while True:  # polled: the conditions are plain state, nothing to wait on
            if condition():
                return
            await asyncio.sleep(0.01)


def resident(env: Env, *versions: AdapterVersion) -> Callable[[], bool]:
    return lambda: all(env.residency.is_resident(key_of(v)) for v in versions)


# --- the LRU under concurrency ----------------------------------------------------------------


async def test_load_models_concurrently_capacity_bound(make_env: object) -> None:
    """64 concurrent requests over 8 versions, capacity 3: the engine never holds more than 3,
    every request is served by its own version, each version is loaded once per stay."""
    env: Env = make_env(capacity=3)  # type: ignore[operator]
    versions = [await env.upload("acme", f"v{i}", seed=300 + i) for i in range(8)]
    rng = random.Random(3)
    over: list[int] = []

    async def one(i: int) -> None:
        version = versions[rng.randrange(len(versions))]
        async with env.residency.use(version, tenant("acme", slots=3)) as loaded:
            assert env.engine.held[loaded.lora_int_id].lora_name.endswith(version.sha)
            over.append(len(env.engine.held))
            await asyncio.sleep(rng.uniform(0, 0.02))

    await asyncio.gather(*(one(i) for i in range(64)))
    assert env.engine.faults == []
    assert env.engine.peak <= 3
    assert max(over) <= 3
    assert len(env.residency.resident_versions()) <= 3
    assert residency_counts(env.residency.metrics).engine_loads == len(env.engine.adds)
    assert residency_counts(env.residency.metrics).evictions == len(env.engine.removes) > 0


async def test_load_before_evict(make_env: object) -> None:
    """A newcomer that fails to fetch (bytes do not match) never evicts anyone; one still
    downloading leaves the residents serving; only once it is ready is the LRU one evicted."""
    env: Env = make_env(capacity=2, remove_delay_s=0.5)  # type: ignore[operator]
    metrics = env.residency.metrics
    a, b, bad, c = [await env.upload("acme", n, seed=310 + i) for i, n in enumerate("abxc")]
    await env.residency.prefetch(a)
    await env.residency.prefetch(b)
    assert load_seconds(metrics, "evict") == (0, 0.0)  # free slots: nothing to make room for
    env.fetch.corrupt.add(bad.sha)
    with pytest.raises(IntegrityError):
        await env.residency.prefetch(bad)
    assert env.engine.removes == []
    assert {v.sha for v in env.residency.resident_versions()} == {a.sha, b.sha}

    env.fetch.gate.clear()
    loading = asyncio.create_task(env.residency.prefetch(c))
    await asyncio.sleep(0.1)
    async with env.residency.use(a) as loaded:  # still resident, still served
        assert loaded.lora_int_id in env.engine.held
    assert env.engine.removes == []
    added_before = load_seconds(metrics, "engine_add")
    env.fetch.gate.set()
    assert (await loading).tier == "engine"
    assert {v.sha for v in env.residency.resident_versions()} == {a.sha, c.sha}  # b was LRU
    assert env.engine.faults == []
    # c's load made room: the eviction (0.5 s here) is its own phase, not part of engine_add.
    evicts, evict_s = load_seconds(metrics, "evict")
    assert evicts == 1
    assert evict_s >= 0.5
    adds, add_s = load_seconds(metrics, "engine_add")
    assert adds == added_before[0] + 1
    assert add_s - added_before[1] < 0.5


async def test_validation_runs_once_per_sha256(
    make_env: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14's load path: a version evicted and loaded again is not validated again (its
    disk copy was verified and validated on the first load); every new sha256 is."""
    from lora_gateway.residency import loads

    validated: list[set[str]] = []
    real = loads.validate_adapter

    def counting(files: dict[str, Path], *args: object) -> object:
        validated.append({p.parent.name for p in files.values()})
        return real(files, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loads, "validate_adapter", counting)
    env: Env = make_env(capacity=2)  # type: ignore[operator]
    a, b, c = [await env.upload("acme", n, seed=330 + i) for i, n in enumerate("abc")]
    for version in (a, b, c, a, b):  # capacity 2: every step after the second evicts
        await env.residency.prefetch(version)
    assert len(env.engine.removes) == 3
    assert len(validated) == 3
    assert residency_counts(env.residency.metrics).engine_loads == 5


async def test_a_cold_burst_does_not_flush_a_hot_adapter(make_env: object) -> None:
    """Segmented LRU: `hot`, used twice, stays resident while 8 one-off cold adapters go
    through a capacity of 3 (plain LRU, before: evicted by the third cold one)."""
    env: Env = make_env(capacity=3)  # type: ignore[operator]
    hot = await env.upload("acme", "hot", seed=340)
    cold = [await env.upload("acme", f"cold{i}", seed=341 + i) for i in range(8)]
    for _ in range(2):
        async with env.residency.use(hot, tenant("acme", slots=3)):
            pass
    for version in cold:
        async with env.residency.use(version, tenant("acme", slots=3)):
            pass
        assert env.residency.is_resident(key_of(hot)), version.name
    assert len(env.engine.removes) == len(cold) - 2
    # Used once more, a cold one is protected too; the hot one is not special otherwise:
    # with every idle resident protected, the least recently used goes.
    last = cold[-1]
    async with env.residency.use(last, tenant("acme", slots=3)):
        pass
    extra = [await env.upload("acme", f"extra{i}", seed=360 + i) for i in range(3)]
    for version in extra:
        async with env.residency.use(version, tenant("acme", slots=3)):
            pass
    assert env.residency.is_resident(key_of(hot))
    assert env.residency.is_resident(key_of(last))


async def test_the_host_tier_is_bounded_in_bytes(make_env: object) -> None:
    """host_lora_budget_bytes: the versions loaded never weigh more than the budget, by their
    weights files' real sizes (read here from the uploaded folders); a load evicts as many idle
    versions as it needs; a version larger than the whole budget is refused at once and
    evicts nobody."""
    env: Env = make_env(capacity=8)  # type: ignore[operator]
    folders = {
        name: env.adapters(seed=370 + i, rank=rank)
        for i, (name, rank) in enumerate([("a", 8), ("b", 8), ("c", 8), ("d", 8), ("big", 16)])
    }
    size = {n: (f / "adapter_model.safetensors").stat().st_size for n, f in folders.items()}
    assert size["big"] > 1.8 * size["a"]
    budget = int(2.5 * size["a"])
    env.residency.slots.host_budget_bytes = budget
    versions = {
        name: await asyncio.to_thread(env.registry.upload_dir, "acme", name, f, created_by="t")
        for name, f in folders.items()
    }

    def held_bytes() -> int:
        return sum(size[v.name] for v in env.residency.resident_versions())

    for name in "abcd":
        await env.residency.prefetch(versions[name])
        assert held_bytes() <= budget
    assert [v.name for v in env.residency.resident_versions()] == ["c", "d"]
    await env.residency.prefetch(versions["big"])  # 2 x 8-rank: both others go
    assert [v.name for v in env.residency.resident_versions()] == ["big"]
    assert len(env.engine.removes) == 4
    env.residency.slots.host_budget_bytes = size["a"] // 2
    with pytest.raises(errors.ResourceExhausted, match="host_lora_budget_bytes"):
        await env.residency.prefetch(versions["a"])
    assert len(env.engine.removes) == 4


async def test_a_version_weighs_at_least_the_smallest_full_adapter(
    make_env: object, tiny_model: Path
) -> None:
    """With a byte budget a version counts as at least the smallest adapter that changes every
    layer (so that the count derived from the budget never binds first). Set here above the
    real files' size: two versions that fit by their files no longer fit together."""
    # The tiny model: hidden 128, k_proj 128 -> 64 (1 KV head of 64), 2 layers.
    tiny = BaseModelSpec.from_hf_config(tiny_model, max_rank=16, dtype="float32")
    assert tiny.smallest_full_adapter_bytes() == (128 + 64) * 2 * 4
    assert (
        BaseModelSpec.from_hf_config(
            tiny_model, max_rank=16, dtype="bfloat16"
        ).smallest_full_adapter_bytes()
        == (128 + 64) * 2 * 2
    )
    env: Env = make_env(capacity=8)  # type: ignore[operator]
    folders = [env.adapters(seed=380 + i, rank=8) for i in range(2)]
    size = (folders[0] / "adapter_model.safetensors").stat().st_size
    versions = [
        await asyncio.to_thread(env.registry.upload_dir, "acme", f"w{i}", f, created_by="t")
        for i, f in enumerate(folders)
    ]
    slots = env.residency.slots
    slots.host_budget_bytes = int(2.5 * size)
    slots.smallest_adapter_bytes = int(1.3 * size)
    assert slots.host_bytes(versions[0]) == int(1.3 * size)
    for version in versions:
        await env.residency.prefetch(version)
    assert [v.name for v in env.residency.resident_versions()] == ["w1"]
    slots.smallest_adapter_bytes = 0  # by their files alone, both fit
    await env.residency.prefetch(versions[0])
    assert sorted(v.name for v in env.residency.resident_versions()) == ["w0", "w1"]


# --- pins -------------------------------------------------------------------------------------


async def test_concurrent_pins_never_exceed_the_caps(make_env: object) -> None:
    """20 concurrent pins of cold versions by two tenants (2 pins each), capacity 4 (3 pins in
    all): the pins are reserved before anything is awaited, so the caps hold exactly and one
    slot stays free for everyone else."""
    env: Env = make_env(capacity=4)  # type: ignore[operator]
    acme, globex = tenant("acme", pins=2, slots=3), tenant("globex", pins=2, slots=3)
    mine = [await env.upload("acme", f"p{i}", seed=320 + i) for i in range(10)]
    theirs = [await env.upload("globex", f"p{i}", seed=330 + i) for i in range(10)]
    env.fetch.gate.clear()  # every pin is then "cold" while the others check the caps
    calls = [env.residency.pin(v, acme) for v in mine]
    calls += [env.residency.pin(v, globex) for v in theirs]
    pending = asyncio.gather(*calls, return_exceptions=True)
    await asyncio.sleep(0.1)
    env.fetch.gate.set()
    results = await pending
    pinned = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
    assert len(pinned) + len(refused) == 20, results
    assert len(pinned) == env.residency.pins() == 3
    assert env.residency.pins("acme") <= 2
    assert env.residency.pins("globex") <= 2
    assert all(e.pinned and e.tier == "engine" for e in pinned)
    # Ten pins of one version count once.
    again = await asyncio.gather(*(env.residency.pin(pinned[0].version, None) for _ in range(10)))
    assert all(e.pinned for e in again)
    assert env.residency.pins() == 3
    # The free slot: a cold version of a third tenant loads.
    other = await env.upload("initech", "free", seed=340)
    assert (await env.residency.prefetch(other, tenant("initech"))).tier == "engine"
    assert env.engine.peak <= 4
    assert env.engine.faults == []


async def test_unpin_and_failed_pin_release_the_reservation(make_env: object) -> None:
    env: Env = make_env(capacity=3)  # type: ignore[operator]
    acme = tenant("acme", pins=1)
    a, bad, b = [await env.upload("acme", n, seed=350 + i) for i, n in enumerate("axb")]
    env.fetch.corrupt.add(bad.sha)
    with pytest.raises(IntegrityError):
        await env.residency.pin(bad, acme)
    assert env.residency.pins("acme") == 0  # a failed pin does not keep its reservation
    await env.residency.pin(a, acme)
    with pytest.raises(errors.ResourceExhausted, match="at most 1"):
        await env.residency.pin(b, acme)
    await env.residency.unpin(a)
    assert (await env.residency.pin(b, acme)).pinned


# --- engine slots per tenant ------------------------------------------------------------------


async def test_a_flooding_tenant_holds_at_most_its_share(make_env: object) -> None:
    """flood opens 6 requests on 6 versions and keeps them open: it holds 2 slots (its cap),
    the other 4 wait in its own queue; calm still gets a slot at once, and flood's waiters are
    served in order as its requests end."""
    env: Env = make_env(capacity=3)  # type: ignore[operator]
    flood, calm = tenant("flood", slots=2), tenant("calm", slots=2)
    versions = [await env.upload("flood", f"f{i}", seed=360 + i) for i in range(6)]
    mine = await env.upload("calm", "mine", seed=370)
    release = [asyncio.Event() for _ in versions]
    order: list[int] = []

    async def hold(i: int) -> None:
        async with env.residency.use(versions[i], flood):
            order.append(i)
            await release[i].wait()

    tasks = [asyncio.create_task(hold(i)) for i in range(6)]
    await until(lambda: len(order) == 2)
    await asyncio.sleep(0.1)  # nothing else gets in
    assert env.residency.tenant_slots("flood") == 2
    assert sorted(order) == [0, 1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with env.residency.use(mine, calm) as loaded:
        took = loop.time() - started
        assert loaded.lora_int_id in env.engine.held
    assert took < 0.5, took
    for i in range(6):
        release[i].set()
        await until(lambda i=i: len(order) >= min(6, i + 3))  # the next waiter got its slot
    await asyncio.gather(*tasks)
    assert order[2:] == [2, 3, 4, 5]  # flood's waiters, in arrival order
    assert residency_counts(env.residency.metrics).tenant_slot_waits == 4
    assert env.engine.peak <= 3
    assert env.engine.faults == []


async def test_a_tenants_share_of_the_host_tier_is_in_bytes(make_env: object) -> None:
    """With a host byte budget, the versions one tenant's requests hold weigh at most its
    `max_host_bytes`: big holds 2 of its versions (its share), a third waits in its own queue
    and is refused after the wait, while calm's version loads at once. One version is always
    allowed, even one larger than the share."""
    env: Env = make_env(capacity=8)  # type: ignore[operator]
    folders = [env.adapters(seed=390 + i, rank=8) for i in range(4)]
    versions = [
        await asyncio.to_thread(
            env.registry.upload_dir, "big" if i < 3 else "calm", f"v{i}", f, created_by="t"
        )
        for i, f in enumerate(folders)
    ]
    slots = env.residency.slots
    size = sum(
        (folders[0] / name).stat().st_size
        for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    slots.host_budget_bytes = 4 * size
    assert {slots.host_bytes(v) for v in versions} == {size}
    big = TenantConfig("big", max_engine_slots=6, max_host_bytes=2 * size)
    calm = TenantConfig("calm", max_engine_slots=6, max_host_bytes=2 * size)
    release = asyncio.Event()
    entered: list[int] = []

    async def hold(i: int) -> None:
        async with env.residency.use(versions[i], big):
            entered.append(i)
            await release.wait()

    tasks = [asyncio.create_task(hold(i)) for i in range(2)]
    await until(lambda: len(entered) == 2)
    assert slots.tenant_bytes("big") == 2 * size
    env.residency.slot_wait_s = 0.3
    slots.slot_wait_s = 0.3
    with pytest.raises(errors.ResourceExhausted, match=r"bytes of the host tier \(limit"):
        async with env.residency.use(versions[2], big):
            pass
    async with env.residency.use(versions[3], calm) as loaded:  # calm is not held up
        assert loaded.lora_int_id in env.engine.held
    waiter = asyncio.create_task(hold(2))
    await asyncio.sleep(0.1)
    assert sorted(entered) == [0, 1]  # the third still waits for big's share
    slots.slot_wait_s = 5.0
    release.set()
    await asyncio.gather(*tasks)
    release.clear()
    await until(lambda: len(entered) == 3)
    release.set()
    await waiter
    small = TenantConfig("big", max_engine_slots=6, max_host_bytes=size // 2)
    async with env.residency.use(versions[0], small) as loaded:  # larger than the share
        assert loaded.lora_int_id in env.engine.held
    assert env.engine.faults == []


async def test_slot_wait_is_bounded(make_env: object) -> None:
    env: Env = make_env(capacity=2)  # type: ignore[operator]
    env.residency.slot_wait_s = 0.3
    busy = [await env.upload("acme", f"b{i}", seed=380 + i) for i in range(2)]
    cold = await env.upload("acme", "cold", seed=382)
    done = asyncio.Event()

    async def hold(v: AdapterVersion) -> None:
        async with env.residency.use(v):
            await done.wait()

    tasks = [asyncio.create_task(hold(v)) for v in busy]
    await until(resident(env, *busy))
    with pytest.raises(errors.ResourceExhausted, match="slots are busy"):
        await env.residency.prefetch(cold)
    done.set()
    await asyncio.gather(*tasks)
    assert (await env.residency.prefetch(cold)).tier == "engine"


async def test_revocation_never_waits_behind_a_load_waiting_for_a_slot(make_env: object) -> None:
    """Every slot busy, a load queued for one: revoking a resident version takes milliseconds
    (before the fix `_load` held the engine lock while waiting, up to 30 s, and `unload` waited
    for that lock); the queued load then takes the freed slot; a queued load whose own version
    is revoked fails at once with NOT_FOUND."""
    env: Env = make_env(capacity=2)  # type: ignore[operator]
    a, b, c, d = [await env.upload("acme", n, seed=390 + i) for i, n in enumerate("abcd")]
    done = asyncio.Event()

    async def hold(v: AdapterVersion) -> None:
        async with env.residency.use(v):
            await done.wait()

    holders = [asyncio.create_task(hold(v)) for v in (a, b)]
    await until(resident(env, a, b))
    queued_c = asyncio.create_task(env.residency.prefetch(c))
    queued_d = asyncio.create_task(env.residency.prefetch(d))
    await until(lambda: residency_counts(env.residency.metrics).slot_waits >= 2)  # both queued
    assert not queued_c.done()
    loop = asyncio.get_running_loop()
    started = loop.time()
    env.residency.block([key_of(d)])
    with pytest.raises(errors.NotFound):
        await asyncio.wait_for(queued_d, 1.0)
    env.residency.block([key_of(a)])
    await asyncio.wait_for(env.residency.unload([key_of(a)]), 1.0)
    took = loop.time() - started
    assert took < 0.2, took
    assert residency_counts(env.residency.metrics).revoked_unloads == 1  # a; d never loaded
    assert (await asyncio.wait_for(queued_c, 2.0)).tier == "engine"
    done.set()
    await asyncio.gather(*holders)
    assert env.engine.faults == []


# --- revocation of loads in progress ----------------------------------------------------------


async def test_whole_adapter_block_stops_loads_in_progress(make_env: object) -> None:
    """A whole-adapter block (what another replica's poller applies) reaches loads still
    fetching and loads inside the engine add, and versions this replica never saw."""
    env: Env = make_env(capacity=3, add_delay_s=0.2)  # type: ignore[operator]
    fetching = await env.upload("acme", "gone", seed=400)
    adding = await env.upload("acme", "gone2", seed=401)
    env.fetch.gate.clear()
    first = asyncio.create_task(env.residency.prefetch(fetching))
    await asyncio.sleep(0.05)
    env.residency.block_name("acme", "gone")
    env.fetch.gate.set()
    with pytest.raises(errors.NotFound):
        await first
    assert env.engine.adds == []

    second = asyncio.create_task(env.residency.prefetch(adding))
    await asyncio.sleep(0.1)  # inside the engine's add now
    keys = env.residency.block_name("acme", "gone2")
    assert key_of(adding) in keys
    await env.residency.unload(keys)
    with pytest.raises(errors.NotFound):
        await second
    assert env.engine.held == {}  # added, then taken out again: never served

    unseen = await env.upload("acme", "gone", seed=402)  # a version of a blocked name
    with pytest.raises(errors.NotFound):
        await env.residency.prefetch(unseen)
    assert env.engine.faults == []


# --- shared bytes -----------------------------------------------------------------------------


async def test_identical_bytes_of_two_tenants_residency_and_revocation(make_env: object) -> None:
    """acme and globex upload the same bytes. globex's version is "store" until globex loads
    it, whatever acme cached. acme's revocation, while globex's load waits for a slot with the
    files on disk, leaves the files: globex's load then succeeds (before the fix the folder was
    deleted and the engine would have loaded a missing adapter)."""
    env: Env = make_env(capacity=2)  # type: ignore[operator]
    folder_seed = 410
    acme_v = await env.upload("acme", "same", seed=folder_seed)
    globex_v = await env.upload("globex", "twin", seed=folder_seed)
    assert acme_v.sha == globex_v.sha
    x, y = [await env.upload("initech", n, seed=411 + i) for i, n in enumerate("xy")]

    await env.residency.prefetch(acme_v)
    assert env.residency.entry(acme_v).tier == "engine"
    assert env.residency.entry(globex_v).tier == "store"  # acme's bytes do not count
    done = asyncio.Event()

    async def hold(v: AdapterVersion) -> None:
        async with env.residency.use(v):
            await done.wait()

    holders = [asyncio.create_task(hold(v)) for v in (x, y)]  # evicts acme's, fills the engine
    await until(resident(env, x, y))
    assert env.residency.entry(acme_v).tier == "disk"
    assert env.residency.entry(globex_v).tier == "store"
    loading = asyncio.create_task(env.residency.prefetch(globex_v))  # waits for a slot
    await until(lambda: residency_counts(env.residency.metrics).slot_waits >= 1)
    assert not loading.done()
    env.residency.block([key_of(acme_v)])
    await env.residency.unload([key_of(acme_v)])
    path = env.cache.path_for(globex_v.sha)
    assert path.is_dir()
    done.set()
    await asyncio.gather(*holders)
    assert (await loading).tier == "engine"
    assert env.engine.faults == []
    assert env.residency.entry(acme_v).tier == "store"
    assert not env.cache.contains(acme_v.sha, owner="acme/same")


# --- the manifest cache -----------------------------------------------------------------------


async def test_manifest_cache_is_bounded_and_keeps_what_must_stay_known(make_env: object) -> None:
    """Probing 12 names with a cache of 4 keeps at most 4 manifests (plus the one whose version
    is in use, which is never evicted: its revocation by another replica is still seen by the
    poller and aborts the request). An evicted manifest is read again on its next use, so a
    version revoked meanwhile does not serve."""
    env: Env = make_env(capacity=3)  # type: ignore[operator]
    env.residency.manifest_cache_size = 4
    held = await env.upload("acme", "held", seed=420)
    names = [f"n{i}" for i in range(12)]
    probed = [await env.upload("acme", n, seed=421 + i) for i, n in enumerate(names)]
    release = asyncio.Event()
    outcome: list[str] = []

    async def hold() -> None:
        try:
            async with env.residency.use(held):
                await release.wait()
            outcome.append("ended")
        except errors.NotFound:
            outcome.append("not found")

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    for name in names:
        await env.residency.resolve("acme", AdapterRef.parse(name))
    assert env.residency.cached_manifests() <= 4 + 1
    assert residency_counts(env.residency.metrics).manifest_evictions >= len(names) - 4
    await asyncio.to_thread(env.registry.revoke, "acme", "held", held.version_id)
    await env.residency.poll_once()
    assert not env.residency.is_resident(key_of(held))
    release.set()
    await holder

    await asyncio.to_thread(env.registry.revoke, "acme", "n0", probed[0].version_id)
    with pytest.raises(errors.NotFound):
        await env.residency.resolve("acme", AdapterRef.parse("n0"))


def test_residency_settings_are_validated() -> None:
    from lora_gateway.config import Settings

    assert Settings().manifest_cache_size == 1024
    assert Settings().engine_slot_wait_s == 30.0
    assert Settings().prefix_cache_per_tenant is True
    for bad in ({"manifest_cache_size": 0}, {"engine_slot_wait_s": 0}):
        with pytest.raises(errors.InvalidArgument, match=next(iter(bad))):
            Settings.from_mapping(bad)
    # 0 = max_cpu_loras - 1: other tenants always keep a slot.
    assert (
        Settings(max_cpu_loras=8, tenant_max_engine_slots=0).tenant_defaults().max_engine_slots == 7
    )


async def test_the_canary_hears_of_each_version_once_per_engine(make_env: object) -> None:
    """A reload after an eviction puts back bytes the canary has already seen compute: it is
    not handed to the canary again (a tenant churning through adapters would otherwise cost
    everyone a canary check per request); after an engine restart every version is new."""
    env: Env = make_env(capacity=1)  # type: ignore[operator]
    a, b = [await env.upload("acme", n, seed=430 + i) for i, n in enumerate("ab")]
    heard: list[str] = []
    env.residency.on_loaded = lambda version, loaded: heard.append(version.name)
    for version in (a, b, a, b):  # capacity 1: every prefetch evicts the other
        await env.residency.prefetch(version)
    assert len(env.engine.adds) == 4
    assert heard == ["a", "b"]
    await env.residency.forget_engine()
    env.engine.held.clear()  # the restarted engine holds nothing
    await env.residency.prefetch(a)
    assert heard == ["a", "b", "a"]


async def test_a_version_the_canary_blocks_is_refused_as_quarantined_at_once(
    make_env: object,
) -> None:
    """The canary blocks the suspects before their manifests say "quarantined" (that write goes
    to the store afterwards): in between, the owner is told FAILED_PRECONDITION with the reason
    (the documented code for a quarantined version), not NOT_FOUND; a revoked one stays
    NOT_FOUND."""
    env: Env = make_env()  # type: ignore[operator]
    suspect = await env.upload("acme", "suspect", 1)
    revoked = await env.upload("acme", "gone", 2)
    env.residency.block([key_of(suspect)], quarantined="the canary saw NaN outputs")
    env.residency.block([key_of(revoked)])
    with pytest.raises(errors.GatewayError) as refused:
        await env.residency.resolve("acme", AdapterRef.parse("suspect"))
    assert isinstance(refused.value, errors.FailedPrecondition)
    assert "quarantined" in str(refused.value)
    assert "NaN outputs" in str(refused.value)
    with pytest.raises(errors.NotFound):
        await env.residency.resolve("acme", AdapterRef.parse("gone"))
