"""`lora-gateway dev ...` (tiny models and adapters for trying things, API keys) and
`lora-gateway demo`."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from pathlib import Path

from lora_gateway import errors
from lora_gateway.cli.exits import EXIT_OK
from lora_gateway.cli.format import print_json
from lora_gateway.devtools import QUANT_SCHEMES


def _cmd_make_model(args: argparse.Namespace) -> int:
    from lora_gateway import devtools

    if args.quantize:
        print(devtools.make_quantized_model(Path(args.out), args.quantize, seed=args.seed))
    else:
        print(devtools.make_model(Path(args.out), seed=args.seed))
    return EXIT_OK


def _cmd_make_adapter(args: argparse.Namespace) -> int:
    from lora_gateway import devtools

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    spec = devtools.AdapterSpec(
        seed=args.seed,
        rank=args.rank,
        alpha=args.alpha,
        target_modules=targets,
        use_rslora=args.rslora,
        adalora=args.adalora,
    )
    print(devtools.make_adapter(Path(args.model), Path(args.out), spec))
    return EXIT_OK


def _key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _cmd_hash_key(args: argparse.Namespace) -> int:
    key: str = sys.stdin.readline().strip() if args.key == "-" else args.key
    if not key:
        raise errors.InvalidArgument("empty key")
    print(_key_sha256(key))
    return EXIT_OK


def _cmd_new_key(args: argparse.Namespace) -> int:
    key = secrets.token_urlsafe(32)
    if args.json:
        print_json({"key": key, "sha256": _key_sha256(key)})
    else:
        print(f"key     {key}")
        print(f"sha256  {_key_sha256(key)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from lora_gateway import demo

    return demo.main(Path(args.workdir) if args.workdir else None, retrain=args.retrain)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = commands.add_parser("dev", help="developer tools")
    dev_ops = dev.add_subparsers(dest="dev_command", required=True, metavar="TOOL")
    make_model = dev_ops.add_parser("make-model", help="write a tiny random Llama")
    make_model.add_argument("out", metavar="OUT")
    make_model.add_argument("--seed", type=int, default=0)
    make_model.add_argument(
        "--quantize",
        choices=QUANT_SCHEMES,
        help="write it quantized with compressed-tensors (see README, Quantized base)",
    )
    make_model.set_defaults(func=_cmd_make_model)

    make_adapter = dev_ops.add_parser("make-adapter", help="write a random PEFT LoRA adapter")
    make_adapter.add_argument("--model", required=True, metavar="DIR")
    make_adapter.add_argument("--seed", type=int, default=1)
    make_adapter.add_argument("--rank", type=int, default=8)
    make_adapter.add_argument("--alpha", type=int, default=16)
    make_adapter.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    make_adapter.add_argument("--rslora", action="store_true")
    make_adapter.add_argument("--adalora", action="store_true")
    make_adapter.add_argument("out", metavar="OUT")
    make_adapter.set_defaults(func=_cmd_make_adapter)

    hash_key = dev_ops.add_parser("hash-key", help="sha256 of an API key, for the tenants file")
    hash_key.add_argument("key", metavar="KEY", help="the key; '-' reads it from stdin")
    hash_key.set_defaults(func=_cmd_hash_key)

    new_key = dev_ops.add_parser("new-key", help="a fresh random API key and its sha256")
    new_key.add_argument("--json", action="store_true")
    new_key.set_defaults(func=_cmd_new_key)

    demo = commands.add_parser("demo", help="run the self-contained demo")
    demo.add_argument(
        "--workdir",
        metavar="DIR",
        help="the demo's work folder: trained adapters are cached in DIR/trained, the run's "
        "store and cache in DIR/run (default ~/.cache/lora-gateway/demo)",
    )
    demo.add_argument(
        "--retrain",
        action="store_true",
        help="build the base model and train the adapters again, even if cached",
    )
    demo.set_defaults(func=_cmd_demo)
