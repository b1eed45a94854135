"""Generate lora_gateway/v1 from proto/ (or, with --check, fail if the committed code drifts)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = ROOT / "lora_gateway" / "v1"
BIN = Path(sys.executable).parent
PROTOS = sorted(
    p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "lora_gateway" / "v1").glob("*.proto")
)


def generate(out_root: Path) -> Path:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *map(str, PROTOS),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    package = out_root / "lora_gateway" / "v1"
    (package / "__init__.py").write_text(
        '"""Generated protobuf and gRPC code for lora_gateway.v1."""\n'
    )
    return package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code drifts")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if opts.check:
            committed = sorted(p.name for p in OUT_PACKAGE.glob("*") if p.is_file())
            _, mismatch, errors = filecmp.cmpfiles(fresh, OUT_PACKAGE, names, shallow=False)
            if mismatch or errors or names != committed:
                sys.exit(
                    "lora_gateway/v1 drifts from proto/ (run `make proto`): "
                    f"differs={mismatch} missing={errors} extra={set(committed) - set(names)}"
                )
            print(f"lora_gateway/v1 matches proto/ ({len(names)} files)")
            return
        OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
        for old in OUT_PACKAGE.glob("*"):
            if old.is_file():
                old.unlink()
        for name in names:
            shutil.copy2(fresh / name, OUT_PACKAGE / name)
        print(f"wrote {len(names)} files to {OUT_PACKAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
