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
    BlobBackend,
    Conflict,
    InvalidAdapter,
    Manifest,
    Registry,
    StoreUnavailable,
)
from adapter_store.errors import PreconditionFailed
from adapter_store.model import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, sha256_file
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
    # The grant is in the grantee's share index, a marker under a key of validated names.
    assert registry.backend.list("tenants/globex/") == ["tenants/globex/shared/acme/bot"]
    assert registry.share_hints("globex") == {("acme", "bot")}
    registry.unshare("acme", "bot", "globex")
    with pytest.raises(AdapterNotFound):
        registry.resolve("globex", ref("acme/bot"))
    assert registry.backend.list("tenants/globex/") == []
    assert registry.list_shared_with("globex") == []
    # Sharing with oneself or a missing adapter writes nothing.
    registry.share("acme", "bot", "acme")
    with pytest.raises(AdapterNotFound):
        registry.share("acme", "nope", "globex")
    assert registry.backend.list("tenants/globex/") == []


class CountingBackend:
    """A real backend that records every call it serves (method, key or prefix)."""

    def __init__(self, inner: BlobBackend) -> None:
        self._inner = inner
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def counted(key: str, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, key))
            return attribute(key, *args, **kwargs)

        return counted


def test_shared_listing_reads_the_index_not_the_bucket(
    local_registry: Registry, good_adapter: Path
) -> None:
    """30 tenants' adapters in the store, 2 shared with globex: globex's listing and resolve
    read globex's index and those 2 manifests, nothing else (before: every manifest)."""
    for i in range(30):
        local_registry.upload_dir(f"tenant-{i:02}", "bot", good_adapter, created_by="t")
    local_registry.share("tenant-03", "bot", "globex")
    local_registry.share("tenant-17", "bot", "globex")
    counting = CountingBackend(local_registry.backend)
    registry = Registry(counting, local_registry.spec)

    shared = registry.list_shared_with("globex")
    print(f"\nlist_shared_with, 30 tenants in the store: {len(counting.calls)} store calls")
    assert [(m.tenant, m.name) for m in shared] == [("tenant-03", "bot"), ("tenant-17", "bot")]
    assert counting.calls[0] == ("list_page", "tenants/globex/shared/")
    assert sorted(counting.calls[1:]) == [  # read at once (adapter_store.pages.READERS)
        ("get", "tenants/tenant-03/adapters/bot/manifest.json"),
        ("get", "tenants/tenant-17/adapters/bot/manifest.json"),
    ]
    counting.calls.clear()
    with pytest.raises(AdapterNotFound):
        registry.resolve("globex", ref("tenant-05/bot"))  # exists, not shared: not even read
    assert counting.calls == [("list_page", "tenants/globex/shared/")]


class MeetingBackend:
    """A real backend whose manifest reads each wait until another one is under way too: a
    page that read its manifests one after another would break the barrier (10 s)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.barrier = threading.Barrier(2, timeout=10)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get(self, key: str) -> Any:
        if key.endswith("/manifest.json"):
            self.barrier.wait()
        return self._inner.get(key)


def test_a_page_reads_its_manifests_at_once(local_registry: Registry, good_adapter: Path) -> None:
    """A page of adapters read from the manifests (no listing index) reads them concurrently (a
    page of 1,000, one after another, took 5 s on SeaweedFS), and keeps the listing's order."""
    names = ["a", "b", "c", "d"]
    for name in names:
        local_registry.upload_dir("acme", name, good_adapter, created_by="t")
    registry = Registry(MeetingBackend(local_registry.backend), local_registry.spec)
    page = registry.manifest_page("acme", limit=4)
    assert [m.name for m in page.items] == names


def test_pages(registry: Registry, make_test_adapter: AdapterFactory) -> None:
    for i, name in enumerate(["a", "b-x", "b", "c", "d"]):
        registry.upload_dir("acme", name, make_test_adapter(seed=1 + i % 2), created_by="t")
        registry.share("acme", name, "globex")
    registry.revoke("acme", "c")
    seen: list[list[str]] = []
    after = ""
    while True:
        page = registry.adapter_page("acme", after=after, limit=2)
        seen.append([m.name for m in page.items])
        if page.next_after is None:
            break
        after = page.next_after
    # Pages follow the store's own listing order (byte order on AWS S3 and the local folder,
    # the filer's name order on SeaweedFS: "b/" before "b-x/"): every live adapter exactly
    # once, at most 2 per page, the revoked "c" leaving a short page behind it.
    assert [len(page) <= 2 for page in seen] == [True] * len(seen)
    names = [name for page in seen for name in page]
    assert sorted(names) == ["a", "b", "b-x", "d"]
    assert len(seen) == 3
    assert sorted(m.name for m in registry.list_adapters("acme")) == ["a", "b", "b-x", "d"]
    shared = registry.shared_page("globex", limit=3)
    rest = registry.shared_page("globex", after=shared.next_after or "", limit=3)
    assert shared.next_after is not None
    assert rest.next_after is None
    # c is revoked: its marker is gone.
    assert sorted(m.name for m in [*shared.items, *rest.items]) == ["a", "b", "b-x", "d"]
    assert len(shared.items) == 3
    assert registry.tenant_page(limit=1).items == ["acme"]
    assert registry.list_tenants() == ["acme", "globex"]
    for bad in (0, 1001, True):
        with pytest.raises(InvalidAdapter):
            registry.adapter_page("acme", limit=bad)
    with pytest.raises(InvalidAdapter):
        registry.adapter_page("acme", after="\n")


class FailingShareWrites:
    """A real backend that fails writes of manifests or of share markers."""

    def __init__(self, inner: BlobBackend, fail_on: str) -> None:
        self._inner = inner
        self.fail_on = fail_on

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self, key: str) -> None:
        kind = (
            "marker" if "/shared/" in key else "manifest" if key.endswith("manifest.json") else ""
        )
        if kind == self.fail_on:
            raise StoreUnavailable("store went away")

    def put(self, key: str, data: bytes, **kwargs: Any) -> str:
        self._check(key)
        return self._inner.put(key, data, **kwargs)

    def delete(self, key: str) -> None:
        self._check(key)
        self._inner.delete(key)


def test_share_index_survives_interrupted_writes_and_repairs(
    registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    registry.upload_dir("acme", "old", good_adapter, created_by="t")
    failing = FailingShareWrites(registry.backend, "manifest")
    broken = Registry(failing, registry.spec, spool_dir=tmp_path / "spool")

    # Share cut between the marker and the manifest: a marker nothing confirms, harmless.
    with pytest.raises(StoreUnavailable):
        broken.share("acme", "bot", "globex")
    assert registry.share_hints("globex") == {("acme", "bot")}
    assert registry.list_shared_with("globex") == []
    with pytest.raises(AdapterNotFound):
        registry.resolve("globex", ref("acme/bot"))

    # Unshare cut between the manifest and the marker: the grant is gone all the same.
    registry.share("acme", "old", "initech")
    failing.fail_on = "marker"
    with pytest.raises(StoreUnavailable):
        broken.unshare("acme", "old", "initech")
    assert registry.get_manifest("acme", "old").shared_with == ()
    assert registry.share_hints("initech") == {("acme", "old")}
    with pytest.raises(AdapterNotFound):
        registry.resolve("initech", ref("acme/old"))

    # A grant without its marker (a share made before the index existed): invisible to the
    # grantee until the repair writes the marker.
    registry.share("acme", "old", "umbrella")
    registry.backend.delete("tenants/umbrella/shared/acme/old")
    with pytest.raises(AdapterNotFound):
        registry.resolve("umbrella", ref("acme/old"))

    report = registry.repair_share_index()
    assert (report.added, report.removed, report.grants) == (1, 2, 1)
    assert registry.share_hints("globex") == frozenset()
    assert registry.share_hints("initech") == frozenset()
    assert registry.resolve("umbrella", ref("acme/old")).name == "old"
    again = registry.repair_share_index()
    assert (again.added, again.removed) == (0, 0)


def test_whole_revoke_removes_the_markers(
    registry: Registry, good_adapter: Path, make_test_adapter: AdapterFactory
) -> None:
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    registry.share("acme", "bot", "globex")
    registry.share("acme", "bot", "initech")
    registry.revoke("acme", "bot")
    assert registry.share_hints("globex") == registry.share_hints("initech") == frozenset()
    # Uploaded again (new content: revoked content never comes back), it starts unshared.
    registry.upload_dir("acme", "bot", make_test_adapter(seed=2), created_by="t")
    with pytest.raises(AdapterNotFound):
        registry.resolve("globex", ref("acme/bot"))


def test_concurrent_share_and_unshare_never_leave_a_grant_without_its_marker(
    local_registry: Registry, good_adapter: Path
) -> None:
    registry = local_registry
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    for round_ in range(10):
        start = threading.Barrier(2)
        failures: list[BaseException] = []

        def run(
            action: Any, start: threading.Barrier = start, failures: list[BaseException] = failures
        ) -> None:
            start.wait()
            try:
                action("acme", "bot", "globex")
            except BaseException as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=run, args=(registry.share,)),
            threading.Thread(target=run, args=(registry.unshare,)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        granted = "globex" in registry.get_manifest("acme", "bot").shared_with
        if granted:  # the manifest is the truth: a grant always has its marker
            assert registry.share_hints("globex") == {("acme", "bot")}, round_
        registry.unshare("acme", "bot", "globex")


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


def test_repair_shares_command(
    local_registry: Registry, good_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lora-gateway store repair-shares` on a store whose grant lost its marker (a share made
    before the index existed): the marker is written, and the grantee sees the adapter."""
    import json

    from lora_gateway.cli import main

    registry = local_registry
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    registry.share("acme", "bot", "globex")
    registry.backend.delete("tenants/globex/shared/acme/bot")
    with pytest.raises(AdapterNotFound):
        registry.resolve("globex", ref("acme/bot"))
    store = f"file://{tmp_path / 'store'}"
    assert main(["store", "repair-shares", "--store", store, "--json"], environ={}) == 0
    assert json.loads(capsys.readouterr().out) == {
        "adapters": 1,
        "grants": 1,
        "added": 1,
        "removed": 0,
    }
    assert registry.resolve("globex", ref("acme/bot")).name == "bot"
    assert main(["store", "repair-shares", "--store", store], environ={}) == 0
    assert "wrote 0 missing share markers, removed 0" in capsys.readouterr().out
