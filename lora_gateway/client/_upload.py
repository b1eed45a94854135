"""An adapter folder as an UploadAdapter stream: the files declared (size, sha256) in a header,
then read chunk by chunk, file after file, by one reader per attempt (a retry starts again)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from lora_gateway import errors
from lora_gateway.client._convert import message, names
from lora_gateway.v1 import admin_pb2

_UPLOAD_FILES: Final = ("adapter_config.json", "adapter_model.safetensors")
#: The adapter's own chat template (optional; sent after the two files, checked by the server).
_TEMPLATE_FILE: Final = "chat_template.jinja"
#: Files that PEFT writes next to an adapter and that are not uploaded.
_IGNORED_FILES: Final = frozenset({"README.md"})
_MAX_CHUNK_BYTES: Final = 4 << 20

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class _LocalFile:
    filename: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Upload:
    """What one upload sends: the header (its first message), then the files in chunks."""

    first: admin_pb2.UploadAdapterRequest
    files: tuple[_LocalFile, ...]
    chunk_size: int

    @contextlib.contextmanager
    def attempt(self, progress: Progress | None) -> Iterator[Reader]:
        """A fresh reader for one attempt. On the way out, a local read failure (or a file that
        changed) is raised as InvalidArgument, whatever the server answered: it explains it."""
        reader = Reader(self.files, self.chunk_size, progress)
        try:
            yield reader
        finally:
            reader.close()
            reader.check()


def prepare(
    name: str,
    directory: Path | str,
    tenant: str,
    aliases: Sequence[str],
    description: str,
    chunk_size: int,
    chat_template: Path | str | None = None,
) -> Upload:
    """Check the folder and hash its files (blocking: the asyncio client runs it in a thread).
    `chat_template`: a template file sent as the adapter's chat_template.jinja (instead of one
    in the folder)."""
    if not 0 < chunk_size <= _MAX_CHUNK_BYTES:
        raise errors.InvalidArgument(f"chunk_size must be in 1..{_MAX_CHUNK_BYTES}")
    files = _scan_adapter_dir(
        Path(directory), None if chat_template is None else Path(chat_template)
    )
    header = message(
        admin_pb2.UploadHeader,
        tenant=tenant,
        name=name,
        aliases=names(aliases),
        description=description,
        files=[
            admin_pb2.DeclaredFile(filename=f.filename, size=f.size, sha256=f.sha256) for f in files
        ],
    )
    return Upload(admin_pb2.UploadAdapterRequest(header=header), tuple(files), chunk_size)


def _scan_adapter_dir(directory: Path, chat_template: Path | None = None) -> list[_LocalFile]:
    """The adapter files of a PEFT folder (and its optional chat_template.jinja, or the
    `chat_template` file given), hashed, in upload order; InvalidArgument for anything else."""
    if not directory.is_dir():
        raise errors.InvalidArgument(f"{directory} is not a directory")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name in _IGNORED_FILES:
            continue
        if path.name == _TEMPLATE_FILE and chat_template is not None:
            continue  # the file given replaces the folder's
        if path.name not in (*_UPLOAD_FILES, _TEMPLATE_FILE) or not path.is_file():
            raise errors.InvalidArgument(
                f"unexpected {path.name!r} in {directory}: an adapter folder holds only "
                f"{' and '.join(_UPLOAD_FILES)} (and an optional {_TEMPLATE_FILE} and README.md)"
            )
        found[path.name] = path
    if chat_template is not None:
        if not chat_template.is_file():
            raise errors.InvalidArgument(f"chat template {chat_template} is not a file")
        found[_TEMPLATE_FILE] = chat_template
    missing = [name for name in _UPLOAD_FILES if name not in found]
    if missing:
        raise errors.InvalidArgument(f"{directory}: missing {', '.join(missing)}")
    files = []
    for name in (name for name in (*_UPLOAD_FILES, _TEMPLATE_FILE) if name in found):
        digest = hashlib.sha256()
        size = 0
        with found[name].open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                size += len(block)
        files.append(_LocalFile(name, found[name], size, digest.hexdigest()))
    return files


class Reader:
    """Reads the declared files chunk by chunk, file after file (one reader per attempt).

    A read failure or a file that no longer matches its declaration ends the stream early and
    is raised locally by `check()` after the call, whatever the server answered.
    """

    def __init__(
        self, files: Sequence[_LocalFile], chunk_size: int, progress: Progress | None
    ) -> None:
        self._files = list(files)
        self._chunk_size = chunk_size
        self._progress = progress
        self._index = 0
        self._handle: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._read = 0
        self.sent = 0
        self.total = sum(f.size for f in files)
        self.error: str | None = None
        if progress is not None:
            progress(0, self.total)

    def next(self) -> admin_pb2.UploadAdapterRequest | None:
        if self.error is not None:
            return None
        try:
            return self._next()
        except OSError as exc:
            self.error = f"cannot read {self._files[self._index].path}: {exc.strerror or exc}"
            self.close()
            return None

    def _next(self) -> admin_pb2.UploadAdapterRequest | None:
        while self._index < len(self._files):
            current = self._files[self._index]
            if self._handle is None:
                self._handle = current.path.open("rb")
                self._digest = hashlib.sha256()
                self._read = 0
            data = self._handle.read(self._chunk_size)
            if data:
                self._read += len(data)
                self._digest.update(data)
                if self._read > current.size:
                    self._changed(current)
                    return None
                self.sent += len(data)
                if self._progress is not None:
                    self._progress(self.sent, self.total)
                chunk = admin_pb2.FileChunk(filename=current.filename, data=data)
                return admin_pb2.UploadAdapterRequest(chunk=chunk)
            self.close()
            if self._read != current.size or self._digest.hexdigest() != current.sha256:
                self._changed(current)
                return None
            self._index += 1
        return None

    def _changed(self, current: _LocalFile) -> None:
        self.error = f"{current.path} changed while it was being uploaded"
        self.close()

    def __iter__(self) -> Iterator[admin_pb2.UploadAdapterRequest]:
        while (message := self.next()) is not None:
            yield message

    async def aiter(self) -> AsyncIterator[admin_pb2.UploadAdapterRequest]:
        # File reads go through a thread: the event loop never blocks on disk I/O.
        while (message := await asyncio.to_thread(self.next)) is not None:
            yield message

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def check(self) -> None:
        if self.error is not None:
            raise errors.InvalidArgument(self.error)
