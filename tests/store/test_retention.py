"""Retention (keep the newest K versions plus every aliased one) and the orphan sweeper, on both
backends (the local folder and SeaweedFS over HTTP)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from adapter_store import AdapterNotFound, AdapterRef, AdapterVersion, BlobBackend, Registry
from adapter_store.errors import InvalidAdapter
from adapter_store.keys import manifest_key, object_key, version_prefix
from adapter_store.model import ADAPTER_FILES, Manifest
from tests.conftest import AdapterFactory


def _upload(registry: Registry, factory: AdapterFactory, seed: int, name: str = "bot") -> str:
    return registry.upload_dir("acme", name, factory(seed=seed), created_by="t").sha


def _stored(backend: BlobBackend, sha: str, name: str = "bot") -> list[str]:
    return backend.list(version_prefix("acme", name, sha))


def test_retention_keeps_the_newest_and_every_aliased_version(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    v = [_upload(registry, make_test_adapter, seed) for seed in range(1, 7)]  # v[0] oldest
    registry.set_alias("acme", "bot", "prod", f"sha256:{v[0]}")
    registry.set_alias_weights(
        "acme", "bot", "canary", {f"sha256:{v[1]}": 0.9, f"sha256:{v[2]}": 0.1}
    )
    since_us = time.time_ns() // 1000
    manifest, retired = registry.set_retention("acme", "bot", 2)
    # Other replicas learn of it from the change feed, as of a revocation.
    changes = registry.changes(since_us).changes
    assert [(c.tenant, c.name) for c in changes] == [("acme", "bot")]
    # Newest two (v[4], v[5]), prod (v[0]) and both canary versions stay; v[3] goes.
    assert retired == [v[3]]
    assert set(manifest.versions) == {v[0], v[1], v[2], v[4], v[5]}
    assert v[3] in manifest.revoked
    assert manifest.keep_last == 2
    assert _stored(registry.backend, v[3]) == []
    with pytest.raises(AdapterNotFound):
        registry.resolve("acme", AdapterRef("acme", "bot", version=v[3]))
    # Applied at the next upload: v[4] is now third newest and unaliased.
    v6 = _upload(registry, make_test_adapter, 7)
    manifest, retired = registry.retire_expired("acme", "bot")
    assert retired == [v[4]]
    assert set(manifest.versions) == {v[0], v[1], v[2], v[5], v6}
    assert registry.get_manifest("acme", "bot").keep_last == 2  # stored
    # Without a policy nothing more is retired.
    manifest, retired = registry.set_retention("acme", "bot", None)
    assert retired == []
    assert manifest.keep_last is None


def test_bad_retention_is_refused_and_changes_nothing(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    _upload(local_registry, make_test_adapter, 1)
    _upload(local_registry, make_test_adapter, 2)
    before = local_registry.backend.get(manifest_key("acme", "bot"))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidAdapter, match="keep_last"):
            local_registry.set_retention("acme", "bot", bad)  # type: ignore[arg-type]
    assert local_registry.backend.get(manifest_key("acme", "bot")) == before
    with pytest.raises(AdapterNotFound):
        local_registry.set_retention("acme", "nothing", 1)


def test_a_manifest_without_retention_keeps_everything(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    _upload(local_registry, make_test_adapter, 1)
    raw, _ = local_registry.backend.get(manifest_key("acme", "bot"))
    assert b"retention" not in raw
    manifest = Manifest.from_json(raw)
    assert manifest.keep_last is None
    assert manifest.expired() == []
    _, retired = local_registry.set_retention("acme", "bot", 1)
    assert retired == []  # the only version is the newest
    raw, _ = local_registry.backend.get(manifest_key("acme", "bot"))
    assert b'"keep_last": 1' in raw


MIN_AGE_S = 3.0


def _verify(registry: Registry, version: AdapterVersion, tmp: Path) -> None:
    for entry in version.files:
        dest = tmp / f"{version.sha}-{entry.filename}"
        registry.fetch_file(version, entry.filename, dest)
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == entry.sha256


def test_the_sweeper_never_deletes_a_concurrent_upload(
    registry: Registry, make_test_adapter: AdapterFactory, tmp_path: Path
) -> None:
    """Uploads on 4 threads while the sweeper runs again and again with a min_age of 3 s:
    every published version stays whole; orphans (objects no manifest names: a crash between
    objects and manifest) are deleted once older than 3 s, and only they."""
    backend = registry.backend
    seeds = {f"bot-{t}": [100 + 10 * t + i for i in range(3)] for t in range(4)}
    folders = {s: make_test_adapter(seed=s) for row in seeds.values() for s in row}
    _upload(registry, make_test_adapter, 1, "bot-0")  # bot-0 has a manifest before the race
    orphans = []
    for name, fake in (("bot-0", "a" * 64), ("ghost", "b" * 64)):  # ghost: no manifest at all
        for filename in ADAPTER_FILES:
            key = object_key("acme", name, fake, filename)
            backend.put(key, b"orphaned bytes")
            orphans.append(key)
    injected = time.monotonic()
    published: list[AdapterVersion] = []
    durations: list[float] = []
    swept: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def uploader(name: str) -> None:
        try:
            for seed in seeds[name]:
                started = time.monotonic()
                version = registry.upload_dir("acme", name, folders[seed], created_by="t")
                durations.append(time.monotonic() - started)
                published.append(version)
        except BaseException as exc:
            errors.append(exc)

    def sweeper() -> None:
        try:
            while not done.is_set() or time.monotonic() - injected < MIN_AGE_S + 1.0:
                swept.extend(registry.sweep_orphans(min_age_s=MIN_AGE_S).orphans)
            swept.extend(registry.sweep_orphans(min_age_s=MIN_AGE_S).orphans)
        except BaseException as exc:
            errors.append(exc)

    sweep = threading.Thread(target=sweeper)
    sweep.start()
    uploads = [threading.Thread(target=uploader, args=(name,)) for name in seeds]
    for thread in uploads:
        thread.start()
    for thread in uploads:
        thread.join()
    done.set()
    sweep.join()
    assert not errors, errors
    assert len(published) == 12
    # The premise of the sweeper's safety: min_age exceeds the longest upload.
    assert max(durations) < MIN_AGE_S, durations
    assert sorted(set(swept)) == sorted(orphans)
    for key in orphans:
        with pytest.raises(Exception, match="no object"):
            backend.get(key)
    for version in published:
        assert version.sha in registry.get_manifest("acme", version.name).versions
        _verify(registry, version, tmp_path)


def test_a_dry_run_deletes_nothing_and_young_orphans_stay(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    _upload(local_registry, make_test_adapter, 1)
    backend = local_registry.backend
    old = object_key("acme", "bot", "c" * 64, ADAPTER_FILES[0])
    young = object_key("acme", "bot", "d" * 64, ADAPTER_FILES[0])
    backend.put(old, b"x")
    backend.put(young, b"y")
    aged = time.time() - 7200
    os.utime(local_registry.backend.root / old, (aged, aged))  # type: ignore[attr-defined]
    report = local_registry.sweep_orphans("acme", min_age_s=3600, dry_run=True)
    assert report.orphans == [old]
    assert report.young == 1
    assert report.dry_run
    assert backend.get(old)[0] == b"x"
    report = local_registry.sweep_orphans("acme", min_age_s=3600)
    assert report.orphans == [old]
    assert backend.list(version_prefix("acme", "bot", "c" * 64)) == []
    assert backend.get(young)[0] == b"y"
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(InvalidAdapter):
            local_registry.sweep_orphans(min_age_s=bad)


def test_the_sweep_command(
    local_registry: Registry,
    make_test_adapter: AdapterFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`lora-gateway store sweep`: --dry-run lists, then a run deletes; a --min-age not above
    upload_timeout_s is a usage error (exit 2)."""
    import json

    from lora_gateway.cli import main

    sha = _upload(local_registry, make_test_adapter, 1)
    orphan = object_key("acme", "bot", "e" * 64, ADAPTER_FILES[0])
    local_registry.backend.put(orphan, b"x")
    aged = time.time() - 3 * 86_400
    os.utime(local_registry.backend.root / orphan, (aged, aged))  # type: ignore[attr-defined]
    store = ["--store", f"file://{tmp_path / 'store'}"]
    assert main(["store", "sweep", *store, "--dry-run", "--json"], environ={}) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["orphans"], report["dry_run"], report["adapters"]) == ([orphan], True, 1)
    assert main(["store", "sweep", *store], environ={}) == 0
    assert "deleted 1 orphaned" in capsys.readouterr().out
    assert local_registry.backend.list(version_prefix("acme", "bot", "e" * 64)) == []
    assert len(_stored(local_registry.backend, sha)) == 2  # the published version is whole
    assert main(["store", "sweep", *store, "--min-age", "60"], environ={}) == 2
    assert "must exceed upload_timeout_s" in capsys.readouterr().err
