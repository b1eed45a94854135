"""The store's budgets: the upload spool, per-tenant storage quotas, and compositions bounded
before any fetch with their memory measured. Local folder and S3 over HTTP (SeaweedFS)."""

from __future__ import annotations

import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from adapter_store import AdapterRef, BaseModelSpec, BlobBackend, FileEntry, Limits, Registry
from adapter_store.errors import CapacityExceeded, InvalidAdapter, QuotaExceeded, SpoolFull
from adapter_store.model import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, sha256_file
from adapter_store.quota import Quota, Usage
from adapter_store.spool import Spool
from lora_gateway import devtools
from tests.conftest import AdapterFactory

BIG = 1 << 40


def declared(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(name, (folder / name).stat().st_size, sha256_file(folder / name))
        for name in ADAPTER_FILES
    ]


def size_of(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in ADAPTER_FILES)


# --- the spool ---------------------------------------------------------------------------------


def test_spool_budget_refuses_at_the_header_and_frees_on_abort(
    backend: BlobBackend, spec: BaseModelSpec, tmp_path: Path, good_adapter: Path
) -> None:
    size = size_of(good_adapter)
    spool = Spool(tmp_path / "spool", budget_bytes=2 * size + 10, sessions=True)
    registry = Registry(backend, spec, spool=spool)
    first = registry.begin_upload("acme", "a", declared(good_adapter), created_by="t")
    second = registry.begin_upload("globex", "b", declared(good_adapter), created_by="t")
    assert spool.reserved_bytes == 2 * size
    before = sorted(p.name for p in spool.working_folder.iterdir())
    with pytest.raises(SpoolFull) as info:
        registry.begin_upload("initech", "c", declared(good_adapter), created_by="t")
    assert str(info.value).startswith("the upload spool is full: ")
    assert "try again later" in str(info.value)
    # nothing was created for the refused one
    assert sorted(p.name for p in spool.working_folder.iterdir()) == before
    first.abort()
    assert spool.reserved_bytes == size
    with registry.begin_upload("initech", "c", declared(good_adapter), created_by="t") as third:
        for name in ADAPTER_FILES:
            third.write(name, (good_adapter / name).read_bytes())
        third.commit()
    second.abort()
    assert spool.reserved_bytes == 0
    assert list(spool.working_folder.iterdir()) == []


def test_spool_sessions_of_dead_processes_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    old = Spool(root, sessions=True)
    folder = old.folder("upload-")
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    # A live session is left alone ...
    live = Spool(root, sessions=True)
    assert folder.exists()
    assert live.working_folder != old.working_folder
    # ... a dead one (its lock released, as when its process is gone) is removed.
    assert old._session_lock is not None
    old._session_lock.close()
    Spool(root, sessions=True).folder("upload-")
    assert not folder.exists()
    assert live.working_folder.exists()


# --- quotas ------------------------------------------------------------------------------------


def _adapters(make_test_adapter: AdapterFactory, count: int, base: int = 300) -> list[Path]:
    return [make_test_adapter(seed=base + i) for i in range(count)]


def test_quota_on_bytes_is_exact_under_concurrent_uploads(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    folders = _adapters(make_test_adapter, 8)
    size = size_of(folders[0])
    assert all(size_of(f) == size for f in folders)
    quota = Quota(max_stored_bytes=3 * size + size // 2, max_adapters=100)
    start = threading.Barrier(len(folders))

    def upload(index: int) -> str:
        start.wait()
        try:
            registry.upload_dir("acme", f"a{index}", folders[index], created_by="t", quota=quota)
        except QuotaExceeded as exc:
            return str(exc)
        return "ok"

    with ThreadPoolExecutor(len(folders)) as pool:
        outcomes = list(pool.map(upload, range(len(folders))))
    assert outcomes.count("ok") == 3, outcomes
    refusal = next(o for o in outcomes if o != "ok")
    assert refusal.startswith("storage quota of tenant acme exceeded: ")
    usage = registry.usage("acme")
    assert (usage.stored_bytes, usage.adapters) == (3 * size, 3)
    assert registry.recount_usage("acme").stored_bytes == 3 * size  # the counter was right
    # a revoked version gives its bytes back, and the next upload fits
    stored = [m.name for m in registry.list_adapters("acme")]
    registry.revoke("acme", stored[0])
    assert registry.usage("acme") == Usage("acme", 2 * size, 2, registry.usage("acme").etag)
    refused = next(i for i, o in enumerate(outcomes) if o != "ok")
    registry.upload_dir("acme", "again", folders[refused], created_by="t", quota=quota)
    assert registry.usage("acme").stored_bytes == 3 * size


def test_quota_on_adapters_counts_names_not_versions(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    folders = _adapters(make_test_adapter, 4, base=320)
    quota = Quota(max_stored_bytes=BIG, max_adapters=2)
    registry.upload_dir("acme", "one", folders[0], created_by="t", quota=quota)
    registry.upload_dir("acme", "two", folders[1], created_by="t", quota=quota)
    # a new version of an existing adapter is not a new adapter
    registry.upload_dir("acme", "two", folders[2], created_by="t", quota=quota)
    # the same bytes again add nothing
    registry.upload_dir("acme", "two", folders[2], created_by="t", quota=quota)
    with pytest.raises(QuotaExceeded, match=r"adapter quota of tenant acme reached: 2 of 2"):
        registry.begin_upload("acme", "three", declared(folders[3]), created_by="t", quota=quota)
    usage = registry.usage("acme")
    assert usage.adapters == 2
    assert usage.stored_bytes == sum(size_of(f) for f in folders[:3])
    # another tenant has its own count
    registry.upload_dir("globex", "three", folders[3], created_by="t", quota=quota)
    assert registry.usage("globex").adapters == 1


def test_quota_refused_at_the_header_before_any_byte(
    registry: Registry, good_adapter: Path
) -> None:
    quota = Quota(max_stored_bytes=size_of(good_adapter) - 1, max_adapters=10)
    with pytest.raises(QuotaExceeded, match="this upload needs"):
        registry.begin_upload("acme", "bot", declared(good_adapter), created_by="t", quota=quota)
    assert registry.spool.reserved_bytes == 0


def test_usage_of_adapters_stored_before_quotas_is_counted_once(
    registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    folders = _adapters(make_test_adapter, 2, base=340)
    for i, folder in enumerate(folders):
        registry.upload_dir("acme", f"old{i}", folder, created_by="t")  # no quota: not counted
    usage = registry.usage("acme")  # first read: one bounded scan of acme's manifests
    assert (usage.stored_bytes, usage.adapters) == (sum(size_of(f) for f in folders), 2)
    registry.revoke("acme", "old0")
    assert registry.usage("acme").adapters == 1


# --- composition: bounded from the manifests, memory measured ---------------------------------


class CountingBackend:
    """A real backend that counts the object downloads a composition makes."""

    def __init__(self, inner: BlobBackend) -> None:
        self._inner = inner
        self.downloads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def download_file(self, key: str, dest: Path) -> None:
        self.downloads += 1
        self._inner.download_file(key, dest)


@pytest.fixture
def counted(local_registry: Registry, spec: BaseModelSpec, tmp_path: Path) -> Registry:
    backend = CountingBackend(local_registry.backend)
    return Registry(
        backend,
        spec,
        Limits(max_compose_parts=4, max_compose_bytes=1 << 20),
        spool=Spool(tmp_path / "compose-spool", budget_bytes=64 << 20),
    )


def _downloads(registry: Registry) -> int:
    return int(registry.backend.downloads)  # type: ignore[attr-defined]


def test_compose_refused_from_the_manifests_before_any_fetch(
    counted: Registry, make_test_adapter: AdapterFactory
) -> None:
    small = make_test_adapter(seed=361, rank=8)
    big = make_test_adapter(seed=362, rank=40)
    counted.upload_dir("acme", "small", small, created_by="t")
    counted.upload_dir("acme", "big", big, created_by="t")
    ref = AdapterRef.parse
    with pytest.raises(CapacityExceeded, match="5 parts exceeds the cap of 4 parts"):
        counted.compose("acme", "mix", [(ref("small"), 0.1)] * 5, created_by="t")
    with pytest.raises(InvalidAdapter, match=r"composed rank 80 .* exceeds the maximum rank 64"):
        counted.compose("acme", "mix", [(ref("big"), 1.0), (ref("big"), 1.0)], created_by="t")
    counted.limits = Limits(max_compose_parts=4, max_compose_bytes=3 * size_of(small))
    with pytest.raises(CapacityExceeded, match="the parts of this composition store"):
        counted.compose("acme", "mix", [(ref("small"), 0.1)] * 4, created_by="t")
    assert _downloads(counted) == 0, "nothing fetched for a refused composition"
    counted.compose("acme", "mix", [(ref("small"), 0.5), (ref("small"), 0.5)], created_by="t")
    assert _downloads(counted) == 4
    assert counted.spool.reserved_bytes == 0


def test_compose_spool_budget_and_quota(
    local_registry: Registry, spec: BaseModelSpec, tmp_path: Path, good_adapter: Path
) -> None:
    size = size_of(good_adapter)
    registry = Registry(
        local_registry.backend, spec, spool=Spool(tmp_path / "tight", budget_bytes=2 * size)
    )
    registry.upload_dir("acme", "part", good_adapter, created_by="t")
    parts = [(AdapterRef.parse("part"), 0.5), (AdapterRef.parse("part"), 0.5)]
    # the parts fit the spool, their result (as large again) does not
    with pytest.raises(SpoolFull, match="the composed adapter needs"):
        registry.compose("acme", "mix", parts, created_by="t")
    assert registry.spool.reserved_bytes == 0
    quota = Quota(max_stored_bytes=size + 100, max_adapters=10)
    with pytest.raises(QuotaExceeded, match="this composition needs"):
        local_registry.compose("acme", "mix", parts, created_by="t", quota=quota)


MEMORY_PARTS = 8


def test_compose_peak_memory_is_one_result_plus_one_module(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    """8 parts of rank 8 on every module: the result (rank 64) is the largest thing in memory,
    once (its validation before publishing, as for any upload); the parts never are."""
    folders = [
        make_test_adapter(seed=380 + i, rank=8, target_modules=devtools.ALL_MODULES)
        for i in range(MEMORY_PARTS)
    ]
    for i, folder in enumerate(folders):
        local_registry.upload_dir("acme", f"p{i}", folder, created_by="t")
    parts = [(AdapterRef.parse(f"p{i}"), 1.0 / MEMORY_PARTS) for i in range(MEMORY_PARTS)]
    part_bytes = sum(size_of(f) for f in folders)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        version = local_registry.compose("acme", "mix", parts, created_by="t")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result = next(f.size for f in version.files if f.filename == WEIGHTS_FILE)
    over = peak - base
    budget = result + result // 4 + (1 << 20)  # docs/reliability.md: the compose memory budget
    print(
        f"\ncompose of {MEMORY_PARTS} parts ({part_bytes / 1024:.0f} KiB stored) into "
        f"{result / 1024:.0f} KiB: peak traced memory {over / 1024:.0f} KiB "
        f"({over / result:.2f} x the result; budget {budget / 1024:.0f} KiB)"
    )
    assert version.rank == 8 * MEMORY_PARTS
    assert over <= budget
    assert CONFIG_FILE in {f.filename for f in version.files}
