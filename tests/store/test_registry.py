"""The store contract, run on every backend: the local folder and S3 over HTTP (SeaweedFS)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from adapter_store import (
    DEFAULT_ALIAS,
    AdapterNotFound,
    AdapterRef,
    Conflict,
    InvalidAdapter,
    Manifest,
    Registry,
    StoreUnavailable,
)
from adapter_store.errors import PreconditionFailed
from adapter_store.model import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE
from adapter_store.store import BlobBackend, sha256_file
from tests.conftest import AdapterFactory


def ref(text: str) -> AdapterRef:
    return AdapterRef.parse(text)


def test_upload_resolve_and_read_back(
    registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    version = registry.upload_dir(
        "acme", "bot", good_adapter, created_by="alice", aliases=("prod",), description="d"
    )
    assert version.created_by == "alice"
    assert version.description == "d"
    assert version.status == "active"
    assert version.created_at.endswith("Z")
    assert {f.filename for f in version.files} == set(ADAPTER_FILES)
    for alias in ("bot", "bot@latest", "bot@prod", f"bot@{version.version_id}", "acme/bot@prod"):
        assert registry.resolve("acme", ref(alias)) == version
    manifest = registry.get_manifest("acme", "bot")
    assert manifest.aliases == {DEFAULT_ALIAS: version.sha, "prod": version.sha}
    assert Manifest.from_json(manifest.to_json()).versions == manifest.versions
    # Objects are content-addressed under the version prefix, and read back byte for byte.
    prefix = f"tenants/acme/adapters/bot/versions/{version.sha}/"
    assert registry.backend.list(prefix) == sorted(prefix + f for f in ADAPTER_FILES)
    for entry in version.files:
        registry.fetch_file(version, entry.filename, tmp_path / entry.filename)
        assert (
            sha256_file(tmp_path / entry.filename)
            == entry.sha256
            == sha256_file(good_adapter / entry.filename)
        )
    # Listing.
    assert [m.name for m in registry.list_adapters("acme")] == ["bot"]
    assert registry.list_tenants() == ["acme"]


def test_versions_aliases_and_rollback(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    v1 = registry.upload_dir(
        "acme", "bot", make_test_adapter(seed=1), created_by="t", aliases=("prod",)
    )
    v2 = registry.upload_dir("acme", "bot", make_test_adapter(seed=2), created_by="t")
    assert v1.sha != v2.sha
    assert registry.resolve("acme", ref("bot")) == v2  # latest moves on upload
    assert registry.resolve("acme", ref("bot@prod")) == v1  # other aliases do not
    # Re-uploading identical content is the same version (content-addressed).
    again = registry.upload_dir("acme", "bot", make_test_adapter(seed=1), created_by="t")
    assert again == v1
    assert registry.resolve("acme", ref("bot")) == v1
    # Compare-and-set on an alias; rollback moves it.
    registry.set_alias("acme", "bot", "prod", v2.sha, expected=v1.sha)
    with pytest.raises(Conflict, match="not the expected"):
        registry.set_alias("acme", "bot", "prod", v1.version_id, expected=v1.sha)
    manifest = registry.set_alias("acme", "bot", "canary", "prod")
    assert manifest.aliases["canary"] == v2.sha
    registry.set_alias("acme", "bot", "prod", v1.version_id)
    assert registry.resolve("acme", ref("bot@prod")) == v1
    assert "canary" not in registry.remove_alias("acme", "bot", "canary").aliases
    with pytest.raises(AdapterNotFound):
        registry.set_alias("acme", "bot", "prod", "nope")
    with pytest.raises(InvalidAdapter, match="may not look like a version"):
        registry.set_alias("acme", "bot", v1.sha, "prod")
    assert len(registry.get_manifest("acme", "bot").versions) == 2


def test_not_found_does_not_reveal_other_tenants(registry: Registry, good_adapter: Path) -> None:
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    errors = []
    for tenant, text in [
        ("other", "acme/bot"),
        ("other", "acme/missing"),
        ("acme", "missing"),
        ("acme", "bot@nope"),
    ]:
        with pytest.raises(AdapterNotFound) as caught:
            registry.resolve(tenant, ref(text))
        errors.append(str(caught.value))
    assert errors[0] == errors[1].replace("missing", "bot")
    assert "acme" not in errors[2]
    assert "exist" not in " ".join(errors)


def test_sharing(registry: Registry, good_adapter: Path) -> None:
    version = registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    registry.share("acme", "bot", "globex")
    assert registry.resolve("globex", ref("acme/bot")) == version
    assert [m.name for m in registry.list_shared_with("globex")] == ["bot"]
    assert registry.list_shared_with("initech") == []
    registry.unshare("acme", "bot", "globex")
    with pytest.raises(AdapterNotFound):
        registry.resolve("globex", ref("acme/bot"))


def test_conditional_get(registry: Registry, good_adapter: Path) -> None:
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    manifest = registry.get_manifest("acme", "bot")
    assert manifest.etag
    assert registry.get_manifest_if_changed("acme", "bot", manifest.etag) is None
    registry.share("acme", "bot", "globex")
    changed = registry.get_manifest_if_changed("acme", "bot", manifest.etag)
    assert changed is not None
    assert changed.shared_with == ("globex",)


def test_revocation(registry: Registry, make_test_adapter: AdapterFactory) -> None:
    v1 = registry.upload_dir(
        "acme", "bot", make_test_adapter(seed=1), created_by="t", aliases=("prod",)
    )
    v2 = registry.upload_dir("acme", "bot", make_test_adapter(seed=2), created_by="t")
    assert registry.revoke("acme", "bot", v1.version_id) == [v1.sha]
    assert registry.revoke("acme", "bot", v1.sha) == [v1.sha]  # idempotent
    manifest = registry.get_manifest("acme", "bot")
    assert v1.sha not in manifest.versions
    assert v1.sha in manifest.revoked
    assert "prod" not in manifest.aliases
    assert manifest.aliases[DEFAULT_ALIAS] == v2.sha
    for text in ("bot@prod", f"bot@{v1.version_id}"):
        with pytest.raises(AdapterNotFound):
            registry.resolve("acme", ref(text))
    with pytest.raises(AdapterNotFound):
        registry.set_alias("acme", "bot", "prod", v1.sha)
    assert registry.backend.list(f"tenants/acme/adapters/bot/versions/{v1.sha}/") == []
    # The same bytes cannot come back under this adapter.
    with pytest.raises(Conflict, match="revoked"):
        registry.upload_dir("acme", "bot", make_test_adapter(seed=1), created_by="t")
    with pytest.raises(AdapterNotFound):
        registry.revoke("acme", "bot", "f" * 64)

    # Whole adapter: gone from every read path.
    registry.share("acme", "bot", "globex")
    assert registry.revoke("acme", "bot") == sorted([v1.sha, v2.sha])
    assert registry.revoke("acme", "bot") == sorted([v1.sha, v2.sha])
    with pytest.raises(AdapterNotFound):
        registry.get_manifest("acme", "bot")
    for tenant, text in (("acme", "bot"), ("globex", "acme/bot")):
        with pytest.raises(AdapterNotFound):
            registry.resolve(tenant, ref(text))
    assert registry.list_adapters("acme") == []
    assert registry.list_shared_with("globex") == []
    assert [k for k in registry.backend.list("") if "/versions/" in k] == []


def test_concurrent_manifest_writers_lose_nothing(registry: Registry, good_adapter: Path) -> None:
    version = registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    count = 20
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def sharer() -> None:
        start.wait()
        try:
            for i in range(count):
                registry.share("acme", "bot", f"tenant-{i}")
        except BaseException as exc:
            errors.append(exc)

    def aliaser() -> None:
        start.wait()
        try:
            for i in range(count):
                registry.set_alias("acme", "bot", f"alias-{i}", version.sha)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sharer), threading.Thread(target=aliaser)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    manifest = registry.get_manifest("acme", "bot")
    assert set(manifest.shared_with) == {f"tenant-{i}" for i in range(count)}
    assert {f"alias-{i}" for i in range(count)} <= set(manifest.aliases)


def test_conditional_writes_are_atomic_under_concurrent_writers(backend: BlobBackend) -> None:
    """6 writers x 10 If-Match increments of one object: every increment lands once. 10 races
    of 3 If-None-Match creates: exactly one winner each. (On S3 this needs a server that
    serves requests concurrently and makes check-and-write atomic, as SeaweedFS does.)"""
    writers, increments = 6, 10
    backend.put("tenants/acme/counter", b"0")

    def increment() -> int:
        retries = 0
        for _ in range(increments):
            while True:
                data, etag = backend.get("tenants/acme/counter")
                try:
                    backend.put("tenants/acme/counter", b"%d" % (int(data) + 1), if_match=etag)
                    break
                except PreconditionFailed:
                    retries += 1
        return retries

    with ThreadPoolExecutor(writers) as pool:
        retries = sum(pool.map(lambda _: increment(), range(writers)))
    assert int(backend.get("tenants/acme/counter")[0]) == writers * increments
    assert retries > 0  # the writers did collide: the check above is not vacuous

    def create(race: int, writer: int) -> bool:
        try:
            backend.put(f"tenants/acme/race-{race}", b"%d" % writer, if_none_match=True)
            return True
        except PreconditionFailed:
            return False

    with ThreadPoolExecutor(3) as pool:
        for race in range(10):
            winners = [w for w, won in enumerate(pool.map(create, [race] * 3, range(3))) if won]
            assert len(winners) == 1, (race, winners)
            assert backend.get(f"tenants/acme/race-{race}")[0] == b"%d" % winners[0]


def test_aborted_upload_leaves_nothing(
    registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    declared = [registry_entry(good_adapter, name) for name in ADAPTER_FILES]

    def client_goes_away() -> None:
        with registry.begin_upload("acme", "bot", declared, created_by="t") as upload:
            upload.write(CONFIG_FILE, (good_adapter / CONFIG_FILE).read_bytes())
            upload.write(WEIGHTS_FILE, (good_adapter / WEIGHTS_FILE).read_bytes()[:100])
            raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        client_goes_away()
    assert registry.backend.list("") == []
    assert list((tmp_path / "spool").iterdir()) == []


def registry_entry(folder: Path, name: str) -> Any:
    from adapter_store import FileEntry

    return FileEntry(name, (folder / name).stat().st_size, sha256_file(folder / name))


class FailingBackend:
    """A real backend that fails one kind of write, to interrupt a commit."""

    def __init__(self, inner: BlobBackend, fail_on: str) -> None:
        self._inner = inner
        self._fail_on = fail_on

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def put(self, key: str, data: bytes, **kwargs: Any) -> str:
        if self._fail_on == "manifest":
            raise StoreUnavailable("store went away")
        return self._inner.put(key, data, **kwargs)

    def put_file(self, key: str, path: Path) -> None:
        if self._fail_on == "weights" and key.endswith(WEIGHTS_FILE):
            raise StoreUnavailable("store went away")
        self._inner.put_file(key, path)


@pytest.mark.parametrize("fail_on", ["manifest", "weights"])
def test_failed_commit_leaves_nothing(
    registry: Registry, good_adapter: Path, tmp_path: Path, fail_on: str
) -> None:
    failing = Registry(
        FailingBackend(registry.backend, fail_on), registry.spec, spool_dir=tmp_path / "spool"
    )
    with pytest.raises(StoreUnavailable):
        failing.upload_dir("acme", "bot", good_adapter, created_by="t")
    with pytest.raises(AdapterNotFound):
        registry.get_manifest("acme", "bot")
    assert registry.backend.list("") == []
    assert list((tmp_path / "spool").iterdir()) == []
