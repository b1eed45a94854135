"""`lora-gateway store ...`: maintenance of the adapter store itself, no gateway involved."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from lora_gateway import errors
from lora_gateway.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from lora_gateway.cli.format import print_json
from lora_gateway.cli.serve import add_settings_flags, load_settings

if TYPE_CHECKING:
    from adapter_store import BaseModelSpec


def _no_model() -> BaseModelSpec:
    """The maintenance tasks read manifests and write or delete objects, never an adapter: a
    spec that would accept none, so that the base model need not be at hand."""
    from adapter_store import BaseModelSpec

    return BaseModelSpec(name="", aliases=(), num_layers=0, module_shapes={}, max_rank=1)


#: `store sweep`'s default --min-age: a day, far above any upload (`upload_timeout_s`) and any
#: clock skew between this host and the store.
DEFAULT_SWEEP_MIN_AGE_S = 86_400.0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Delete version objects no manifest names (a crash between an upload's objects and its
    manifest, an interrupted purge) once older than --min-age (adapter_store.sweep: why a
    concurrent upload is never touched). Safe while gateways serve, and more than once."""
    settings = load_settings(args)
    if settings is None:
        return EXIT_USAGE
    if not args.min_age > settings.upload_timeout_s:
        print(
            f"error: --min-age ({args.min_age:g}s) must exceed upload_timeout_s "
            f"({settings.upload_timeout_s:g}s), the longest an upload takes",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from adapter_store import InvalidAdapter, Registry, StoreError
    from lora_gateway.stores import open_backend

    try:
        report = Registry(open_backend(settings), _no_model()).sweep_orphans(
            args.tenant or None, min_age_s=args.min_age, dry_run=args.dry_run
        )
    except (StoreError, InvalidAdapter) as exc:
        code, text = errors.status_of(exc)
        print(f"error: {code.name}: {text}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json(dataclasses.asdict(report))
    else:
        verb = "would delete" if report.dry_run else "deleted"
        print(
            f"{report.adapters} adapters, {report.objects} version objects: {verb} "
            f"{len(report.orphans)} orphaned, kept {report.young} younger than {args.min_age:g}s"
        )
        for key in report.orphans:
            print(f"  {key}")
    return EXIT_OK


def _cmd_repair_shares(args: argparse.Namespace) -> int:
    """Reconcile every tenant's share index with the manifests (after an upgrade from a
    version without the index, or an interrupted share, unshare or revoke)."""
    settings = load_settings(args)
    if settings is None:
        return EXIT_USAGE
    from adapter_store import Registry, StoreError
    from lora_gateway.stores import open_backend

    try:
        report = Registry(open_backend(settings), _no_model()).repair_share_index()
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


def _cmd_rebuild_index(args: argparse.Namespace) -> int:
    """Copy every manifest into its tenant's listing index and mark it ready (after an upgrade
    from a version without the index, or an error that withdrew it: adapter_store.index)."""
    settings = load_settings(args)
    if settings is None:
        return EXIT_USAGE
    from adapter_store import InvalidAdapter, Registry, StoreError
    from lora_gateway.stores import open_backend

    try:
        reports = Registry(open_backend(settings), _no_model()).rebuild_index(args.tenant or None)
    except (StoreError, InvalidAdapter) as exc:
        code, text = errors.status_of(exc)
        print(f"error: {code.name}: {text}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print_json([dataclasses.asdict(report) for report in reports])
    else:
        for report in reports:
            print(
                f"{report.tenant}: {report.adapters} adapters, "
                f"{report.shards_written} shards written; ready"
            )
    return EXIT_OK


def _task(
    tasks: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
) -> argparse.ArgumentParser:
    """One maintenance task's parser: the store's settings (--config and the settings flags),
    --json, and the task's own arguments, which the caller adds."""
    task = tasks.add_parser(name, help=help_text)
    task.add_argument("--config", metavar="FILE", help="YAML settings file (the store's)")
    task.add_argument("--json", action="store_true", help="print JSON")
    add_settings_flags(task)
    task.set_defaults(func=func)
    return task


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = commands.add_parser("store", help="maintenance of the adapter store (no gateway)")
    store_ops = store.add_subparsers(dest="store_command", required=True, metavar="TASK")
    _task(
        store_ops,
        "repair-shares",
        _cmd_repair_shares,
        "make every share index agree with the manifests (once after an upgrade; safe while "
        "gateways serve)",
    )
    rebuild = _task(
        store_ops,
        "rebuild-index",
        _cmd_rebuild_index,
        "copy every manifest into the listing index and mark it ready (once after an upgrade, "
        "or when the log says the index was withdrawn); safe while gateways serve",
    )
    rebuild.add_argument("--tenant", default="", help="only this tenant (default: all)")
    sweep = _task(
        store_ops,
        "sweep",
        _cmd_sweep,
        "delete version objects no manifest names, older than --min-age (a crash between an "
        "upload's objects and its manifest); safe while gateways serve",
    )
    sweep.add_argument("--dry-run", action="store_true", help="list the orphans, delete nothing")
    sweep.add_argument(
        "--min-age",
        type=float,
        default=DEFAULT_SWEEP_MIN_AGE_S,
        metavar="S",
        help="only objects older than this many seconds (default: a day); must exceed "
        "upload_timeout_s",
    )
    sweep.add_argument("--tenant", default="", help="only this tenant's adapters (default: all)")
