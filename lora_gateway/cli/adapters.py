"""`lora-gateway adapter ...` and `lora-gateway residency`: the Admin API, one command per call
(listings follow every page). Output goes through `format.py`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from lora_gateway import errors
from lora_gateway.cli import format as out
from lora_gateway.cli import lifecycle
from lora_gateway.cli.connect import open_client
from lora_gateway.cli.exits import EXIT_OK
from lora_gateway.client import Adapter, AdapterVersion, Residency


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


_P = TypeVar("_P", bound=_Page)


def _every_page(fetch: Callable[[str], _P]) -> list[_P]:
    """`fetch(page_token)` from the first page to the last."""
    pages = [fetch("")]
    while pages[-1].next_page_token:
        pages.append(fetch(pages[-1].next_page_token))
    return pages


def _print_version(args: argparse.Namespace, info: AdapterVersion, verb: str) -> int:
    if args.json:
        out.print_json(out.as_json(info))
    else:
        out.print_version(info, verb)
    return EXIT_OK


def _cmd_upload(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar = tqdm(
        total=0,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"upload {args.name}",
        file=sys.stderr,
        disable=args.quiet or not sys.stderr.isatty(),
        leave=False,
    )

    def progress(sent: int, total: int) -> None:
        bar.total = total
        bar.n = sent
        bar.refresh()

    try:
        with open_client(args) as client:
            info = client.upload_adapter(
                args.name,
                Path(args.directory),
                tenant=args.tenant,
                aliases=args.alias or (),
                description=args.description,
                chunk_size=args.chunk_size,
                progress=progress,
                chat_template=args.chat_template,
            )
    finally:
        bar.close()
    return _print_version(args, info, "uploaded")


def _cmd_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        pages = _every_page(
            lambda token: client.list_adapters(
                args.tenant, args.shared, page_size=args.page_size, page_token=token
            )
        )
    adapters = [a for page in pages for a in page.adapters]
    if args.json:
        out.print_json({"adapters": [out.as_json(a) for a in adapters]})
    else:
        out.print_adapters(adapters, next((p.usage for p in pages if p.usage), None))
    return EXIT_OK


def _print_adapter(args: argparse.Namespace, info: Adapter, text: str | None = None) -> int:
    """JSON, or `text` (the whole adapter when None)."""
    if args.json:
        out.print_json(out.as_json(info))
    elif text is None:
        out.print_adapter(info)
    else:
        print(text)
    return EXIT_OK


def _cmd_alias(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.set_alias(
            args.name,
            args.alias,
            args.version,
            tenant=args.tenant,
            expected_version=args.expected,
            require_eval_min_score=args.require_eval,
        )
    target = info.aliases.get(args.alias, args.version)
    text = f"{out.label(info.tenant, info.name)}@{args.alias} -> {target}"
    return _print_adapter(args, info, text)


def _parse_weight(text: str) -> tuple[str, float]:
    version, sep, weight = text.rpartition("=")
    try:
        if not sep or not version:
            raise ValueError
        return version, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected VERSION=WEIGHT, got {text!r}") from None


def _weights(pairs: list[tuple[str, float]], what: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for version, weight in pairs:
        if version in weights:
            raise errors.InvalidArgument(f"{what}: {version!r} is named twice")
        weights[version] = weight
    return weights


def _cmd_canary(args: argparse.Namespace) -> int:
    weights = _weights(args.weights, "weights")
    expected = None if args.expected is None else _weights(args.expected, "--expected")
    with open_client(args) as client:
        info = client.set_alias_weights(
            args.name,
            args.alias,
            weights,
            tenant=args.tenant,
            expected=expected,
            require_eval_min_score=args.require_eval,
        )
    target = out.alias_target(info, args.alias)
    text = f"{out.label(info.tenant, info.name)}@{args.alias} -> {target}"
    return _print_adapter(args, info, text)


def _cmd_share(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        call = client.share_adapter if args.share else client.unshare_adapter
        info = call(args.name, args.grantee, args.tenant)
    shared = ", ".join(info.shared_with) or "nobody"
    text = f"{out.label(info.tenant, info.name)} is shared with {shared}"
    return _print_adapter(args, info, text)


def _parse_part(text: str) -> tuple[str, float]:
    ref, sep, weight = text.rpartition(":")
    try:
        if not sep or not ref:
            raise ValueError
        return ref, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected REF:WEIGHT, got {text!r}") from None


def _cmd_compose(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.compose_adapter(
            args.name,
            args.part,
            tenant=args.tenant,
            aliases=args.alias or (),
            description=args.description,
        )
    return _print_version(args, info, "composed")


def _cmd_residency_op(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        call = {
            "pin": client.pin_adapter,
            "unpin": client.unpin_adapter,
            "prefetch": client.prefetch_adapter,
        }[args.op]
        entry = call(args.ref, args.tenant)
    if args.json:
        out.print_json(out.as_json(entry))
    else:
        out.print_residency([entry])
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        result = client.revoke_adapter(args.name, args.version, args.tenant)
    if args.json:
        out.print_json(out.as_json(result))
    else:
        out.print_revoked(result)
    return EXIT_OK


def _cmd_residency(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        pages = _every_page(
            lambda token: client.get_residency(
                args.tenant, page_size=args.page_size, page_token=token
            )
        )
    # Every page's entries; the figures are the last page's.
    whole = Residency(
        entries=tuple(e for page in pages for e in page.entries),
        engine_capacity=pages[-1].engine_capacity,
        disk_budget_bytes=pages[-1].disk_budget_bytes,
        disk_used_bytes=pages[-1].disk_used_bytes,
        next_page_token="",
    )
    if args.json:
        out.print_json(out.as_json(whole))
    else:
        out.print_residency(whole.entries, whole)
    return EXIT_OK


def _cmd_eval_upload(args: argparse.Namespace) -> int:
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(f"cannot read the evaluation set {args.file}: {exc}") from None
    with open_client(args) as client:
        info = client.put_evaluation_set(args.name, text, tenant=args.tenant)
    if args.json:
        out.print_json(out.as_json(info))
    else:
        print(f"evaluation set {info.sha256} ({info.cases} cases) is current for {args.name}")
    return EXIT_OK


def _cmd_eval_run(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        result = client.evaluate_adapter(
            args.name, args.version, set_sha256=args.set, tenant=args.tenant
        )
    if args.json:
        out.print_json(out.as_json(result))
    else:
        out.print_evaluation(result)
    return EXIT_OK


def _cmd_eval_show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.get_evaluations(args.name, args.version, tenant=args.tenant)
    if args.json:
        out.print_json(out.as_json(info))
    else:
        out.print_evaluations(info)
    return EXIT_OK


def _cmd_eval_policy(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.set_alias_policy(args.name, args.alias, args.min_score, tenant=args.tenant)
    if args.json:
        out.print_json(out.as_json(info))
    elif args.min_score:
        print(f"{args.name}@{args.alias} requires an evaluation score >= {args.min_score:g}")
    else:
        print(f"{args.name}@{args.alias} requires no evaluation")
    return EXIT_OK


def _require_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require-eval",
        type=float,
        default=None,
        metavar="MIN_SCORE",
        help="refuse unless each version it adds scored at least MIN_SCORE (0..1] on the "
        "adapter's current evaluation set",
    )


def _register_eval(
    ops: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    evaluation = ops.add_parser(
        "eval",
        help="evaluation sets, evaluations and alias policies",
        description="Evaluation sets and gated promotion (docs/lifecycle.md).",
    )
    sub = evaluation.add_subparsers(dest="eval_command", required=True, metavar="OP")
    upload = sub.add_parser("upload", parents=[client], help="upload the evaluation set (JSON)")
    upload.add_argument("name")
    upload.add_argument("file", metavar="FILE", help='JSON: {"cases": [...]}')
    _tenant(upload)
    upload.set_defaults(func=_cmd_eval_upload)
    run = sub.add_parser("run", parents=[client], help="evaluate a version; the result is kept")
    run.add_argument("name")
    run.add_argument("--version", default="", metavar="V", help="sha256:<hex> or an alias")
    run.add_argument("--set", default="", metavar="SHA", help="fail unless the set is this one")
    _tenant(run)
    run.set_defaults(func=_cmd_eval_run)
    show = sub.add_parser("show", parents=[client], help="the set, the results, the policies")
    show.add_argument("name")
    show.add_argument("--version", default="", metavar="V", help="one version's results")
    _tenant(show)
    show.set_defaults(func=_cmd_eval_show)
    policy = sub.add_parser(
        "policy", parents=[client], help="require a score before an alias moves (0 removes)"
    )
    policy.add_argument("name")
    policy.add_argument("alias")
    policy.add_argument("min_score", type=float, metavar="MIN_SCORE")
    _tenant(policy)
    policy.set_defaults(func=_cmd_eval_policy)


# --- automatic rollback -----------------------------------------------------------------------


def _cmd_rollback_policy(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.set_rollback_policy(
            args.name,
            args.alias,
            max_error_rate=args.max_error_rate,
            max_length_rate=args.max_length_rate,
            min_eval_score=args.min_eval_score,
            min_requests=args.min_requests,
            window_s=args.window,
            eval_interval_s=args.eval_interval,
            tenant=args.tenant,
        )
    policy = info.rollback_policies.get(args.alias)
    text = f"{args.name}@{args.alias} rolls back when " + (
        out.policy_text(policy) if policy is not None else "?"
    )
    return _print_adapter(args, info, text)


def _cmd_rollback_remove(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.remove_rollback_policy(args.name, args.alias, tenant=args.tenant)
    return _print_adapter(args, info, f"{args.name}@{args.alias} has no rollback policy")


def _cmd_rollback_show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        info = client.get_adapter(args.name, args.tenant)
    if args.json:
        out.print_json(
            {
                "tenant": info.tenant,
                "name": info.name,
                "alias_weights": out.as_json(info)["alias_weights"],
                "alias_stable": dict(info.alias_stable),
                "rollback_policies": {a: out.as_json(p) for a, p in info.rollback_policies.items()},
                "rollbacks": {a: out.as_json(r) for a, r in info.rollbacks.items()},
            }
        )
    elif info.rollback_policies or info.alias_stable or info.rollbacks:
        out.print_rollbacks(info)
    else:
        print(f"{out.label(info.tenant, info.name)} has no rollback policy, canary or rollback")
    return EXIT_OK


def _register_rollback(
    ops: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    rollback = ops.add_parser(
        "rollback",
        help="automatic rollback of canaries: policies and what they did",
        description="Automatic rollback (docs/lifecycle.md): while an alias splits its weight "
        "between its stable version (the one it pointed at before the split) and canaries, "
        "the gateway moves all weight back to the stable version by itself when a canary "
        "crosses the alias's policy.",
    )
    sub = rollback.add_subparsers(dest="rollback_command", required=True, metavar="OP")
    policy = sub.add_parser(
        "policy",
        parents=[client],
        help="set an alias's rollback policy (at least one rule)",
        description="e.g. `adapter rollback policy bot prod --max-error-rate 0.05 "
        "--min-requests 50 --window 600`. Errors are server-side failures of the canary "
        "(INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE), counted over its calls by the owner "
        "tenant, and must also exceed the stable version's error rate.",
    )
    policy.add_argument("name")
    policy.add_argument("alias")
    policy.add_argument(
        "--max-error-rate",
        type=float,
        default=None,
        metavar="R",
        help="roll back above this share of failed calls, in [0, 1)",
    )
    policy.add_argument(
        "--max-length-rate",
        type=float,
        default=None,
        metavar="R",
        help="roll back above this share of calls finishing by length, in [0, 1)",
    )
    policy.add_argument(
        "--min-requests",
        type=int,
        default=0,
        metavar="N",
        help="calls in the window before a rate applies (default 20)",
    )
    policy.add_argument(
        "--window", type=float, default=0.0, metavar="S", help="seconds of calls (default 300)"
    )
    policy.add_argument(
        "--min-eval-score",
        type=float,
        default=None,
        metavar="S",
        help="roll back when the canary's evaluation scores below S, in (0, 1]; the current "
        "evaluation set is re-run on it on a schedule",
    )
    policy.add_argument(
        "--eval-interval",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds between scheduled evaluations (default 3600)",
    )
    _tenant(policy)
    policy.set_defaults(func=_cmd_rollback_policy)
    remove = sub.add_parser("remove", parents=[client], help="remove an alias's rollback policy")
    remove.add_argument("name")
    remove.add_argument("alias")
    _tenant(remove)
    remove.set_defaults(func=_cmd_rollback_remove)
    show = sub.add_parser(
        "show", parents=[client], help="policies, stable versions and the last rollbacks"
    )
    show.add_argument("name")
    _tenant(show)
    show.set_defaults(func=_cmd_rollback_show)


# --- the parsers ------------------------------------------------------------------------------


def _page_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--page-size",
        type=int,
        default=0,
        metavar="N",
        help="adapters per request (0 = the server's default); every page is printed",
    )


def _tenant(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", default="", help="owner tenant (default: the caller's)")


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    adapter = commands.add_parser("adapter", help="manage adapters")
    ops = adapter.add_subparsers(dest="adapter_command", required=True, metavar="OP")

    upload = ops.add_parser("upload", parents=[client], help="upload a PEFT adapter folder")
    upload.add_argument("--name", required=True)
    upload.add_argument("--alias", action="append", metavar="A", help="also point A at it")
    upload.add_argument("--description", default="")
    upload.add_argument(
        "--chat-template",
        metavar="FILE",
        type=Path,
        default=None,
        help="the adapter's own chat template (Jinja), sent as its chat_template.jinja; "
        "default: DIR/chat_template.jinja if there is one, else the base model's template",
    )
    upload.add_argument("--chunk-size", type=int, default=1 << 20, help=argparse.SUPPRESS)
    upload.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _tenant(upload)
    upload.add_argument("directory", metavar="DIR")
    upload.set_defaults(func=_cmd_upload)

    listing = ops.add_parser("list", parents=[client], help="list adapters")
    _tenant(listing)
    listing.add_argument("--shared", action="store_true", help="include adapters shared with it")
    _page_size(listing)
    listing.set_defaults(func=_cmd_list)

    show = ops.add_parser(
        "show",
        parents=[client],
        help="versions with their aliases and weights, latest evaluation and recent calls",
    )
    show.add_argument("name")
    _tenant(show)
    show.set_defaults(func=lifecycle.cmd_show)

    alias = ops.add_parser("alias", parents=[client], help="point an alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", help="sha256:<hex> or another alias")
    alias.add_argument("--expected", default="", metavar="V", help="fail unless it points at V")
    _require_eval(alias)
    _tenant(alias)
    alias.set_defaults(func=_cmd_alias)

    canary = ops.add_parser(
        "canary",
        parents=[client],
        help="split an alias between versions by weight (V=1 on one version ends it)",
        description="Split ALIAS between versions: each request gets one, sticky per routing "
        "key, e.g. `adapter canary bot prod sha256:<v7>=0.9 sha256:<v8>=0.1`. Weights are > 0 "
        "and sum to 1; all weight on one version makes the alias plain again.",
    )
    canary.add_argument("name")
    canary.add_argument("alias")
    canary.add_argument(
        "weights",
        nargs="+",
        type=_parse_weight,
        metavar="V=W",
        help="version (sha256:<hex> or a plain alias) and its weight",
    )
    canary.add_argument(
        "--expected",
        nargs="*",
        type=_parse_weight,
        metavar="V=W",
        help="fail unless the alias's split is exactly this now (none given: the alias "
        "must not exist)",
    )
    _require_eval(canary)
    _tenant(canary)
    canary.set_defaults(func=_cmd_canary)

    for op, share, text in (("share", True, "share with"), ("unshare", False, "stop sharing")):
        sub = ops.add_parser(op, parents=[client], help=f"{text} another tenant")
        sub.add_argument("name")
        sub.add_argument("grantee")
        _tenant(sub)
        sub.set_defaults(func=_cmd_share, share=share)

    compose = ops.add_parser("compose", parents=[client], help="new version from weighted parts")
    compose.add_argument("name")
    compose.add_argument(
        "--part", action="append", required=True, type=_parse_part, metavar="REF:WEIGHT"
    )
    compose.add_argument("--alias", action="append", metavar="A")
    compose.add_argument("--description", default="")
    _tenant(compose)
    compose.set_defaults(func=_cmd_compose)

    for op, text in (
        ("pin", "keep loaded in the engine"),
        ("unpin", "allow eviction again"),
        ("prefetch", "load into the engine now"),
    ):
        sub = ops.add_parser(op, parents=[client], help=text)
        sub.add_argument("ref", metavar="REF")
        _tenant(sub)
        sub.set_defaults(func=_cmd_residency_op, op=op)

    revoke = ops.add_parser("revoke", parents=[client], help="revoke a version or the adapter")
    revoke.add_argument("name")
    revoke.add_argument("--version", default="", metavar="V", help="one version (default: all)")
    _tenant(revoke)
    revoke.set_defaults(func=_cmd_revoke)

    _register_eval(ops, client)
    lifecycle.register(ops, client)
    _register_rollback(ops, client)

    residency = commands.add_parser("residency", parents=[client], help="what is loaded where")
    residency.add_argument("--tenant", default="", help="'*' for all (operators)")
    _page_size(residency)
    residency.set_defaults(func=_cmd_residency)
