"""`lora-gateway generate`: one completion, printed whole or streamed; `lora-gateway tokenize`.

The generation flags are derived from `GenerateOptions` (one flag per field, its help the
field's docstring, `--max-tokens` for `max_tokens`), as `serve`'s are from `Settings`: a new
option of a plain type (bool, int, float, str, or a sequence of one) gets its flag without an
edit here. A flag left out leaves the option to its default. One option is read from a file
(`--json-schema FILE`, `_FILE_OPTIONS`).

The prompt is one of `--prompt TEXT` ('-': stdin), `--token-ids IDS`, `--messages FILE` (a JSON
list of {"role", "content"} objects; '-': stdin) or `--system TEXT` / `--user TEXT` (a
conversation: the system message first, then the user messages in order).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from lora_gateway import errors
from lora_gateway.cli.connect import open_client
from lora_gateway.cli.exits import EXIT_CODES, EXIT_OK
from lora_gateway.cli.format import print_json, result_json
from lora_gateway.client import ChatMessage, GenerateOptions, Prompt
from lora_gateway.client.options import option_specs

#: Options whose flag is not simply `--field-name` (a repeated flag takes one item).
_FLAG_NAMES = {"stop_token_ids": "--stop-token-id"}
_METAVARS = {int: "N", float: "X", str: "TEXT"}
#: Options whose flag names a file holding the value ('-': stdin).
_FILE_OPTIONS = frozenset({"json_schema"})


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
                metavar="FILE" if spec.name in _FILE_OPTIONS else _METAVARS[spec.type],
                help=help_text + (" Repeat the flag for more." if spec.repeated else ""),
            )


def options_from_args(args: argparse.Namespace) -> GenerateOptions:
    given: dict[str, Any] = {}
    for spec in option_specs():
        value = getattr(args, spec.name, None)
        if value is not None:
            given[spec.name] = _read(value) if spec.name in _FILE_OPTIONS else value
    return GenerateOptions(**given)


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InvalidArgument(f"cannot read {path}: {exc}") from None


def _messages_file(path: str) -> list[ChatMessage]:
    try:
        items = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise errors.InvalidArgument(f"--messages: {path} is not JSON: {exc}") from None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("role"), str) and isinstance(i.get("content"), str)
        for i in items
    ):
        raise errors.InvalidArgument(
            '--messages: a JSON list of {"role": ..., "content": ...} objects'
        )
    return [ChatMessage(i["role"], i["content"]) for i in items]


def prompt_from_args(args: argparse.Namespace) -> tuple[Prompt | None, list[int] | None]:
    """The prompt flags: exactly one of --prompt, --token-ids, --messages, --system/--user."""
    conversation = bool(args.system or args.user)
    given = [
        args.prompt is not None,
        getattr(args, "token_ids", None) is not None,
        args.messages is not None,
        conversation,
    ]
    if sum(given) != 1:
        flags = "--prompt, --messages, --system/--user"
        if hasattr(args, "token_ids"):
            flags = "--prompt, --token-ids, --messages, --system/--user"
        raise errors.InvalidArgument(f"give exactly one prompt: {flags}")
    if args.messages is not None:
        return _messages_file(args.messages), None
    if conversation:
        turns = [ChatMessage("system", args.system)] if args.system else []
        turns += [ChatMessage("user", text) for text in args.user or ()]
        return turns, None
    if args.prompt is not None:
        return (sys.stdin.read() if args.prompt == "-" else args.prompt), None
    return None, _token_ids(args.token_ids)


def _add_prompt_flags(parser: argparse.ArgumentParser, *, token_ids: bool) -> None:
    group = parser.add_argument_group("prompt (exactly one)")
    group.add_argument("--prompt", help="prompt text ('-' reads stdin)")
    if token_ids:
        group.add_argument("--token-ids", metavar="IDS", help="prompt as comma-separated ids")
    group.add_argument(
        "--messages",
        metavar="FILE",
        help='a conversation: JSON list of {"role", "content"} objects (\'-\' reads stdin), '
        "rendered with the model's chat template",
    )
    group.add_argument("--system", metavar="TEXT", help="a conversation's system message")
    group.add_argument(
        "--user",
        metavar="TEXT",
        action="append",
        help="a conversation's user message (repeat for more; after --system)",
    )


def _token_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise errors.InvalidArgument("--token-ids takes comma-separated integers") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt, token_ids = prompt_from_args(args)
    options = options_from_args(args)
    finish_reason: str | None
    with open_client(args) as client:
        if args.stream:
            finish_reason = None
            for delta in client.generate_stream(
                args.adapter,
                prompt,
                options,
                token_ids=token_ids,
                request_id=args.request_id,
                routing_key=args.routing_key,
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
                args.adapter,
                prompt,
                options,
                token_ids=token_ids,
                request_id=args.request_id,
                routing_key=args.routing_key,
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
    _add_prompt_flags(gen, token_ids=True)
    gen.add_argument("--request-id", default="", help="id echoed in the server's logs")
    gen.add_argument(
        "--routing-key",
        default="",
        metavar="KEY",
        help="which version of a weighted alias serves (the same KEY, the same version)",
    )
    gen.add_argument(
        "--stream", action="store_true", help="print deltas as they come (with --json: JSON lines)"
    )
    add_option_flags(gen)
    gen.set_defaults(func=_cmd_generate)

    tok = commands.add_parser(
        "tokenize", parents=[client], help="count a prompt's tokens (as generate would send it)"
    )
    tok.add_argument("--adapter", default="", help="its chat template; empty = the base model's")
    _add_prompt_flags(tok, token_ids=False)
    tok.set_defaults(func=_cmd_tokenize)


def _cmd_tokenize(args: argparse.Namespace) -> int:
    prompt, _ = prompt_from_args(args)
    assert prompt is not None
    with open_client(args) as client:
        result = client.tokenize(args.adapter, prompt)
    if args.json:
        print_json(dataclasses.asdict(result))
    else:
        print(f"{result.count} tokens (context {result.max_model_len})")
        print(",".join(str(t) for t in result.token_ids))
    return EXIT_OK
