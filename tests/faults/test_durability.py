"""kill -9 during uploads and alias moves: no acknowledged write is ever lost.

`durability_worker.py` loops uploads (unique content each) and alias moves on a store, printing
an intent line before each operation and an acknowledgement after it. The test kills it with
SIGKILL at a random moment, several rounds in a row on the same store, and after each round
opens the store afresh and checks:

- every acknowledged upload is listed and its files read back with their acknowledged sha256;
- every alias (`prod`, moved explicitly, and `latest`, moved by uploads) points where the last
  acknowledged operation put it, or where an operation that was started but not acknowledged
  when the process died put it;
- every version any manifest lists has all its objects, with their sha256 (never half-published).

"acknowledged data lost" counts every violation and must be 0. Objects of a version whose
manifest update never happened (killed between the two) are allowed: they are invisible garbage,
counted as "orphaned objects". Runs on LocalBackend and on S3Backend against SeaweedFS over HTTP.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adapter_store import BaseModelSpec, BlobBackend, LocalBackend, Registry
from adapter_store.errors import StoreError
from lora_gateway import devtools
from tests.conftest import AdapterFactory
from tests.support.s3server import S3Server, s3_server

TENANT = "durable"
NAMES = ("a0", "a1", "a2")
ROOT = Path(__file__).resolve().parents[2]
FAST_ROUNDS, SLOW_ROUNDS = 5, 30


@dataclass
class Ledger:
    """What the workers acknowledged, and what the store was seen to hold after each round."""

    uploads: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    prod: dict[str, str] = field(default_factory=dict)
    latest: dict[str, str] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    acknowledged: int = 0
    killed_mid_operation: int = 0
    orphaned_objects: int = 0


@dataclass
class Store:
    uri: str
    endpoint: str | None
    backend: BlobBackend
    env: dict[str, str]


def run_worker(
    store: Store, model: Path, adapter: Path, round_no: int, kill_after: float
) -> list[dict[str, str]]:
    """One worker, SIGKILLed `kill_after` seconds after it is ready; its complete lines."""
    args = [
        sys.executable,
        "-m",
        "tests.faults.durability_worker",
        store.uri,
        str(model),
        str(adapter),
        str(round_no),
        devtools.TINY_MODEL_NAME,
    ]
    if store.endpoint:
        args.append(store.endpoint)
    process = subprocess.Popen(
        args, cwd=ROOT, env=store.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if '"ready"' in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "the worker did not start"
        time.sleep(kill_after)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        reader.join(10)
        if process.stderr is not None:
            process.stderr.close()
    return [json.loads(line) for line in lines if line.endswith("\n")]


def open_registry(backend: BlobBackend, model: Path) -> Registry:
    spec = BaseModelSpec.from_hf_config(model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,))
    return Registry(backend, spec)


def check(ledger: Ledger, registry: Registry, events: list[dict[str, str]]) -> None:
    """Fold one round's events into the ledger and check the store against it."""
    pending_upload: str | None = None
    pending_alias: tuple[str, str] | None = None
    for event in events:
        op = event["op"]
        if op == "intent-upload":
            pending_upload = event["name"]
        elif op == "upload":
            ledger.uploads[event["version"]] = (event["name"], dict(event["files"]))  # type: ignore[arg-type]
            ledger.latest[event["name"]] = event["version"]
            ledger.acknowledged += 1
            pending_upload = None
        elif op == "intent-alias":
            pending_alias = (event["name"], event["version"])
        elif op == "alias":
            ledger.prod[event["name"]] = event["version"]
            ledger.acknowledged += 1
            pending_alias = None
    if pending_upload is not None or pending_alias is not None:
        ledger.killed_mid_operation += 1

    manifests = {m.name: m for m in registry.list_adapters(TENANT)}
    with tempfile.TemporaryDirectory() as tmp:
        # Every version listed has all its objects, with their sha256 (fetch_file verifies).
        for manifest in manifests.values():
            for sha, version in manifest.versions.items():
                for entry in version.files:
                    try:
                        registry.fetch_file(version, entry.filename, Path(tmp) / entry.filename)
                    except StoreError as exc:
                        ledger.lost.append(f"{manifest.name} {sha[:12]} {entry.filename}: {exc}")
        # Every acknowledged upload is there with the acknowledged bytes.
        for sha, (name, files) in ledger.uploads.items():
            holder = manifests.get(name)
            found = holder.versions.get(sha) if holder else None
            if found is None:
                ledger.lost.append(f"acknowledged upload {name} {sha[:12]} is not listed")
                continue
            stored = {f.filename: f.sha256 for f in found.files}
            if stored != files:
                ledger.lost.append(f"acknowledged upload {name} {sha[:12]} has other files")
    # Aliases: the last acknowledged move, or the one in flight at the kill.
    acked_shas = set(ledger.uploads)
    for name, manifest in manifests.items():
        latest = manifest.aliases.get("latest")
        allowed = {ledger.latest.get(name)}
        if pending_upload == name:  # its version was never acknowledged: any unacknowledged one
            allowed |= set(manifest.versions) - acked_shas
        if name in ledger.latest and latest not in allowed:
            ledger.lost.append(f"{name}@latest is {latest}, expected one of {allowed}")
        if latest is not None:
            ledger.latest[name] = latest
        prod = manifest.aliases.get("prod")
        allowed = {ledger.prod.get(name)}
        if pending_alias is not None and pending_alias[0] == name:
            allowed.add(pending_alias[1])
        if name in ledger.prod and prod not in allowed:
            ledger.lost.append(f"{name}@prod is {prod}, expected one of {allowed}")
        if prod is not None:
            ledger.prod[name] = prod
    # Objects of versions no manifest lists: killed between the objects and the manifest.
    listed = {sha for m in manifests.values() for sha in m.versions}
    ledger.orphaned_objects = sum(
        1
        for key in registry.backend.list(f"tenants/{TENANT}/")
        if "/versions/" in key and not any(sha in key for sha in listed)
    )


def soak(store: Store, model: Path, adapter: Path, rounds: int, seed: int) -> Ledger:
    rng = random.Random(seed)
    ledger = Ledger()
    for round_no in range(rounds):
        events = run_worker(store, model, adapter, seed * 1000 + round_no, rng.uniform(0.05, 1.2))
        check(ledger, open_registry(store.backend, model), events)
    return ledger


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server("durability") as server:
        yield server


def local_store(tmp_path: Path) -> Store:
    root = tmp_path / "store"
    root.mkdir()
    return Store(f"file://{root}", None, LocalBackend(root), dict(os.environ))


def s3_store(s3: S3Server, prefix: str) -> Store:
    from adapter_store.s3 import S3Backend

    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key)
    backend = S3Backend(
        s3.bucket,
        prefix,
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
    )
    return Store(f"s3://{s3.bucket}/{prefix}", s3.endpoint_url, backend, env)


def report(kind: str, ledger: Ledger, rounds: int) -> None:
    print(
        f"\n{kind}: {rounds} kills ({ledger.killed_mid_operation} mid-operation), "
        f"{ledger.acknowledged} acknowledged operations ({len(ledger.uploads)} uploads), "
        f"acknowledged data lost {len(ledger.lost)}, orphaned objects {ledger.orphaned_objects}"
    )
    assert ledger.lost == []
    assert len(ledger.uploads) >= rounds, "the worker made progress in most rounds"


@pytest.mark.parametrize("rounds", [FAST_ROUNDS, pytest.param(SLOW_ROUNDS, marks=pytest.mark.slow)])
def test_kill_9_local_store(
    rounds: int, tiny_model: Path, make_test_adapter: AdapterFactory, tmp_path: Path
) -> None:
    store = local_store(tmp_path)
    report("local", soak(store, tiny_model, make_test_adapter(seed=1), rounds, seed=1), rounds)


@pytest.mark.parametrize("rounds", [FAST_ROUNDS, pytest.param(SLOW_ROUNDS, marks=pytest.mark.slow)])
def test_kill_9_s3_store(
    rounds: int, tiny_model: Path, make_test_adapter: AdapterFactory, s3: S3Server
) -> None:
    store = s3_store(s3, f"durability-{rounds}")
    report("s3", soak(store, tiny_model, make_test_adapter(seed=1), rounds, seed=2), rounds)
