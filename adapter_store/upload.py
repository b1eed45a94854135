"""The streamed upload: bytes spooled as they arrive, hashed and size-capped, then handed over.

An upload is checked in two steps, each before anything is spent on it:

1. its header (`check_declared`): `adapter_config.json` and `adapter_model.safetensors`, and
   optionally `chat_template.jinja` (never a pickle format, nothing else), each with a size
   within its cap and a well-formed sha256; and its metadata (`check_metadata`). The registry
   then checks the tenant's quota, and `Upload.start` reserves the declared sizes in the spool
   (SpoolFull beyond its budget);
2. its bytes (`Upload.write`): file by file in the declared order, never more than a file's
   declared size, hashed as they arrive; `Upload.commit` checks every size and sha256 against
   the header.

What a complete upload produces is a `SpooledAdapter` (its files in a private spool folder,
received in full and matching the header), handed to the `publish` callable the upload was
started with: for `Registry.begin_upload`, `Registry.publish` (which validates and stores it).
The upload knows nothing else of the registry. Any error aborts the upload: its folder is
removed and its spool space given back; nothing was published.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO

from adapter_store.errors import CapacityExceeded, InvalidAdapter
from adapter_store.model import (
    ADAPTER_FILES,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    OPTIONAL_FILES,
    VERSION_FILES,
    WEIGHTS_FILE,
    AdapterVersion,
    FileEntry,
    Limits,
    check_sha,
    sha256_file,
)
from adapter_store.spool import Spool, SpoolSpace

__all__ = [
    "Publish",
    "SpooledAdapter",
    "TemplateCheck",
    "Upload",
    "check_declared",
    "check_metadata",
    "declare_folder",
]

_CHUNK = 1024 * 1024
#: The longest `created_by` accepted.
MAX_CREATED_BY_CHARS = 256


@dataclass(frozen=True)
class SpooledAdapter:
    """An adapter's files in a spool folder, not validated yet (`Registry.publish` does).

    From an upload, every file matches the size and sha256 its header declared; from a
    composition, the store wrote them itself. `space` holds their bytes in the spool's budget
    (a rewrite while publishing grows it). Whoever made it removes the folder and releases the
    space afterwards, published or not.
    """

    folder: Path
    space: SpoolSpace | None = None

    def paths(self) -> dict[str, Path]:
        """Each file of `ADAPTER_FILES`, then each of `OPTIONAL_FILES` the folder holds, in that
        order, and where it is."""
        paths = {filename: self.folder / filename for filename in ADAPTER_FILES}
        for filename in OPTIONAL_FILES:
            if (self.folder / filename).is_file():
                paths[filename] = self.folder / filename
        return paths


#: What a complete upload is handed to; returns the published version.
Publish = Callable[[SpooledAdapter], AdapterVersion]
#: Checks the text of an uploaded chat_template.jinja (the gateway's: it compiles the template
#: in its sandbox and renders a sample conversation); raises InvalidAdapter with the reason.
#: Blocking: it runs in the publishing thread.
TemplateCheck = Callable[[str], None]


def check_declared(declared: Sequence[FileEntry], limits: Limits) -> list[FileEntry]:
    """The header of an upload, checked: one entry per file of `ADAPTER_FILES`, then one per
    file of `OPTIONAL_FILES` it declares, in that order (the order the bytes must come in).

    InvalidAdapter for an unsupported, duplicate or missing file, an invalid size or sha256, a
    chat template above `limits.max_chat_template_bytes`; CapacityExceeded for a size above its
    cap (`limits.max_config_bytes` for the config, `limits.max_file_bytes` for the weights).
    """
    by_name: dict[str, FileEntry] = {}
    for entry in declared:
        if entry.filename not in VERSION_FILES:
            raise InvalidAdapter(
                f"unsupported file {str(entry.filename)[:80]!r}: an adapter is "
                f"{CONFIG_FILE} and {WEIGHTS_FILE}, and optionally {CHAT_TEMPLATE_FILE} (.bin, "
                ".pt and other pickle formats are never loaded)"
            )
        if entry.filename in by_name:
            raise InvalidAdapter(f"file {entry.filename} is declared twice")
        if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
            raise InvalidAdapter(f"file {entry.filename} declares an invalid size")
        if entry.filename == CHAT_TEMPLATE_FILE and entry.size > limits.max_chat_template_bytes:
            raise InvalidAdapter(
                f"file {entry.filename} declares {entry.size} bytes, above the cap of "
                f"{limits.max_chat_template_bytes} (chat_template_max_bytes)"
            )
        cap = limits.max_config_bytes if entry.filename == CONFIG_FILE else limits.max_file_bytes
        if entry.size > cap:
            raise CapacityExceeded(
                f"file {entry.filename} declares {entry.size} bytes, above the cap of {cap}"
            )
        by_name[entry.filename] = replace(
            entry, sha256=check_sha(entry.sha256, f"sha256 of {entry.filename}")
        )
    for filename in ADAPTER_FILES:
        if filename not in by_name:
            raise InvalidAdapter(f"missing file {filename}")
    return [by_name[filename] for filename in VERSION_FILES if filename in by_name]


def check_metadata(created_by: object, description: object, limits: Limits) -> None:
    """InvalidAdapter unless `created_by` and `description` are strings within their caps."""
    if not isinstance(created_by, str) or len(created_by) > MAX_CREATED_BY_CHARS:
        raise InvalidAdapter(
            f"created_by must be a string of at most {MAX_CREATED_BY_CHARS} characters"
        )
    if not isinstance(description, str) or len(description) > limits.max_description_chars:
        raise InvalidAdapter(
            f"description must be a string of at most {limits.max_description_chars} characters"
        )


def declare_folder(path: Path) -> list[FileEntry]:
    """The header of a local PEFT adapter folder: each regular file's size and sha256 (a
    README.md in it is ignored); InvalidAdapter for a link or anything else not a file.
    `check_declared` then refuses any file that is not one of `VERSION_FILES`."""
    files = sorted(p for p in Path(path).iterdir() if p.name != "README.md")
    for file in files:
        if file.is_symlink() or not file.is_file():
            raise InvalidAdapter(f"{file.name[:80]!r} is not a regular file")
    return [FileEntry(f.name, f.stat().st_size, sha256_file(f)) for f in files]


@dataclass
class _Incoming:
    declared: FileEntry
    path: Path
    written: int = 0
    sha256: str | None = None


class Upload:
    """An upload in progress: `write` chunks file by file in the declared order, then `commit`.

    Bytes are spooled to a private folder of the spool (whose budget already holds the declared
    sizes), hashed and counted as they arrive; any error aborts the upload and gives the space
    back. Use it as a context manager to abort on an exception.
    """

    def __init__(
        self,
        declared: Sequence[FileEntry],
        folder: Path,
        publish: Publish,
        *,
        space: SpoolSpace | None = None,
    ) -> None:
        """`declared` as `check_declared` returns it; `folder` is this upload's own (removed
        when it ends), `space` what the spool holds for it (released when it ends)."""
        names = [entry.filename for entry in declared]
        if names[: len(ADAPTER_FILES)] != list(ADAPTER_FILES) or names != [
            filename for filename in VERSION_FILES if filename in names
        ]:
            raise InvalidAdapter("an upload's header must be checked by check_declared")
        self._publish = publish
        self._space = space
        self._folder = folder
        self._files = [_Incoming(entry, folder / entry.filename) for entry in declared]
        self._index = 0
        self._handle: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._closed = False

    @classmethod
    def start(cls, spool: Spool, declared: Sequence[FileEntry], publish: Publish) -> Upload:
        """Reserve the declared sizes in `spool` (SpoolFull beyond its budget) and make the
        upload's folder there; `declared` as `check_declared` returns it."""
        space = spool.reserve(sum(entry.size for entry in declared), "this upload")
        try:
            return cls(declared, spool.folder("upload-"), publish, space=space)
        except BaseException:
            space.release()
            raise

    def __enter__(self) -> Upload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, filename: str, chunk: bytes) -> None:
        if self._closed:
            raise InvalidAdapter("the upload is already committed or aborted")
        try:
            current = self._advance_to(filename)
            if current.written + len(chunk) > current.declared.size:
                raise InvalidAdapter(
                    f"{filename} is larger than its declared size of {current.declared.size} bytes"
                )
            if self._handle is None:
                self._handle = current.path.open("wb")
            self._handle.write(chunk)
            self._digest.update(chunk)
            current.written += len(chunk)
        except BaseException:
            self.abort()
            raise

    def write_folder(self, path: Path) -> None:
        """Write the files of a local adapter folder (the one `declare_folder` read)."""
        for incoming in self._files:
            filename = incoming.declared.filename
            with (Path(path) / filename).open("rb") as f:
                while chunk := f.read(_CHUNK):
                    self.write(filename, chunk)

    def _advance_to(self, filename: str) -> _Incoming:
        current = self._files[self._index]
        if filename == current.declared.filename:
            return current
        position = self._index + 1
        if (
            position < len(self._files)
            and self._files[position].declared.filename == filename
            and current.written == current.declared.size
        ):
            self._finish_current()
            self._index = position
            return self._files[position]
        raise InvalidAdapter(
            f"unexpected chunk for {filename[:80]!r}: files must be sent one after the other in "
            f"the declared order, and {current.declared.filename} has "
            f"{current.written} of {current.declared.size} bytes"
        )

    def _finish_current(self) -> None:
        current = self._files[self._index]
        if self._handle is None:
            current.path.touch()
        else:
            self._handle.flush()
            self._handle.close()
            self._handle = None
        current.sha256 = self._digest.hexdigest()
        self._digest = hashlib.sha256()

    def commit(self) -> AdapterVersion:
        """Check every file against the header, then hand the spooled adapter to `publish`
        (for the registry's uploads: validated, stored, and made `latest` and its aliases)."""
        if self._closed:
            raise InvalidAdapter("the upload is already committed or aborted")
        try:
            self._finish_current()
            for incoming in self._files[self._index + 1 :]:
                incoming.path.touch()
                incoming.sha256 = hashlib.sha256(b"").hexdigest()
            for incoming in self._files:
                entry = incoming.declared
                if incoming.written != entry.size:
                    raise InvalidAdapter(
                        f"upload incomplete: {entry.filename} has {incoming.written} of "
                        f"{entry.size} declared bytes"
                    )
                if incoming.sha256 != entry.sha256:
                    raise InvalidAdapter(
                        f"sha256 mismatch for {entry.filename}: declared {entry.sha256}, "
                        f"received {incoming.sha256}"
                    )
            return self._publish(SpooledAdapter(self._folder, self._space))
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop everything received; nothing was published. Safe to call more than once."""
        self._closed = True
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        shutil.rmtree(self._folder, ignore_errors=True)
        if self._space is not None:
            self._space.release()
