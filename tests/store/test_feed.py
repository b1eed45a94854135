"""The change feed on the real backends (local folder and SeaweedFS over HTTP): one event per
manifest write, listed in time order from a position, in pages, and expired."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_store import BlobBackend, InvalidAdapter, Manifest, Registry, StoreUnavailable
from adapter_store.feed import ChangeFeed
from adapter_store.keys import event_key, event_of, events_from
from adapter_store.manifests import Manifests


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_every_manifest_write_appends_one_event(
    registry: Registry, good_adapter: Path, backend: BlobBackend
) -> None:
    """Upload, alias, share, unshare, revoke: each writes its manifest once and one event
    naming it; a write that changes nothing (sharing twice) appends none."""
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    registry.share("acme", "bot", "globex")
    registry.share("acme", "bot", "globex")  # no change: no write, no event
    registry.unshare("acme", "bot", "globex")
    registry.upload_dir("globex", "helper", good_adapter, created_by="t")
    registry.revoke("acme", "bot")
    page = registry.changes(0)
    assert [(c.tenant, c.name) for c in page.changes] == [
        ("acme", "bot"),
        ("acme", "bot"),
        ("acme", "bot"),
        ("globex", "helper"),
        ("acme", "bot"),
    ]
    assert not page.more
    stamps = [c.stamp_us for c in page.changes]
    assert stamps == sorted(stamps)
    assert all(backend.get(c.key)[0] == b"" for c in page.changes)


def test_reads_from_a_time_and_a_position_in_pages(backend: BlobBackend) -> None:
    """Events listed from a stamp (inclusive), 1,000 a listing; a page's position continues
    the same read; expire deletes the old ones only."""
    clock = Clock(1_800_000_000.0)
    manifests = Manifests(backend)
    manifests.feed = feed = ChangeFeed(backend, clock=clock)
    for i in range(5):
        manifests.update("acme", f"a{i}", lambda m, i=i: Manifest("acme", f"a{i}"))
        clock.now += 1
    since = int((1_800_000_000.0 + 2) * 1_000_000)
    assert [c.name for c in feed.read(since).changes] == ["a2", "a3", "a4"]
    first = feed.read(0, limit=2)
    assert ([c.name for c in first.changes], first.more) == (["a0", "a1"], True)
    second = feed.read(0, position=first.position, limit=2)
    assert [c.name for c in second.changes] == ["a2", "a3"]
    assert feed.read(0, position=second.position, limit=2).more is False
    assert feed.expire(since) == 2
    assert [c.name for c in feed.read(0).changes] == ["a2", "a3", "a4"]


def test_event_keys_carry_validated_names_only() -> None:
    key = event_key(1_800_000_000_000_000, "0a1b2c3d", "acme", "bot.v-2")
    assert key == "events/1800000000000000-0a1b2c3d-acme/bot.v-2"
    assert event_of(key) == (1_800_000_000_000_000, "acme", "bot.v-2")
    assert events_from(1_800_000_000_000_000) < key
    assert events_from(1_800_000_000_000_001) > key
    for bad in ("../x", "a/b", ""):
        with pytest.raises(InvalidAdapter):
            event_key(1, "0a1b2c3d", bad, "bot")
    for foreign in (
        "events/1800000000000000-0a1b2c3d-..x/bot",
        "events/18000-0a1b2c3d-acme/bot",
        "events/1800000000000000-0a1b2c3d-acme/bot/extra",
    ):
        assert event_of(foreign) is None


def test_a_failed_event_append_keeps_the_write(
    registry: Registry, good_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is the truth: when the event cannot be written the change still stands
    (other replicas catch it at their resync pass)."""
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")

    def down(tenant: str, name: str) -> None:
        raise StoreUnavailable("the store is down")

    monkeypatch.setattr(registry._manifests.feed, "append", down)
    registry.share("acme", "bot", "globex")
    assert registry.get_manifest("acme", "bot").shared_with == ("globex",)
    assert len(registry.changes(0).changes) == 1  # the upload's event only
