"""A JSON-lines log that never blocks the event loop: the audit log's and the usage records'.

`JsonLines.put` is cheap and synchronous: it wraps the event in a `logging.LogRecord` (the
event's fields under one attribute, `field`) and puts it on a queue. A
`logging.handlers.QueueListener` thread writes the file (a `WatchedFileHandler`: logrotate-safe),
or hands the record to the named logger when no file is configured (the JSON log formatter,
logs.py, then nests the fields under `field`), so the event loop never waits on disk.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

__all__ = ["JsonLines", "now"]


def now() -> str:
    """RFC 3339 UTC with millisecond precision, e.g. 2025-01-31T12:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _EventLine(logging.Formatter):
    """The file's line: the event's fields as one JSON object."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self._field = field

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record.__dict__[self._field], ensure_ascii=False, separators=(", ", ": "))


class _ToLogger(logging.Handler):
    """Runs in the listener thread: passes each event to the named logger."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        if self._logger.isEnabledFor(record.levelno):
            self._logger.handle(record)


class JsonLines:
    """One event per line in `path`; `path=None`: events go to the logger `logger` only.

    Opening the file happens in the constructor (call it at start-up, or in a thread). `field`
    is the record attribute (and the JSON logs' key) that holds the event; every record's log
    message is `field` too.
    """

    def __init__(self, path: str | None, *, logger: str, field: str) -> None:
        self.path = path
        self._field = field
        self._logger = logging.getLogger(logger)
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._sink: logging.Handler
        if path:
            sink = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
            sink.setFormatter(_EventLine(field))
            self._sink = sink
        else:
            self._sink = _ToLogger(self._logger)
        self._enqueue = logging.handlers.QueueHandler(self._queue)
        self._listener = logging.handlers.QueueListener(self._queue, self._sink)
        self._listener.start()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, event: Mapping[str, Any]) -> None:
        """Queue one event. Never blocks on I/O."""
        if self._closed:
            # Late events (after shutdown) still reach the logger rather than vanish.
            self._logger.warning("%s event after close: %s", self._field, json.dumps(event))
            return
        if not self.path and not self._logger.isEnabledFor(logging.INFO):
            # To a logger that would drop it: not even built (a usage record per request would
            # otherwise cost every call a log record nobody reads).
            return
        record = logging.LogRecord(
            name=self._logger.name,
            level=logging.INFO,
            pathname=__file__,
            lineno=0,
            msg=self._field,
            args=None,
            exc_info=None,
        )
        record.__dict__[self._field] = event
        self._enqueue.handle(record)

    def flush(self) -> None:
        """Wait until every queued event is written (blocking: tests, shutdown)."""
        if self._closed:
            return
        self._listener.stop()  # drains the queue, then joins the thread
        self._sink.flush()
        self._listener.start()

    def close(self) -> None:
        """Write what is queued, stop the writer thread and close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._listener.stop()
        self._sink.flush()
        self._sink.close()


def clip(value: str, limit: int = 256) -> str:
    """`value`, cut to `limit` characters (an ellipsis marks the cut)."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


class JsonLinesLog:
    """What the audit log and the usage records share: a `JsonLines` writer, opened in the
    constructor (call it at start-up, or in a thread), flushed, closed, a context manager."""

    def __init__(self, path: str | None, *, logger: str, field: str) -> None:
        self.path = path
        self._lines = JsonLines(path, logger=logger, field=field)

    def flush(self) -> None:
        """Wait until every queued line is written (blocking: tests, shutdown)."""
        self._lines.flush()

    def close(self) -> None:
        """Write what is queued, stop the writer thread and close the file. Idempotent."""
        self._lines.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r})"
