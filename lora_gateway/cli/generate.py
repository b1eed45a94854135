"""`lora-gateway generate`: one completion, printed whole or streamed.

The generation flags are derived from `GenerateOptions` (one flag per field, its help the
field's docstring, `--max-tokens` for `max_tokens`), as `serve`'s are from `Settings`: a new
option of a plain type (bool, int, float, str, or a sequence of one) gets its flag without an
edit here. A flag left out leaves the option to its default.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lora_gateway import errors
from lora_gateway.cli.connect import open_client
from lora_gateway.cli.exits import EXIT_CODES, EXIT_OK
from lora_gateway.cli.format import print_json, result_json
from lora_gateway.client import GenerateOptions
from lora_gateway.client.options import option_specs

#: Options whose flag is not simply `--field-name` (a repeated flag takes one item).
_FLAG_NAMES = {"stop_token_ids": "--stop-token-id"}
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def option_flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `GenerateOptions` field; the options type checks the values."""
    group = parser.add_argument_group("generation options (default: the server's)")
    for spec in option_specs():
        help_text = spec.doc.replace("%", "%%")
        if spec.type is bool:
            group.add_argument(
                option_flag(spec.name),
                dest=spec.name,
                action="store_true",
                default=None,
                help=help_text,
            )
        else:
            group.add_argument(
                option_flag(spec.name),
                dest=spec.name,
                type=spec.type,
                action="append" if spec.repeated else "store",
                metavar=_METAVARS[spec.type],
                help=help_text + (" Repeat the flag for more." if spec.repeated else ""),
            )


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    given: dict[str, Any] = {}
    for spec in option_specs():
        value = getattr(args, spec.name, None)
        if value is not None:
            given[spec.name] = value
    return GenerateOptions(**given)


def _token_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise errors.InvalidArgument("--token-ids takes comma-separated integers") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt: str | None = sys.stdin.read() if args.prompt == "-" else args.prompt
    token_ids = _token_ids(args.token_ids)
    options = options_from_args(args)
    finish_reason: str | None
    with open_client(args) as client:
        if args.stream:
            finish_reason = None
            for delta in client.generate_stream(
                args.adapter, prompt, options, token_ids=token_ids, request_id=args.request_id
            ):
                if args.json:
                    print_json(result_json(delta), lines=True)
                else:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                finish_reason = delta.finish_reason or finish_reason
            if not args.json:
                sys.stdout.write("\n")
        else:
            result = client.generate(
                args.adapter, prompt, options, token_ids=token_ids, request_id=args.request_id
            )
            finish_reason = result.finish_reason
            if args.json:
                print_json(result_json(result))
            else:
                print(result.text)
    if finish_reason == "abort":
        print("error: ABORTED: the server aborted the generation", file=sys.stderr)
        return EXIT_CODES[errors.Aborted]
    return EXIT_OK


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    gen = commands.add_parser("generate", parents=[client], help="generate a completion")
    gen.add_argument("--adapter", default="", help="adapter reference; empty = the base model")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text ('-' reads stdin)")
    prompt.add_argument("--token-ids", metavar="IDS", help="prompt as comma-separated token ids")
    gen.add_argument("--request-id", default="", help="id echoed in the server's logs")
    gen.add_argument(
        "--stream", action="store_true", help="print deltas as they come (with --json: JSON lines)"
    )
    add_option_flags(gen)
    gen.set_defaults(func=_cmd_generate)
