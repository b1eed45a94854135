"""The parser (each command's module registers its own) and the dispatch: a command's error
becomes its exit code and one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from lora_gateway import __version__, errors
from lora_gateway.cli import adapters, dev, generate, serve, store, usage
from lora_gateway.cli.connect import client_parent
from lora_gateway.cli.exits import EXIT_FAILURE, EXIT_INTERRUPTED, exit_code

Command = Callable[[argparse.Namespace], int]


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-gateway", description="Multi-tenant LoRA serving gateway."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = client_parent(environ)
    serve.register(commands)
    generate.register(commands, client)
    adapters.register(commands, client)
    store.register(commands)
    usage.register(commands)
    dev.register(commands)
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
