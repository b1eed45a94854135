"""The spool: one folder where uploads and compositions in progress keep their bytes, and the
byte budget they share.

An upload reserves the sizes its header declares before its first byte is written (a
composition: its parts, then its result); beyond the budget it is refused with `SpoolFull`
(RESOURCE_EXHAUSTED), so the folder's volume can never fill up. Space is released when the
upload commits or aborts. A rewrite that grows a file (AdaLoRA normalised to float32) reserves
the extra bytes first.

With `sessions=True` (the server's spool) each process works in a session folder of its own
under the spool root, holding an exclusive `flock` on the session's lock file for its life. On
start, sessions whose lock can be taken belong to processes that are gone (a crash, a container
restart that kept the volume) and are removed, so their bytes do not linger outside the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO

from adapter_store.errors import SpoolFull

__all__ = ["Spool", "SpoolSpace", "format_bytes"]

log = logging.getLogger(__name__)

_SESSION_PREFIX = "session-"


def format_bytes(count: int) -> str:
    """1536 -> "1.5 KiB" (binary units, one decimal)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class Spool:
    """A spool folder with a byte budget (None: unlimited). Thread-safe: store methods run in
    threads."""

    def __init__(
        self, root: Path | None = None, budget_bytes: int | None = None, *, sessions: bool = False
    ) -> None:
        if budget_bytes is not None and budget_bytes < 1:
            raise ValueError("budget_bytes must be >= 1")
        self.budget_bytes = budget_bytes
        self._sessions = sessions
        self._lock = threading.Lock()
        self._reserved = 0
        self._root = root
        self._session: Path | None = None
        self._session_lock: IO[bytes] | None = None

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def root(self) -> Path:
        """The spool folder (the system temp folder when none was given)."""
        return self._root if self._root is not None else Path(tempfile.gettempdir())

    def reserve(self, nbytes: int, what: str = "this upload") -> SpoolSpace:
        """Reserve `nbytes` of the budget, or raise SpoolFull saying how full the spool is."""
        space = SpoolSpace(self)
        space.grow(nbytes, what)
        return space

    def folder(self, prefix: str) -> Path:
        """A new private folder for one upload or composition (the caller removes it)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.working_folder))

    @property
    def working_folder(self) -> Path:
        """Where this process's upload and composition folders go."""
        return self._session_folder()

    def open(self) -> None:
        """Open this process's session folder now rather than at the first upload (removing,
        first, the session folders of processes that are gone)."""
        self._session_folder()

    def _take(self, nbytes: int, what: str) -> None:
        with self._lock:
            budget = self.budget_bytes
            if budget is not None and nbytes > 0 and self._reserved + nbytes > budget:
                raise SpoolFull(
                    f"the upload spool is full: {format_bytes(self._reserved)} of "
                    f"{format_bytes(budget)} are reserved by uploads and compositions in "
                    f"progress, and {what} needs {format_bytes(nbytes)}; try again later"
                )
            self._reserved += nbytes

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    # --- session folders ----------------------------------------------------------------------
    def _session_folder(self) -> Path:
        with self._lock:
            if self._session is not None:
                return self._session
            if self._root is None:
                return Path(tempfile.gettempdir())
            self._root.mkdir(parents=True, exist_ok=True)
            if not self._sessions:
                return self._root
            self._remove_abandoned()
            name = f"{_SESSION_PREFIX}{uuid.uuid4().hex}"
            handle = (self._root / f"{name}.lock").open("wb")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            session = self._root / name
            session.mkdir()
            self._session, self._session_lock = session, handle
            return session

    def _remove_abandoned(self) -> None:
        assert self._root is not None
        for lock_path in self._root.glob(f"{_SESSION_PREFIX}*.lock"):
            try:
                handle = lock_path.open("rb")
            except OSError:
                continue
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live process holds it
                folder = lock_path.with_suffix("")
                log.info("removing abandoned spool folder %s", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)

    def close(self) -> None:
        """Remove this process's session folder, if any (uploads in progress lose their bytes)."""
        with self._lock:
            session, handle = self._session, self._session_lock
            self._session = self._session_lock = None
        if session is not None:
            shutil.rmtree(session, ignore_errors=True)
        if handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(Path(handle.name))
            handle.close()


class SpoolSpace:
    """Bytes reserved in a spool; grows as needed, released once (a context manager)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.nbytes = 0
        self._released = False

    def grow(self, nbytes: int, what: str = "this upload") -> None:
        """Reserve `nbytes` more (SpoolFull if the budget has no room)."""
        if nbytes <= 0:
            return
        if self._released:
            raise RuntimeError("spool space already released")
        self._spool._take(nbytes, what)
        self.nbytes += nbytes

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._spool._give(self.nbytes)

    def __enter__(self) -> SpoolSpace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
