"""The `lora-gateway` command.

    lora-gateway serve --config gateway.yaml --model ./tiny --store file:///var/adapters
    lora-gateway generate --adapter support@prod --prompt "hello" --max-tokens 32 [--json]
    lora-gateway adapter upload --name support --alias canary ./my-adapter
    lora-gateway adapter list | show | alias | share | unshare | compose | pin | unpin |
                         prefetch | revoke
    lora-gateway residency
    lora-gateway store repair-shares --config gateway.yaml
    lora-gateway dev make-model | make-adapter | hash-key | new-key
    lora-gateway demo

`serve` takes a config file and one flag per `Settings` field (the flag's help is the field's
docstring); flags win over the environment, which wins over the file. Invalid settings exit 2.

Client commands take `--target HOST:PORT` and `--api-key KEY`. Their defaults come from
LORA_GATEWAY_TARGET and LORA_GATEWAY_API_KEY: the only environment variables read outside
`config.py`, through the `environ` mapping given to `main` (`os.environ` when None). API keys and
prompts are never logged or echoed.

Exit codes: 0 success; 1 other failure; 2 usage or invalid settings; 3 INVALID_ARGUMENT;
4 NOT_FOUND; 5 UNAUTHENTICATED; 6 PERMISSION_DENIED; 7 RESOURCE_EXHAUSTED; 8 FAILED_PRECONDITION;
9 UNAVAILABLE; 10 DATA_LOSS; 11 DEADLINE_EXCEEDED; 12 ABORTED (also a generation that ended with
finish_reason "abort"); 130 interrupted. An error prints `error: <CODE>: <message>` on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from lora_gateway import __version__, errors
from lora_gateway.client import GatewayClient, GenerateResult, StreamDelta
from lora_gateway.config import Settings
from lora_gateway.v1 import admin_pb2

ENV_TARGET = "LORA_GATEWAY_TARGET"
ENV_API_KEY = "LORA_GATEWAY_API_KEY"
DEFAULT_TARGET = "127.0.0.1:50051"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CODES: dict[type[errors.GatewayError], int] = {
    errors.InvalidArgument: 3,
    errors.NotFound: 4,
    errors.Unauthenticated: 5,
    errors.PermissionDenied: 6,
    errors.ResourceExhausted: 7,
    errors.FailedPrecondition: 8,
    errors.Unavailable: 9,
    errors.DataLoss: 10,
    errors.DeadlineExceeded: 11,
    errors.Aborted: 12,
}

#: Settings fields whose flag is not simply `--field-name`.
_FLAG_NAMES: dict[str, tuple[str, ...]] = {"tenants_file": ("--tenants", "--tenants-file")}
_METAVARS = {"store": "URL", "listen": "HOST:PORT", "metrics_listen": "HOST:PORT"}

Command = Callable[[argparse.Namespace], int]


def exit_code(exc: errors.GatewayError) -> int:
    for cls in type(exc).__mro__:
        code = EXIT_CODES.get(cls)
        if code is not None:
            return code
    return EXIT_FAILURE


# --- serve ----------------------------------------------------------------------------------


def _metavar(name: str, hint: Any) -> str:
    if name in _METAVARS:
        return _METAVARS[name]
    if hint is int or int in get_args(hint):
        return "N"
    if hint is float or float in get_args(hint):
        return "X"
    return name.rsplit("_", 1)[-1].upper()


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; values are coerced and validated by Settings itself."""
    group = parser.add_argument_group("settings (override the config file and environment)")
    for name, info in Settings.model_fields.items():
        flags = _FLAG_NAMES.get(name, ("--" + name.replace("_", "-"),))
        hint = info.annotation
        help_text = Settings.field_doc(name).replace("%", "%%")
        if hint is bool:
            group.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif get_origin(hint) is tuple:
            group.add_argument(
                *flags,
                dest=name,
                action="append",
                default=None,
                metavar="VALUE",
                help=help_text + " (repeat the flag or separate with commas)",
            )
        else:
            choices = get_args(hint) if all(isinstance(a, str) for a in get_args(hint)) else None
            group.add_argument(
                *flags,
                dest=name,
                default=None,
                choices=choices or None,
                metavar=None if choices else _metavar(name, hint),
                help=help_text,
            )


def _settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if isinstance(value, list):  # repeated flags, each possibly comma-separated
            value = [part.strip() for item in value for part in item.split(",") if part.strip()]
        overrides[name] = value
    return overrides


def _settings_json(settings: Settings) -> dict[str, Any]:
    return settings.model_dump(mode="json")


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.load(
            args.config, overrides=_settings_overrides(args), environ=args.environ
        )
    except (errors.InvalidArgument, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print(json.dumps(_settings_json(settings), indent=2, sort_keys=True))
        return EXIT_OK
    from lora_gateway import server

    return server.serve(settings)


def _cmd_repair_shares(args: argparse.Namespace) -> int:
    """Reconcile every tenant's share index with the manifests (after an upgrade from a
    version without the index, or an interrupted share, unshare or revoke)."""
    try:
        settings = Settings.load(
            args.config, overrides=_settings_overrides(args), environ=args.environ
        )
    except (errors.InvalidArgument, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
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
        _print_json(dataclasses.asdict(report))
    else:
        print(
            f"{report.adapters} adapters, {report.grants} grants: wrote {report.added} missing "
            f"share markers, removed {report.removed} that no manifest confirms"
        )
    return EXIT_OK


# --- client plumbing ------------------------------------------------------------------------


def _read_optional(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _client(args: argparse.Namespace) -> GatewayClient:
    return GatewayClient(
        args.target,
        args.api_key or None,
        tls=args.tls,
        root_certificates=_read_optional(args.ca_cert),
        client_cert_chain=_read_optional(args.client_cert),
        client_private_key=_read_optional(args.client_key),
        timeout=args.timeout if args.timeout and args.timeout > 0 else None,
    )


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _message_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _short(version: str) -> str:
    """sha256:<first 12 hex> for tables; full versions are in `show` and --json."""
    return version[: len("sha256:") + 12] if version.startswith("sha256:") else version


def _status(value: admin_pb2.AdapterStatus.ValueType) -> str:
    return admin_pb2.AdapterStatus.Name(value).removeprefix("ADAPTER_STATUS_").lower()


def _tier(value: admin_pb2.ResidencyTier.ValueType) -> str:
    return admin_pb2.ResidencyTier.Name(value).removeprefix("RESIDENCY_TIER_").lower()


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _adapter_label(tenant: str, name: str) -> str:
    return f"{tenant}/{name}" if tenant else name


# --- generate -------------------------------------------------------------------------------


def _result_json(result: GenerateResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "adapter": dataclasses.asdict(result.adapter) if result.adapter else None,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        },
        "request_id": result.request_id,
    }


def _delta_json(delta: StreamDelta) -> dict[str, Any]:
    usage = None
    if delta.prompt_tokens is not None:
        usage = {
            "prompt_tokens": delta.prompt_tokens,
            "completion_tokens": delta.completion_tokens,
        }
    return {
        "text": delta.text,
        "token_ids": delta.token_ids,
        "finish_reason": delta.finish_reason,
        "adapter": dataclasses.asdict(delta.adapter) if delta.adapter else None,
        "usage": usage,
        "request_id": delta.request_id,
    }


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt: str | None = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    token_ids: list[int] | None = None
    if args.token_ids is not None:
        try:
            token_ids = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            raise errors.InvalidArgument("--token-ids takes comma-separated integers") from None
    params: dict[str, Any] = {
        "token_ids": token_ids,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop or (),
        "stop_token_ids": args.stop_token_id or (),
        "ignore_eos": args.ignore_eos,
        "min_tokens": args.min_tokens,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "repetition_penalty": args.repetition_penalty,
        "request_id": args.request_id,
    }
    finish_reason: str | None
    with _client(args) as client:
        if args.stream:
            finish_reason = None
            for delta in client.generate_stream(args.adapter, prompt, **params):
                if args.json:
                    print(json.dumps(_delta_json(delta), sort_keys=True), flush=True)
                else:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                finish_reason = delta.finish_reason or finish_reason
            if not args.json:
                sys.stdout.write("\n")
        else:
            result = client.generate(args.adapter, prompt, **params)
            finish_reason = result.finish_reason
            if args.json:
                _print_json(_result_json(result))
            else:
                print(result.text)
    if finish_reason == "abort":
        print("error: ABORTED: the server aborted the generation", file=sys.stderr)
        return EXIT_CODES[errors.Aborted]
    return EXIT_OK


# --- adapter admin --------------------------------------------------------------------------


def _print_version(info: admin_pb2.AdapterVersionInfo, verb: str) -> None:
    print(f"{verb} {_adapter_label(info.tenant, info.name)} {info.version}")
    print(
        f"  rank {info.rank}, alpha {info.alpha:g}{', rsLoRA' if info.use_rslora else ''}, "
        f"dtype {info.dtype or '?'}, base {info.base_model or '?'}"
    )
    print(f"  targets {','.join(info.target_modules) or '-'}")
    for part in info.composed_from:
        print(f"  part {part.adapter} x {part.weight:g}")
    for f in info.files:
        print(f"  file {f.filename} {_size(f.size)} sha256:{f.sha256}")


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
        with _client(args) as client:
            info = client.upload_adapter(
                args.name,
                Path(args.directory),
                tenant=args.tenant,
                aliases=args.alias or (),
                description=args.description,
                chunk_size=args.chunk_size,
                progress=progress,
            )
    finally:
        bar.close()
    if args.json:
        _print_json(_message_dict(info))
    else:
        _print_version(info, "uploaded")
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    adapters: list[admin_pb2.AdapterInfo] = []
    usage: admin_pb2.TenantUsage | None = None
    with _client(args) as client:
        token = ""
        while True:
            page = client.list_adapters(
                args.tenant, args.shared, page_size=args.page_size, page_token=token
            )
            adapters.extend(page.adapters)
            if usage is None and page.HasField("usage"):
                usage = page.usage
            token = page.next_page_token
            if not token:
                break
    if args.json:
        _print_json({"adapters": [_message_dict(a) for a in adapters]})
        return EXIT_OK
    rows = [
        (
            _adapter_label(a.tenant, a.name),
            _status(a.status),
            len(a.versions),
            _short(a.aliases.get("latest", "")) or "-",
            ",".join(sorted(a.aliases)) or "-",
            ",".join(a.shared_with) or "-",
        )
        for a in adapters
    ]
    _table(("ADAPTER", "STATUS", "VERSIONS", "LATEST", "ALIASES", "SHARED WITH"), rows)
    if usage is not None:
        print()
        print(f"usage       {_usage_text(usage)}")
    return EXIT_OK


def _usage_text(usage: admin_pb2.TenantUsage) -> str:
    """ "tenant acme: 1.2 MiB of 16.0 GiB stored, 3 of 10000 adapters"."""
    from adapter_store.spool import format_bytes

    return (
        f"tenant {usage.tenant}: {format_bytes(usage.stored_bytes)} of "
        f"{format_bytes(usage.max_stored_bytes)} stored, {usage.adapters} of "
        f"{usage.max_adapters} adapters"
    )


def _print_adapter(info: admin_pb2.AdapterInfo) -> None:
    print(f"adapter     {_adapter_label(info.tenant, info.name)}")
    print(f"status      {_status(info.status)}")
    print(f"shared with {', '.join(info.shared_with) or '-'}")
    if info.HasField("usage"):
        print(f"usage       {_usage_text(info.usage)}")
    for alias in sorted(info.aliases):
        print(f"alias       {alias} -> {info.aliases[alias]}")
    by_version: dict[str, list[str]] = {}
    for alias, version in info.aliases.items():
        by_version.setdefault(version, []).append(alias)
    rows = [
        (
            v.version,
            v.created_at,
            v.rank,
            f"{v.alpha:g}",
            ",".join(v.target_modules),
            _status(v.status),
            ",".join(sorted(by_version.get(v.version, []))) or "-",
        )
        for v in info.versions
    ]
    print()
    _table(("VERSION", "CREATED", "RANK", "ALPHA", "TARGETS", "STATUS", "ALIASES"), rows)


def _cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_adapter(args.name, args.tenant)
    if args.json:
        _print_json(_message_dict(info))
    else:
        _print_adapter(info)
    return EXIT_OK


def _cmd_alias(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.set_alias(
            args.name,
            args.alias,
            args.version,
            tenant=args.tenant,
            expected_version=args.expected,
        )
    if args.json:
        _print_json(_message_dict(info))
    else:
        target = info.aliases.get(args.alias, args.version)
        print(f"{_adapter_label(info.tenant, info.name)}@{args.alias} -> {target}")
    return EXIT_OK


def _cmd_share(args: argparse.Namespace) -> int:
    with _client(args) as client:
        call = client.share_adapter if args.share else client.unshare_adapter
        info = call(args.name, args.grantee, args.tenant)
    if args.json:
        _print_json(_message_dict(info))
    else:
        shared = ", ".join(info.shared_with) or "nobody"
        print(f"{_adapter_label(info.tenant, info.name)} is shared with {shared}")
    return EXIT_OK


def _parse_part(text: str) -> tuple[str, float]:
    ref, sep, weight = text.rpartition(":")
    try:
        if not sep or not ref:
            raise ValueError
        return ref, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected REF:WEIGHT, got {text!r}") from None


def _cmd_compose(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.compose_adapter(
            args.name,
            args.part,
            tenant=args.tenant,
            aliases=args.alias or (),
            description=args.description,
        )
    if args.json:
        _print_json(_message_dict(info))
    else:
        _print_version(info, "composed")
    return EXIT_OK


def _residency_row(e: admin_pb2.ResidencyEntry) -> tuple[object, ...]:
    return (
        _adapter_label(e.tenant, e.name),
        _short(e.version),
        _tier(e.tier),
        "yes" if e.pinned else "no",
        e.lora_int_id or "-",
        _size(e.size_bytes),
    )


_RESIDENCY_HEADERS = ("ADAPTER", "VERSION", "TIER", "PINNED", "LORA ID", "SIZE")


def _cmd_residency_op(args: argparse.Namespace) -> int:
    with _client(args) as client:
        call = {
            "pin": client.pin_adapter,
            "unpin": client.unpin_adapter,
            "prefetch": client.prefetch_adapter,
        }[args.op]
        entry = call(args.ref, args.tenant)
    if args.json:
        _print_json(_message_dict(entry))
    else:
        _table(_RESIDENCY_HEADERS, [_residency_row(entry)])
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.revoke_adapter(args.name, args.version, args.tenant)
    if args.json:
        _print_json(_message_dict(response))
    else:
        revoked = ", ".join(response.revoked_versions) or "nothing (already revoked)"
        print(f"revoked {revoked}")
        print(f"aborted {response.aborted_requests} in-flight request(s)")
    return EXIT_OK


def _cmd_residency(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.get_residency(args.tenant, page_size=args.page_size)
        token = response.next_page_token
        while token:  # every page; the figures are the last page's
            page = client.get_residency(args.tenant, page_size=args.page_size, page_token=token)
            response.entries.extend(page.entries)
            response.engine_capacity = page.engine_capacity
            response.disk_budget_bytes = page.disk_budget_bytes
            response.disk_used_bytes = page.disk_used_bytes
            token = page.next_page_token
        response.next_page_token = ""
    if args.json:
        _print_json(_message_dict(response))
        return EXIT_OK
    _table(_RESIDENCY_HEADERS, [_residency_row(e) for e in response.entries])
    print(
        f"\nengine capacity {response.engine_capacity}; disk cache "
        f"{_size(response.disk_used_bytes)} of {_size(response.disk_budget_bytes)}"
    )
    return EXIT_OK


# --- dev and demo ---------------------------------------------------------------------------


def _cmd_make_model(args: argparse.Namespace) -> int:
    from lora_gateway import devtools

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
        _print_json({"key": key, "sha256": _key_sha256(key)})
    else:
        print(f"key     {key}")
        print(f"sha256  {_key_sha256(key)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from lora_gateway import demo

    return demo.main(Path(args.workdir) if args.workdir else None)


# --- the parser -----------------------------------------------------------------------------


def _client_parent(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=environ.get(ENV_TARGET) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"gateway address (env {ENV_TARGET}; default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--api-key",
        default=environ.get(ENV_API_KEY),
        metavar="KEY",
        help=f"API key, sent as a bearer token (env {ENV_API_KEY})",
    )
    group.add_argument(
        "--timeout", type=float, default=60.0, help="deadline in seconds; 0 = none (default 60)"
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca-cert", metavar="PEM", help="CA bundle to verify the server (TLS)")
    group.add_argument("--client-cert", metavar="PEM", help="client certificate chain (mTLS)")
    group.add_argument("--client-key", metavar="PEM", help="client private key (mTLS)")
    parent.add_argument("--json", action="store_true", help="print JSON")
    return parent


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


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-gateway", description="Multi-tenant LoRA serving gateway."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_parent(environ)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="FILE", help="YAML settings file")
    serve.add_argument(
        "--dry-run", action="store_true", help="print the resolved settings as JSON and exit"
    )
    _add_settings_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    gen = commands.add_parser("generate", parents=[client], help="generate a completion")
    gen.add_argument("--adapter", default="", help="adapter reference; empty = the base model")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text ('-' reads stdin)")
    prompt.add_argument("--token-ids", metavar="IDS", help="prompt as comma-separated token ids")
    gen.add_argument("--max-tokens", type=int, default=0, help="0 = the server's default")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", metavar="S", help="stop string (repeatable)")
    gen.add_argument("--stop-token-id", action="append", type=int, metavar="ID")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--presence-penalty", type=float)
    gen.add_argument("--frequency-penalty", type=float)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--request-id", default="", help="id echoed in the server's logs")
    gen.add_argument(
        "--stream", action="store_true", help="print deltas as they come (with --json: JSON lines)"
    )
    gen.set_defaults(func=_cmd_generate)

    adapter = commands.add_parser("adapter", help="manage adapters")
    ops = adapter.add_subparsers(dest="adapter_command", required=True, metavar="OP")

    upload = ops.add_parser("upload", parents=[client], help="upload a PEFT adapter folder")
    upload.add_argument("--name", required=True)
    upload.add_argument("--alias", action="append", metavar="A", help="also point A at it")
    upload.add_argument("--description", default="")
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

    show = ops.add_parser("show", parents=[client], help="versions, aliases and sharing")
    show.add_argument("name")
    _tenant(show)
    show.set_defaults(func=_cmd_show)

    alias = ops.add_parser("alias", parents=[client], help="point an alias at a version")
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("version", help="sha256:<hex> or another alias")
    alias.add_argument("--expected", default="", metavar="V", help="fail unless it points at V")
    _tenant(alias)
    alias.set_defaults(func=_cmd_alias)

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

    residency = commands.add_parser("residency", parents=[client], help="what is loaded where")
    residency.add_argument("--tenant", default="", help="'*' for all (operators)")
    _page_size(residency)
    residency.set_defaults(func=_cmd_residency)

    store = commands.add_parser("store", help="maintenance of the adapter store (no gateway)")
    store_ops = store.add_subparsers(dest="store_command", required=True, metavar="TASK")
    repair = store_ops.add_parser(
        "repair-shares",
        help="make every share index agree with the manifests (once after an upgrade; safe "
        "while gateways serve)",
    )
    repair.add_argument("--config", metavar="FILE", help="YAML settings file (the store's)")
    repair.add_argument("--json", action="store_true", help="print JSON")
    _add_settings_flags(repair)
    repair.set_defaults(func=_cmd_repair_shares)

    dev = commands.add_parser("dev", help="developer tools")
    dev_ops = dev.add_subparsers(dest="dev_command", required=True, metavar="TOOL")
    make_model = dev_ops.add_parser("make-model", help="write a tiny random Llama")
    make_model.add_argument("out", metavar="OUT")
    make_model.add_argument("--seed", type=int, default=0)
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
    demo.add_argument("--workdir", metavar="DIR", help="keep the demo's files here")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit code. `environ` defaults to `os.environ`."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    parser = build_parser(env)
    args = parser.parse_args(None if argv is None else list(argv))
    args.environ = env
    command: Command = args.func
    try:
        return command(args)
    except errors.GatewayError as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return exit_code(exc)
    except BrokenPipeError:
        # The reader went away (`| head`): silence the final flush instead of a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
