"""Loops uploads and alias moves on one store until it is killed; used by test_durability.py.

    python -m tests.faults.durability_worker STORE MODEL ADAPTER ROUND BASE_ALIAS [S3_ENDPOINT]

STORE is `file:///path` or `s3://bucket/prefix`. Every operation prints an `intent` line before
it starts and an acknowledgement line once the store call returned, each flushed at once, so
the test knows exactly what was acknowledged when it sends SIGKILL. Each upload gets unique
content (its `revision` field), hence a new version.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from adapter_store import BaseModelSpec, BlobBackend, LocalBackend, Registry
from adapter_store.model import CONFIG_FILE

TENANT = "durable"
NAMES = ("a0", "a1", "a2")
ALIAS = "prod"


def say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def open_backend(store: str, endpoint: str | None) -> BlobBackend:
    if store.startswith("file://"):
        return LocalBackend(Path(store.removeprefix("file://")))
    from adapter_store.s3 import S3Backend

    bucket, _, prefix = store.removeprefix("s3://").partition("/")
    return S3Backend(bucket, prefix, endpoint_url=endpoint, region="us-east-1")


def main(argv: list[str]) -> None:
    store, model, adapter, round_text, base_alias = argv[:5]
    endpoint = argv[5] if len(argv) > 5 else None
    round_no = int(round_text)
    spec = BaseModelSpec.from_hf_config(Path(model), max_rank=16, aliases=(base_alias,))
    registry = Registry(open_backend(store, endpoint), spec)
    rng = random.Random(round_no)
    work = Path(tempfile.mkdtemp(prefix="durability-"))
    acked: dict[str, list[str]] = {name: [] for name in NAMES}
    say(op="ready")
    n = 0
    while True:
        n += 1
        name = rng.choice(NAMES)
        folder = work / f"v{n}"
        shutil.copytree(adapter, folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        # Unique content per upload, in a metadata field (a large lora_alpha is refused now).
        config["revision"] = f"durability-{round_no}-{n}"
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        say(op="intent-upload", name=name)
        version = registry.upload_dir(TENANT, name, folder, created_by="durability")
        say(
            op="upload",
            name=name,
            version=version.sha,
            files={f.filename: f.sha256 for f in version.files},
        )
        acked[name].append(version.sha)
        shutil.rmtree(folder)
        target_name = rng.choice(NAMES)
        if acked[target_name]:
            target = rng.choice(acked[target_name])
            say(op="intent-alias", name=target_name, version=target)
            registry.set_alias(TENANT, target_name, ALIAS, target)
            say(op="alias", name=target_name, version=target)


if __name__ == "__main__":
    main(sys.argv[1:])
