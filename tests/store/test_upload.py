"""The streamed upload (adapter_store.upload) on its own: its header checks, its byte checks, and
its public hand-over (a `SpooledAdapter` to the `publish` callable it was started with), then
`Registry.publish` taking a spooled adapter that no upload made."""

from __future__ import annotations

import ast
import hashlib
import shutil
from pathlib import Path

import pytest

import adapter_store
from adapter_store import (
    AdapterRef,
    AdapterVersion,
    CapacityExceeded,
    FileEntry,
    InvalidAdapter,
    Limits,
    Registry,
    SpooledAdapter,
    Upload,
)
from adapter_store.errors import SpoolFull
from adapter_store.model import (
    ADAPTER_FILES,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    sha256_file,
    version_sha,
)
from adapter_store.spool import Spool
from adapter_store.upload import check_declared, check_metadata, declare_folder

CONFIG = b'{"r": 8}'
WEIGHTS = bytes(range(256)) * 40


def entry(filename: str, data: bytes) -> FileEntry:
    return FileEntry(filename, len(data), hashlib.sha256(data).hexdigest())


def header(config: bytes = CONFIG, weights: bytes = WEIGHTS) -> list[FileEntry]:
    return [entry(CONFIG_FILE, config), entry(WEIGHTS_FILE, weights)]


class Handover:
    """A `publish` callable that records what it was handed (and what the folder held then)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[SpooledAdapter] = []
        self.files: dict[str, bytes] = {}
        self.reserved = -1

    def __call__(self, adapter: SpooledAdapter) -> AdapterVersion:
        self.calls.append(adapter)
        self.files = {name: path.read_bytes() for name, path in adapter.paths().items()}
        self.reserved = adapter.space.nbytes if adapter.space is not None else -1
        if self.error is not None:
            raise self.error
        return "published"  # type: ignore[return-value]


def spool_of(tmp_path: Path, budget: int | None = None) -> Spool:
    return Spool(tmp_path / "spool", budget)


def test_commit_hands_the_received_files_over_then_frees_everything(tmp_path: Path) -> None:
    spool = spool_of(tmp_path, budget=len(CONFIG) + len(WEIGHTS))
    publish = Handover()
    upload = Upload.start(spool, header(), publish)
    assert spool.reserved_bytes == len(CONFIG) + len(WEIGHTS)
    upload.write(CONFIG_FILE, CONFIG)
    for start in range(0, len(WEIGHTS), 1000):
        upload.write(WEIGHTS_FILE, WEIGHTS[start : start + 1000])
    assert upload.commit() == "published"
    [handed] = publish.calls
    assert publish.files == {CONFIG_FILE: CONFIG, WEIGHTS_FILE: WEIGHTS}
    assert list(handed.paths()) == list(ADAPTER_FILES)
    assert publish.reserved == len(CONFIG) + len(WEIGHTS)  # held while publishing
    assert not handed.folder.exists()
    assert spool.reserved_bytes == 0
    with pytest.raises(InvalidAdapter, match="already committed"):
        upload.write(CONFIG_FILE, b"x")


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([(CONFIG_FILE, CONFIG + b"x")], "larger than its declared size"),
        ([(WEIGHTS_FILE, WEIGHTS)], "declared order"),
        ([(CONFIG_FILE, CONFIG[:2]), (WEIGHTS_FILE, WEIGHTS)], "declared order"),
        ([(CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS), (CONFIG_FILE, b"")], "declared order"),
        ([("adapter_model.bin", b"x")], "unexpected chunk"),
    ],
)
def test_a_bad_chunk_aborts_at_once(
    tmp_path: Path, chunks: list[tuple[str, bytes]], message: str
) -> None:
    spool = spool_of(tmp_path)
    publish = Handover()
    upload = Upload.start(spool, header(), publish)
    *first, (last_file, last_data) = chunks
    for filename, data in first:
        upload.write(filename, data)
    with pytest.raises(InvalidAdapter, match=message):
        upload.write(last_file, last_data)
    assert publish.calls == []
    assert list(spool.working_folder.iterdir()) == []
    assert spool.reserved_bytes == 0


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([(CONFIG_FILE, CONFIG)], "upload incomplete"),
        ([(CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS[:-1])], "upload incomplete"),
        ([(CONFIG_FILE, CONFIG[::-1]), (WEIGHTS_FILE, WEIGHTS)], "sha256 mismatch"),
    ],
)
def test_commit_refuses_what_does_not_match_the_header(
    tmp_path: Path, chunks: list[tuple[str, bytes]], message: str
) -> None:
    spool = spool_of(tmp_path)
    publish = Handover()
    upload = Upload.start(spool, header(), publish)
    for filename, data in chunks:
        upload.write(filename, data)
    with pytest.raises(InvalidAdapter, match=message):
        upload.commit()
    assert publish.calls == []
    assert list(spool.working_folder.iterdir()) == []
    assert spool.reserved_bytes == 0


def test_a_failed_publish_leaves_nothing_in_the_spool(tmp_path: Path) -> None:
    spool = spool_of(tmp_path)
    publish = Handover(CapacityExceeded("full"))
    upload = Upload.start(spool, header(), publish)
    upload.write(CONFIG_FILE, CONFIG)
    upload.write(WEIGHTS_FILE, WEIGHTS)
    with pytest.raises(CapacityExceeded):
        upload.commit()
    assert len(publish.calls) == 1
    assert list(spool.working_folder.iterdir()) == []
    assert spool.reserved_bytes == 0


def test_an_exception_in_the_caller_aborts(tmp_path: Path) -> None:
    spool = spool_of(tmp_path)
    publish = Handover()

    def interrupted() -> None:
        with Upload.start(spool, header(), publish) as upload:
            upload.write(CONFIG_FILE, CONFIG)
            raise KeyError("the client went away")

    with pytest.raises(KeyError):
        interrupted()
    assert publish.calls == []
    assert list(spool.working_folder.iterdir()) == []
    assert spool.reserved_bytes == 0


def test_start_reserves_the_header_or_refuses(tmp_path: Path) -> None:
    spool = spool_of(tmp_path, budget=len(CONFIG) + len(WEIGHTS) - 1)
    with pytest.raises(SpoolFull):
        Upload.start(spool, header(), Handover())
    assert spool.reserved_bytes == 0
    # A header that check_declared did not return is refused, and gives its space back.
    roomy = spool_of(tmp_path / "roomy")
    with pytest.raises(InvalidAdapter, match="check_declared"):
        Upload.start(roomy, list(reversed(header())), Handover())
    assert roomy.reserved_bytes == 0


def test_check_declared() -> None:
    limits = Limits(max_file_bytes=len(WEIGHTS), max_config_bytes=len(CONFIG))
    config, weights = header()
    # Any order in, the adapter's order out; "sha256:" prefixes dropped.
    prefixed = FileEntry(CONFIG_FILE, config.size, f"sha256:{config.sha256}")
    assert check_declared([weights, prefixed], limits) == [config, weights]
    refused: list[tuple[list[FileEntry], type[Exception], str]] = [
        ([config], InvalidAdapter, f"missing file {WEIGHTS_FILE}"),
        ([config, config, weights], InvalidAdapter, "declared twice"),
        ([config, weights, entry("adapter_model.bin", b"")], InvalidAdapter, "pickle"),
        ([config, FileEntry(WEIGHTS_FILE, -1, weights.sha256)], InvalidAdapter, "invalid size"),
        ([config, FileEntry(WEIGHTS_FILE, True, weights.sha256)], InvalidAdapter, "invalid size"),
        ([config, FileEntry(WEIGHTS_FILE, 1, "00" * 31)], InvalidAdapter, "sha256 of"),
        ([config, entry(WEIGHTS_FILE, WEIGHTS + b"x")], CapacityExceeded, "above the cap"),
        ([entry(CONFIG_FILE, CONFIG + b" "), weights], CapacityExceeded, "above the cap"),
    ]
    for declared, error, message in refused:
        with pytest.raises(error, match=message):
            check_declared(declared, limits)


def test_a_chat_template_is_declared_after_the_two_files_within_its_cap() -> None:
    config, weights = header()
    template = entry(CHAT_TEMPLATE_FILE, b"{{ messages }}")
    limits = Limits(max_chat_template_bytes=template.size)
    assert check_declared([template, weights, config], limits) == [config, weights, template]
    big = entry(CHAT_TEMPLATE_FILE, b"{{ messages }} ")
    # A template above its cap is an invalid file (INVALID_ARGUMENT), refused from the header.
    with pytest.raises(InvalidAdapter, match="chat_template_max_bytes"):
        check_declared([config, weights, big], limits)
    with pytest.raises(InvalidAdapter, match="missing file"):
        check_declared([config, template], limits)
    with pytest.raises(InvalidAdapter, match=r"unsupported file 'tokenizer_config\.json'"):
        check_declared([config, weights, entry("tokenizer_config.json", b"{}")], limits)


def test_a_chat_template_is_stored_checked_and_in_the_content_address(
    local_registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "templated"
    shutil.copytree(good_adapter, folder)
    plain = local_registry.upload_dir("acme", "plain", folder, created_by="t")
    (folder / CHAT_TEMPLATE_FILE).write_text("{{ messages[0]['content'] }}")
    checked: list[str] = []
    version = local_registry.upload_dir(
        "acme", "bot", folder, created_by="t", check_template=checked.append
    )
    assert checked == ["{{ messages[0]['content'] }}"]
    assert version.chat_template is not None
    assert version.chat_template.sha256 == sha256_file(folder / CHAT_TEMPLATE_FILE)
    assert [f.filename for f in version.files] == [*ADAPTER_FILES, CHAT_TEMPLATE_FILE]
    assert version.sha == version_sha(version.files) != plain.sha
    assert local_registry.resolve("acme", AdapterRef.parse("bot")) == version
    fetched = tmp_path / "fetched.jinja"
    local_registry.fetch_file(version, CHAT_TEMPLATE_FILE, fetched)
    assert fetched.read_bytes() == (folder / CHAT_TEMPLATE_FILE).read_bytes()
    # A different template: a different version.
    (folder / CHAT_TEMPLATE_FILE).write_text("{{ messages[-1]['content'] }}")
    other = local_registry.upload_dir(
        "acme", "bot", folder, created_by="t", check_template=checked.append
    )
    assert other.sha != version.sha
    # Revoking deletes the template's object with the others.
    local_registry.revoke("acme", "bot")
    keys = local_registry.backend.list("tenants/acme/adapters/bot/versions/")
    assert keys == []


@pytest.mark.parametrize(
    ("data", "check", "message"),
    [
        (b"{{ messages }}", None, "not accepted here"),
        (b"\xff{{ messages }}", "ok", "not UTF-8"),
        (b"   ", "ok", "is empty"),
        (b"{{ messages }}", "refuse", "the check's reason"),
    ],
)
def test_a_refused_chat_template_stores_nothing(
    local_registry: Registry,
    good_adapter: Path,
    tmp_path: Path,
    data: bytes,
    check: str | None,
    message: str,
) -> None:
    folder = tmp_path / "templated"
    shutil.copytree(good_adapter, folder)
    (folder / CHAT_TEMPLATE_FILE).write_bytes(data)

    def refuse(text: str) -> None:
        raise InvalidAdapter(f"{CHAT_TEMPLATE_FILE}: the check's reason")

    checks = {None: None, "ok": lambda text: None, "refuse": refuse}
    with pytest.raises(InvalidAdapter, match=message):
        local_registry.upload_dir(
            "acme", "bot", folder, created_by="t", check_template=checks[check]
        )
    assert local_registry.list_adapters("acme") == []
    assert local_registry.backend.list("tenants/") == []
    assert local_registry.spool.reserved_bytes == 0


def test_check_metadata() -> None:
    limits = Limits(max_description_chars=10)
    check_metadata("alice", "d" * 10, limits)
    for created_by, description in (("a" * 257, ""), (None, ""), ("alice", "d" * 11), ("", 3)):
        with pytest.raises(InvalidAdapter, match="must be a string"):
            check_metadata(created_by, description, limits)


def test_a_folder_is_declared_and_written(good_adapter: Path, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    (folder / "README.md").write_text("ignored")
    declared = declare_folder(folder)
    assert [e.filename for e in declared] == sorted(ADAPTER_FILES)
    assert all(e.sha256 == sha256_file(folder / e.filename) for e in declared)
    publish = Handover()
    upload = Upload.start(spool_of(tmp_path), check_declared(declared, Limits()), publish)
    upload.write_folder(folder)
    upload.commit()
    assert publish.files == {f: (folder / f).read_bytes() for f in ADAPTER_FILES}
    (folder / "link").symlink_to(folder / CONFIG_FILE)
    with pytest.raises(InvalidAdapter, match="not a regular file"):
        declare_folder(folder)


def test_registry_publishes_a_spooled_adapter_no_upload_made(
    registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "made-here"
    shutil.copytree(good_adapter, folder)
    version = registry.publish(
        "acme", "bot", SpooledAdapter(folder), created_by="t", aliases=("prod",)
    )
    assert registry.resolve("acme", AdapterRef.parse("bot@prod")) == version
    assert {e.sha256 for e in version.files} == {
        sha256_file(good_adapter / f) for f in ADAPTER_FILES
    }
    assert all((folder / f).is_file() for f in ADAPTER_FILES)  # the folder stays the caller's
    # It validates what it is handed: nothing of an invalid adapter is stored.
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(InvalidAdapter):
        registry.publish("acme", "broken", SpooledAdapter(folder), created_by="t")
    assert [m.name for m in registry.list_adapters("acme")] == ["bot"]
    with pytest.raises(InvalidAdapter):
        registry.publish("acme", "../x", SpooledAdapter(folder), created_by="t")


def _private_reaches(source: str) -> set[str]:
    """`x._name` where x is not `self` or `cls`: a use of another object's private name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.add(ast.unparse(node))
    return found


def test_no_store_module_uses_another_objects_private_names() -> None:
    """The upload hands its files to a `publish` callable and knows nothing else of the
    registry (before the split, `Upload.commit` called `self._registry._publish`). Across the
    package, one object reaches into another's private names in one place only: a `SpoolSpace`
    into the `Spool` it was reserved from (one module, one lock)."""
    assert _private_reaches("self._registry._publish(x)") == {"self._registry._publish"}
    package = Path(adapter_store.__file__).parent
    reaches = {
        (source.name, reach)
        for source in sorted(package.glob("*.py"))
        for reach in _private_reaches(source.read_text())
    }
    assert reaches == {("spool.py", "self._spool._take"), ("spool.py", "self._spool._give")}
    upload = ast.parse((package / "upload.py").read_text())
    imported = {n.module for n in ast.walk(upload) if isinstance(n, ast.ImportFrom)}
    assert "adapter_store.registry" not in imported
    assert "adapter_store.spool" in imported  # the check above sees this module's imports
