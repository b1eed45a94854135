"""The listing index (adapter_store.index): pages read shards, not manifests; the index follows
every write, survives concurrent writers, is withdrawn when a copy fails, and is rebuilt."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from adapter_store import (
    AdapterNotFound,
    IntegrityError,
    InvalidAdapter,
    Registry,
    StoreUnavailable,
)
from adapter_store.backend import BlobBackend
from adapter_store.index import shard_of
from adapter_store.model import Manifest
from tests.conftest import AdapterFactory
from tests.store.test_registry import CountingBackend


class FailingIndexPuts:
    """A real backend whose puts of listing-index shards fail (the store failing mid-write)."""

    def __init__(self, inner: BlobBackend) -> None:
        self._inner = inner
        self.failing = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def put(self, key: str, data: bytes, **kwargs: Any) -> str:
        if self.failing and "/index/" in key and key.endswith(".json"):
            raise StoreUnavailable("the store is unavailable")
        return self._inner.put(key, data, **kwargs)


def _upload(registry: Registry, adapter: Path, names: list[str], tenant: str = "acme") -> None:
    for name in names:
        registry.upload_dir(tenant, name, adapter, created_by="t")


def _listing(registry: Registry, tenant: str = "acme", limit: int = 7) -> list[Manifest]:
    items: list[Manifest] = []
    after = ""
    while True:
        page = registry.adapter_page(tenant, after=after, limit=limit)
        assert len(page.items) <= limit
        items.extend(page.items)
        if page.next_after is None:
            return items
        after = page.next_after


def _truth(registry: Registry, tenant: str = "acme") -> dict[str, str | None]:
    """name → etag of each live adapter, read from the manifests themselves."""
    return {m.name: m.etag for m in registry.stored_adapters(tenant)}


def _drop_index(registry: Registry, tenant: str = "acme") -> None:
    for key in registry.backend.list(f"tenants/{tenant}/index/"):
        registry.backend.delete(key)


NAMES = [f"bot-{i:02d}" for i in range(24)]


def test_pages_read_the_index_not_the_manifests(registry: Registry, good_adapter: Path) -> None:
    """A new tenant's index is ready from its first adapter on. Its pages hold every live
    adapter once, as the manifests say, and read no manifest: one listing of the index and
    one read per shard visited."""
    _upload(registry, good_adapter, NAMES)
    registry.revoke("acme", "bot-03")
    registry.set_alias(
        "acme", "bot-05", "prod", registry.get_manifest("acme", "bot-05").aliases["latest"]
    )
    assert len({shard_of(name) for name in NAMES}) > 15  # spread over many shards
    counting = CountingBackend(registry.backend)
    indexed = Registry(counting, registry.spec)  # type: ignore[arg-type]
    listed = _listing(indexed)
    assert sorted(m.name for m in listed) == [n for n in NAMES if n != "bot-03"]
    assert {m.name: m.etag for m in listed} == _truth(registry)
    assert next(m for m in listed if m.name == "bot-05").aliases.keys() == {"latest", "prod"}
    assert not [key for _, key in counting.calls if key.endswith("manifest.json")]
    # A page of 7 adapters visits at most 8 shards (24 adapters in 24 or fewer shards).
    counting.calls.clear()
    first = indexed.adapter_page("acme", limit=7)
    kinds = [method for method, _ in counting.calls]
    assert kinds.count("list_page") == 1
    assert 1 <= kinds.count("get") <= 8
    assert first.examined == 7
    assert first.next_after is not None
    assert first.next_after.startswith("@")


def test_the_index_follows_every_kind_of_write(
    local_registry: Registry, good_adapter: Path, make_test_adapter: AdapterFactory
) -> None:
    registry = local_registry
    _upload(registry, good_adapter, ["a", "b"])
    registry.share("acme", "a", "globex")
    registry.set_retention("acme", "b", keep_last=3)
    listed = {m.name: m for m in _listing(registry)}
    assert listed["a"].shared_with == ("globex",)
    assert listed["b"].keep_last == 3
    registry.revoke("acme", "a")
    assert [m.name for m in _listing(registry)] == ["b"]
    _upload(registry, make_test_adapter(seed=7), ["a"])  # the name is uploaded again
    assert sorted(m.name for m in _listing(registry)) == ["a", "b"]
    assert {m.name: m.etag for m in _listing(registry)} == _truth(registry)


def test_a_store_without_the_index_is_listed_from_the_manifests_until_rebuilt(
    local_registry: Registry, good_adapter: Path
) -> None:
    """An upgrade from a version without the index: the listings read the manifests (right,
    and one read per adapter) until `rebuild_index`, which also drops a copy of a manifest
    that is gone and rewrites a corrupt shard."""
    registry = local_registry
    _upload(registry, good_adapter, NAMES[:10])
    _drop_index(registry)
    _upload(registry, good_adapter, ["late"])  # not the tenant's first: no ready marker
    counting = CountingBackend(registry.backend)
    plain = Registry(counting, registry.spec)  # type: ignore[arg-type]
    assert sorted(m.name for m in _listing(plain)) == sorted([*NAMES[:10], "late"])
    assert sum(key.endswith("manifest.json") for _, key in counting.calls) == 11
    # A corrupt shard and a copy of an adapter whose manifest is gone.
    registry.backend.put("tenants/acme/index/00.json", b"not json")
    shard = shard_of("ghost")
    registry.backend.put(
        f"tenants/acme/index/{shard}.json",
        json.dumps(
            {
                "format": 1,
                "entries": {"ghost": {"etag": "x", "manifest": json.loads(_a_manifest("ghost"))}},
            }
        ).encode(),
    )
    [report] = registry.rebuild_index("acme")
    assert report.adapters == 11
    assert report.shards_written >= 2
    counting.calls.clear()
    listed = _listing(plain)
    assert {m.name: m.etag for m in listed} == _truth(registry)
    assert not [key for _, key in counting.calls if key.endswith("manifest.json")]
    [again] = registry.rebuild_index("acme")
    assert again.shards_written == 0  # already right: nothing rewritten


def _a_manifest(name: str) -> bytes:
    return Manifest(tenant="acme", name=name).to_json()


def test_a_failed_copy_withdraws_the_index_and_nothing_is_lost(
    local_registry: Registry, good_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest write whose copy cannot be written stands; the index is withdrawn, so the
    listings read the manifests and show the write; a rebuild puts the index back."""
    _upload(local_registry, good_adapter, ["a", "b"])
    failing = FailingIndexPuts(local_registry.backend)
    registry = Registry(failing, local_registry.spec)  # type: ignore[arg-type]
    latest = registry.get_manifest("acme", "a").aliases["latest"]
    registry.set_alias("acme", "a", "prod", latest)  # succeeds: the manifest is the truth
    assert "rebuild-index" in caplog.text
    assert registry.get_manifest("acme", "a").aliases["prod"] == latest
    keys = registry.backend.list("tenants/acme/index/")
    assert "tenants/acme/index/ready" not in keys
    listed = {m.name: m for m in _listing(registry)}
    assert listed["a"].aliases["prod"] == latest
    failing.failing = False
    registry.rebuild_index("acme")
    assert "tenants/acme/index/ready" in registry.backend.list("tenants/acme/index/")
    assert _listing(registry)[0].etag is not None
    assert {m.name: m.etag for m in _listing(registry)} == _truth(registry)


def test_a_listing_begun_on_the_index_finishes_on_it(
    local_registry: Registry, good_adapter: Path
) -> None:
    registry = local_registry
    _upload(registry, good_adapter, NAMES)
    first = registry.adapter_page("acme", limit=5)
    assert first.next_after is not None
    _drop_index(registry)
    registry.rebuild_index("acme")
    registry.backend.delete("tenants/acme/index/ready")  # withdrawn meanwhile
    rest = []
    after: str | None = first.next_after
    while after is not None:
        page = registry.adapter_page("acme", after=after, limit=5)
        rest.extend(page.items)
        after = page.next_after
    assert sorted(m.name for m in [*first.items, *rest]) == NAMES


@pytest.mark.parametrize(
    "position",
    ["@", "@zz/bot-01", "@00/bot-01", f"@{shard_of('bot-01')}/../x", "@" + "0" * 400, "@0a"],
)
def test_bad_index_positions_are_refused(
    local_registry: Registry, good_adapter: Path, position: str
) -> None:
    _upload(local_registry, good_adapter, ["bot-01"])
    with pytest.raises(InvalidAdapter, match="invalid listing position"):
        local_registry.adapter_page("acme", after=position, limit=5)


def test_a_corrupt_shard_is_an_error_not_a_short_listing(
    local_registry: Registry, good_adapter: Path
) -> None:
    _upload(local_registry, good_adapter, ["bot-01"])
    local_registry.backend.put(f"tenants/acme/index/{shard_of('bot-01')}.json", b"{")
    with pytest.raises(IntegrityError):
        local_registry.adapter_page("acme", limit=5)


def test_an_entry_copied_into_another_tenants_index_is_never_listed(
    local_registry: Registry, good_adapter: Path
) -> None:
    """A copy is listed only under its own tenant, name and shard (a tampered index lists
    nothing of another tenant's)."""
    registry = local_registry
    _upload(registry, good_adapter, ["bot"], tenant="acme")
    _upload(registry, good_adapter, ["mine"], tenant="globex")
    data, _ = registry.backend.get(f"tenants/acme/index/{shard_of('bot')}.json")
    registry.backend.put(f"tenants/globex/index/{shard_of('bot')}.json", data)
    assert [m.name for m in _listing(registry, "globex")] == ["mine"]


def test_concurrent_writers_and_a_rebuild_leave_every_copy_current(
    registry: Registry, good_adapter: Path
) -> None:
    """Writers on many threads (on SeaweedFS: real conditional puts over HTTP) change
    adapters that share shards while a rebuild runs: afterwards every copy is the stored
    manifest (the copy never goes backwards)."""
    names = [f"w-{i}" for i in range(6)]
    _upload(registry, good_adapter, names)
    latest = {name: registry.get_manifest("acme", name).aliases["latest"] for name in names}
    failures: list[BaseException] = []
    start = threading.Barrier(len(names) + 1)

    def write(name: str) -> None:
        start.wait()
        try:
            for round_ in range(4):
                registry.set_alias("acme", name, f"r{round_}", latest[name])
        except BaseException as exc:
            failures.append(exc)

    def rebuild() -> None:
        start.wait()
        try:
            for _ in range(2):
                registry.rebuild_index("acme")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(name,)) for name in names]
    threads.append(threading.Thread(target=rebuild))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    listed = {m.name: m for m in _listing(registry)}
    assert {name: m.etag for name, m in listed.items()} == _truth(registry)
    assert all(set(m.aliases) == {"latest", "r0", "r1", "r2", "r3"} for m in listed.values())


def test_rebuild_index_command(
    local_registry: Registry, good_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lora_gateway.cli import main

    _upload(local_registry, good_adapter, ["a", "b"])
    _drop_index(local_registry)
    store = f"file://{tmp_path / 'store'}"
    assert main(["store", "rebuild-index", "--store", store, "--json"], environ={}) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["tenant"] == "acme"
    assert report["adapters"] == 2
    assert report["shards_written"] >= 1
    assert "tenants/acme/index/ready" in local_registry.backend.list("tenants/acme/index/")
    assert main(["store", "rebuild-index", "--store", store, "--tenant", "acme"], environ={}) == 0
    assert "acme: 2 adapters, 0 shards written; ready" in capsys.readouterr().out
    assert main(["store", "rebuild-index", "--store", store, "--tenant", "../x"], environ={}) != 0


def test_a_writer_killed_between_its_manifest_and_its_copy_never_leaves_a_listing_behind(
    local_registry: Registry, good_adapter: Path, make_test_adapter: AdapterFactory
) -> None:
    """A write is announced by a pending marker before the manifest; a writer that dies after
    the manifest and before its copy (here: `note` never returns) leaves the marker, and
    listings read that adapter's manifest itself. Found by the kill -9 soak
    (tests/faults/test_durability.py). A rebuild removes markers once they are stale."""
    registry = local_registry
    _upload(registry, good_adapter, ["a", "b"])
    latest = registry.get_manifest("acme", "a").aliases["latest"]

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed")

    index = type(registry._manifests.index)
    original = index.note
    index.note = killed  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            registry.set_alias("acme", "a", "prod", latest)
        with pytest.raises(SystemExit):
            _upload(registry, make_test_adapter(seed=8), ["c"])  # a new adapter, no copy
    finally:
        index.note = original  # type: ignore[method-assign]
    markers = [k for k in registry.backend.list("tenants/acme/index/") if "/pending/" in k]
    assert len(markers) == 2
    fresh = Registry(registry.backend, registry.spec)
    listed = {m.name: m for m in _listing(fresh)}
    assert sorted(listed) == ["a", "b", "c"]
    assert listed["a"].aliases["prod"] == latest
    assert {name: m.etag for name, m in listed.items()} == _truth(registry)
    [kept] = registry.rebuild_index("acme")
    assert kept.markers_removed == 0  # young: their writers may still be at work
    report = registry._manifests.index.rebuild("acme", stale_after_s=0)
    assert report.markers_removed == 2
    assert not [k for k in registry.backend.list("tenants/acme/index/") if "/pending/" in k]
    assert {m.name: m.etag for m in _listing(fresh)} == _truth(registry)


def test_a_refused_or_empty_write_leaves_no_marker(
    local_registry: Registry, good_adapter: Path
) -> None:
    registry = local_registry
    _upload(registry, good_adapter, ["a"])
    with pytest.raises(AdapterNotFound):
        registry.set_alias("acme", "a", "prod", "sha256:" + "0" * 64)
    latest = registry.get_manifest("acme", "a").aliases["latest"]
    registry.set_alias("acme", "a", "prod", latest)
    registry.set_alias("acme", "a", "prod", latest)  # the same again: nothing to write
    assert not [k for k in registry.backend.list("tenants/acme/index/") if "/pending/" in k]
