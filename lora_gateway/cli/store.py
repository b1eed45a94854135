"""`lora-gateway store ...`: maintenance of the adapter store itself, no gateway involved."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from lora_gateway import errors
from lora_gateway.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from lora_gateway.cli.format import print_json
from lora_gateway.cli.serve import add_settings_flags, load_settings


def _cmd_repair_shares(args: argparse.Namespace) -> int:
    """Reconcile every tenant's share index with the manifests (after an upgrade from a
    version without the index, or an interrupted share, unshare or revoke)."""
    settings = load_settings(args)
    if settings is None:
        return EXIT_USAGE
    from adapter_store import BaseModelSpec, Registry, StoreError
    from lora_gateway.stores import open_backend

    # The repair reads manifests and writes share markers, never an adapter: a spec that
    # would accept none, so that the base model need not be at hand.
    spec = BaseModelSpec(name="", aliases=(), num_layers=0, module_shapes={}, max_rank=1)
    try:
        report = Registry(open_backend(settings), spec).repair_share_index()
    except StoreError as exc:
        code, text = errors.status_of(exc)
        print(f"error: {code.name}: {text}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json(dataclasses.asdict(report))
    else:
        print(
            f"{report.adapters} adapters, {report.grants} grants: wrote {report.added} missing "
            f"share markers, removed {report.removed} that no manifest confirms"
        )
    return EXIT_OK


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = commands.add_parser("store", help="maintenance of the adapter store (no gateway)")
    store_ops = store.add_subparsers(dest="store_command", required=True, metavar="TASK")
    repair = store_ops.add_parser(
        "repair-shares",
        help="make every share index agree with the manifests (once after an upgrade; safe "
        "while gateways serve)",
    )
    repair.add_argument("--config", metavar="FILE", help="YAML settings file (the store's)")
    repair.add_argument("--json", action="store_true", help="print JSON")
    add_settings_flags(repair)
    repair.set_defaults(func=_cmd_repair_shares)
