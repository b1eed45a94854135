"""A real S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1, a random port.

    with s3_server() as server:
        backend = S3Backend(server.bucket, endpoint_url=server.endpoint_url, ...)

`stop()` and `start()` take the server down and bring it back on the same port (its data is
kept, it lives in moto's in-process backends), for tests of an unreachable store.

moto checks If-Match / If-None-Match and then writes without a lock; S3 and MinIO make the pair
atomic. The server here serialises requests so that conditional writes are atomic too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import boto3
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class _SerialMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer whose requests run one at a time (atomic conditional writes)."""

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        lock = threading.Lock()

        def serial(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            with lock:
                return list(app(environ, start_response))

        self._server = make_server(
            self._ip_address, self._port, serial, True, request_handler=_QuietHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


@dataclass
class S3Server:
    """Where the test server listens, and the fake credentials it accepts."""

    endpoint_url: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    _server: ThreadedMotoServer | None = field(default=None, repr=False)
    port: int = 0

    @contextmanager
    def credentials_in_env(self) -> Iterator[None]:
        """Export this server's credentials as the AWS_* variables boto3's default chain reads
        (what the gateway uses), and put the old values back afterwards."""
        names = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        saved = {name: os.environ.get(name) for name in names}
        os.environ.update(names)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def client(self) -> Any:
        """A boto3 S3 client for this server (for tests that poke at objects directly)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def start(self) -> None:
        """Start again on the same port after `stop()`."""
        if self._server is None:
            self._server = _SerialMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()


@contextmanager
def s3_server(bucket: str = "lora-gateway-test") -> Iterator[S3Server]:
    """Start a moto S3 server on 127.0.0.1 (random port), create `bucket`, stop at exit."""
    moto = _SerialMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    server = S3Server(endpoint_url=f"http://{host}:{port}", bucket=bucket, _server=moto, port=port)
    try:
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()
