"""A small fault-injecting TCP proxy on 127.0.0.1, for tests of a flaky network.

    with FaultProxy(("127.0.0.1", s3_port)) as proxy:
        backend = S3Backend(bucket, endpoint_url=proxy.endpoint_url, ...)
        proxy.latency(500)                  # every relayed chunk waits 500 ms
        proxy.throttle(10_000)              # at most 10 kB/s each way
        proxy.reset_after(4096, match=b"adapter_model", times=1)
        proxy.blackhole()                   # accept, swallow, never answer
        proxy.passthrough()

The proxy runs its own event loop in its own thread, so blocking clients (boto3) and asyncio
code on another loop can both go through it. The fault is switched at runtime from any thread
and applies to the next chunk relayed on every connection, open or new. `stop()` closes the
listener and every connection and joins the thread within a bounded time.

It counts what it saw (`stats`): connections, resets and the request lines of plain HTTP/1.1
requests (enough to count S3 GETs of one key).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

Kind = Literal["pass", "latency", "throttle", "reset", "blackhole"]
_HTTP_METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


@dataclass(frozen=True)
class Fault:
    """What the proxy does to the bytes it relays (immutable: swapped whole)."""

    kind: Kind = "pass"
    #: latency: delay of each relayed chunk, in seconds.
    delay_s: float = 0.0
    #: throttle: bytes per second, each direction and connection.
    rate: int = 0
    #: reset: bytes relayed back to the client (after a request matching `match`) before a RST.
    after: int = 0
    #: reset: only responses to requests whose first chunk contains this (None: any).
    match: bytes | None = None
    #: reset: how many connections to cut before the proxy goes back to passing (None: all).
    times: int | None = None


@dataclass
class ProxyStats:
    connections: int = 0
    refused: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    #: "METHOD /path" of each HTTP request seen (query strings dropped).
    requests: list[str] = field(default_factory=list)

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for r in self.requests if r.startswith(method + " ") and fragment in r)


class _Reset(Exception):
    """Raised inside a pipe to cut the connection."""


@dataclass
class _Conn:
    armed: bool = False
    relayed_since_match: int = 0


class FaultProxy:
    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        max_connections: int = 128,
        chunk_bytes: int = 16 * 1024,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.upstream = upstream
        self.max_connections = max_connections
        self.chunk_bytes = chunk_bytes
        self.connect_timeout_s = connect_timeout_s
        self.stats = ProxyStats()
        self._fault = Fault()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = 0

    # --- control (any thread) -----------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fault(self) -> Fault:
        return self._fault

    def set(self, fault: Fault) -> None:
        with self._lock:
            self._fault = fault

    def passthrough(self) -> None:
        self.set(Fault())

    def latency(self, ms: float) -> None:
        self.set(Fault("latency", delay_s=ms / 1000))

    def throttle(self, bytes_per_s: int) -> None:
        if bytes_per_s <= 0:
            raise ValueError("throttle needs a positive rate")
        self.set(Fault("throttle", rate=bytes_per_s))

    def reset_after(self, n: int, *, match: bytes | None = None, times: int | None = None) -> None:
        self.set(Fault("reset", after=n, match=match, times=times))

    def blackhole(self) -> None:
        self.set(Fault("blackhole"))

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        if self._error is not None:
            raise RuntimeError("fault proxy did not start") from self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # pragma: no cover - start-up failure is reported
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # --- relaying -----------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            self.stats.refused += 1
            writer.close()
            return
        self._tasks.add(task)
        self.stats.connections += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            if self._fault.kind == "blackhole":
                await self._swallow(reader)
                return
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), self.connect_timeout_s
            )
            conn = _Conn()
            pipes = [
                asyncio.ensure_future(self._pipe(reader, upstream, conn, up=True)),
                asyncio.ensure_future(self._pipe(up_reader, writer, conn, up=False)),
            ]
            try:
                done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
                if any(not t.cancelled() and isinstance(t.exception(), _Reset) for t in done):
                    self.stats.resets += 1
                    _rst(writer)
                    _rst(upstream)
                    return
                # One side finished cleanly: let the other drain, but never for long.
                await asyncio.wait(pipes, timeout=30)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (a cancelled handler makes asyncio log an error)
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(self.chunk_bytes):
            pass

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        conn: _Conn,
        *,
        up: bool,
    ) -> None:
        while True:
            data = await src.read(self.chunk_bytes)
            if not data:
                with contextlib.suppress(OSError):
                    if dst.can_write_eof():
                        dst.write_eof()
                return
            fault = self._fault
            if up:
                self.stats.bytes_up += len(data)
                if data.startswith(_HTTP_METHODS):
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    method, _, rest = line.partition(" ")
                    self.stats.requests.append(f"{method} {rest.split(' ')[0].split('?')[0]}")
                    if fault.kind == "reset" and (fault.match is None or fault.match in data):
                        conn.armed, conn.relayed_since_match = True, 0
            if fault.kind == "blackhole":
                continue  # swallowed: the peer waits for an answer that never comes
            if fault.kind == "latency":
                await asyncio.sleep(fault.delay_s)
            if fault.kind == "reset" and not up and (conn.armed or fault.match is None):
                room = fault.after - conn.relayed_since_match
                if len(data) >= room:
                    if room > 0:
                        dst.write(data[:room])
                        await dst.drain()
                    self._spend_reset(fault)
                    raise _Reset
                conn.relayed_since_match += len(data)
            if fault.kind == "throttle":
                step = max(1, fault.rate // 20)
                for start in range(0, len(data), step):
                    piece = data[start : start + step]
                    dst.write(piece)
                    await dst.drain()
                    await asyncio.sleep(len(piece) / fault.rate)
            else:
                dst.write(data)
                await dst.drain()
            if not up:
                self.stats.bytes_down += len(data)

    def _spend_reset(self, fault: Fault) -> None:
        with self._lock:
            if self._fault is not fault or fault.times is None:
                return
            left = fault.times - 1
            self._fault = (
                Fault("reset", after=fault.after, match=fault.match, times=left)
                if left
                else Fault()
            )


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
