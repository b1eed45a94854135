"""`lora-gateway adapter show` and `adapter retention`: an adapter's lifecycle at a glance
(versions with their aliases and weights, latest evaluation and recent calls) and its
retention policy. Output goes through `format.py`."""

from __future__ import annotations

import argparse

from lora_gateway import errors
from lora_gateway.cli import format as out
from lora_gateway.cli.connect import open_client
from lora_gateway.cli.exits import EXIT_OK
from lora_gateway.client import Evaluations


def cmd_show(args: argparse.Namespace) -> int:
    """GetAdapter, then GetEvaluations for each version's latest result (a caller who may see
    the adapter but not its evaluations, a grantee, gets the table without them)."""
    with open_client(args) as client:
        info = client.get_adapter(args.name, args.tenant)
        evaluations: Evaluations | None
        try:
            evaluations = client.get_evaluations(args.name, tenant=args.tenant)
        except (errors.NotFound, errors.PermissionDenied):
            evaluations = None
    if args.json:
        out.print_json(out.overview_json(info, evaluations))
    else:
        out.print_overview(info, evaluations)
    return EXIT_OK


def _cmd_retention(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.keep_last is None and not args.keep_all:
            info = client.get_adapter(args.name, args.tenant)
            if args.json:
                out.print_json(out.retention_json(info))
            else:
                print(out.retention_text(info))
            return EXIT_OK
        done = client.set_retention(
            args.name, None if args.keep_all else args.keep_last, tenant=args.tenant
        )
    if args.json:
        out.print_json(out.retention_json(done.adapter, done))
    else:
        out.print_retention(done)
    return EXIT_OK


def register(
    ops: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    """`adapter retention` (`adapter show`'s parser stays with the other adapter commands; its
    function is `cmd_show`)."""
    retention = ops.add_parser(
        "retention",
        parents=[client],
        help="show or set the retention policy (keep the newest K versions and aliased ones)",
        description="Without a flag: print the adapter's retention policy. With --keep-last "
        "K: keep the newest K versions (by upload time) plus every version an alias points "
        "at, retire (revoke) the others now and after each upload, and print what was "
        "retired. --keep-all removes the policy. See docs/lifecycle.md.",
    )
    retention.add_argument("name")
    policy = retention.add_mutually_exclusive_group()
    policy.add_argument(
        "--keep-last",
        type=int,
        default=None,
        metavar="K",
        help="keep the newest K versions (K >= 1) plus every aliased one",
    )
    policy.add_argument(
        "--keep-all", action="store_true", help="remove the policy: keep every version"
    )
    retention.add_argument("--tenant", default="", help="owner tenant (default: the caller's)")
    retention.set_defaults(func=_cmd_retention)
