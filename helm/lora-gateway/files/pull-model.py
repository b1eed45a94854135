"""Pull a base model from the object store into a local folder (the chart's init container).

Environment: MODEL_URI (s3://bucket/prefix), MODEL_DIR (destination), S3_ENDPOINT, S3_REGION
(optional), WAIT_SECONDS (how long to wait for the objects to appear), and the AWS_* credentials
boto3 reads itself. Runs in the gateway image, which ships boto3. Every file is downloaded to a
temporary name and renamed into place; a key that would land outside MODEL_DIR is refused.
Files already present with the right size are kept, so a restarted pod resumes cheaply.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def main() -> int:
    uri = urlparse(os.environ["MODEL_URI"])
    if uri.scheme != "s3" or not uri.netloc:
        print(f"MODEL_URI must be s3://bucket/prefix, not {os.environ['MODEL_URI']!r}")
        return 2
    bucket = uri.netloc
    prefix = uri.path.strip("/")
    prefix = prefix + "/" if prefix else ""
    dest = Path(os.environ["MODEL_DIR"]).resolve()
    wait = float(os.environ.get("WAIT_SECONDS") or 0)
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ.get("S3_ENDPOINT") or None,
        region_name=os.environ.get("S3_REGION") or None,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5),
    )

    deadline = time.monotonic() + wait
    while True:
        try:
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            objects = [o for page in pages for o in page.get("Contents", [])]
            problem = f"no objects under s3://{bucket}/{prefix}"
        except (BotoCoreError, ClientError) as exc:
            objects, problem = [], f"s3://{bucket}/{prefix}: {exc}"
        objects = [o for o in objects if not o["Key"].endswith("/")]
        if objects:
            break
        if time.monotonic() >= deadline:
            print(problem)
            return 1
        print(f"waiting for the model ({problem})", flush=True)
        time.sleep(5)

    total = 0
    for obj in objects:
        relative = obj["Key"][len(prefix) :]
        target = (dest / relative).resolve()
        if not target.is_relative_to(dest) or target == dest:
            print(f"refusing key {obj['Key']!r}: it leaves {dest}")
            return 2
        if target.is_file() and target.stat().st_size == obj["Size"]:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        s3.download_file(bucket, obj["Key"], str(partial))
        partial.replace(target)
        total += obj["Size"]
    print(f"model ready in {dest}: {len(objects)} files, {total} bytes downloaded", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
