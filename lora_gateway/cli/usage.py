"""`lora-gateway usage`: sums of the usage records (JSON lines, `usage_log`) for chargeback and
capacity planning. Reads files only; no gateway involved."""

from __future__ import annotations

import argparse
import sys
from typing import cast

from lora_gateway import errors
from lora_gateway.cli import format as out
from lora_gateway.cli.exits import EXIT_OK
from lora_gateway.usage import GroupBy, parse_time, summarize


def _time(text: str) -> str:
    try:
        parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 date or time: {text!r} (e.g. 2025-01-31 or 2025-01-31T12:00:00Z)"
        ) from None
    return text


def _cmd_usage(args: argparse.Namespace) -> int:
    since = parse_time(args.since)
    until = None if args.until is None else parse_time(args.until)
    if until is not None and until <= since:
        raise errors.InvalidArgument("--until must be later than --since")
    handles = [open(path, encoding="utf-8", errors="replace") for path in args.file]  # noqa: SIM115
    try:
        summary = summarize(
            ((path, handle) for path, handle in zip(args.file, handles, strict=True)),
            tenant=args.tenant,
            since=since,
            until=until,
            by=cast(GroupBy, args.by),
        )
    finally:
        for handle in handles:
            handle.close()
    if summary.bad_lines:
        shown = ", ".join(summary.bad_examples)
        more = "" if summary.bad_lines <= len(summary.bad_examples) else ", ..."
        print(
            f"warning: {summary.bad_lines} line(s) are not usage records, skipped: {shown}{more}",
            file=sys.stderr,
        )
    if args.json:
        out.print_json(summary.as_json())
        return EXIT_OK
    rows = [
        (
            g.key if args.by != "version" else out.short(g.key),
            g.requests,
            g.errors,
            g.prompt_tokens,
            g.completion_tokens,
            f"{g.mean_latency_s:.3f}",
        )
        for g in (*summary.groups, summary.total)
    ]
    heading = {"adapter": "ADAPTER", "version": "VERSION", "key": "KEY ID"}[args.by]
    out.table(
        (heading, "REQUESTS", "ERRORS", "PROMPT TOKENS", "COMPLETION TOKENS", "MEAN LATENCY S"),
        rows,
    )
    return EXIT_OK


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = commands.add_parser(
        "usage",
        help="sum the usage records (usage_log) of a tenant: requests, errors, tokens, latency",
    )
    usage.add_argument(
        "--file",
        action="append",
        required=True,
        metavar="PATH",
        help="a usage_log file (JSON lines); repeat for rotated files",
    )
    usage.add_argument("--tenant", required=True, help="the tenant whose records are summed")
    usage.add_argument(
        "--since", required=True, type=_time, help="ISO 8601 start, inclusive (UTC if no zone)"
    )
    usage.add_argument("--until", type=_time, help="ISO 8601 end, exclusive (default: no end)")
    usage.add_argument(
        "--by",
        choices=("adapter", "version", "key"),
        default="adapter",
        help="one row per adapter (owner/name), version (sha256) or API key id",
    )
    usage.add_argument("--json", action="store_true", help="print JSON")
    usage.set_defaults(func=_cmd_usage)
