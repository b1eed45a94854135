"""`lora-gateway serve`: one flag per `Settings` field (the flag's help is the field's
docstring); flags win over the environment, which wins over the config file. Invalid settings
exit 2. `store repair-shares` takes the same flags."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, get_args, get_origin

from lora_gateway import errors
from lora_gateway.cli.exits import EXIT_OK, EXIT_USAGE
from lora_gateway.config import Settings

#: Settings fields whose flag is not simply `--field-name`.
_FLAG_NAMES: dict[str, tuple[str, ...]] = {"tenants_file": ("--tenants", "--tenants-file")}
_METAVARS = {"store": "URL", "listen": "HOST:PORT", "metrics_listen": "HOST:PORT"}


def _metavar(name: str, hint: Any) -> str:
    if name in _METAVARS:
        return _METAVARS[name]
    if hint is int or int in get_args(hint):
        return "N"
    if hint is float or float in get_args(hint):
        return "X"
    return name.rsplit("_", 1)[-1].upper()


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
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


def load_settings(args: argparse.Namespace) -> Settings | None:
    """The settings from --config, the environment and the flags; None (after printing why)
    when they are invalid."""
    try:
        return Settings.load(args.config, overrides=_settings_overrides(args), environ=args.environ)
    except (errors.InvalidArgument, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    if settings is None:
        return EXIT_USAGE
    if args.dry_run:
        print(json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True))
        return EXIT_OK
    from lora_gateway import server

    return server.serve(settings)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", metavar="FILE", help="YAML settings file")
    serve.add_argument(
        "--dry-run", action="store_true", help="print the resolved settings as JSON and exit"
    )
    add_settings_flags(serve)
    serve.set_defaults(func=_cmd_serve)
