"""The flags every client command shares (target, key, deadline, TLS, --json) and the client
they open. Their defaults come from LORA_GATEWAY_TARGET and LORA_GATEWAY_API_KEY, read through
the `environ` mapping given to `main`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from lora_gateway.client import GatewayClient

ENV_TARGET = "LORA_GATEWAY_TARGET"
ENV_API_KEY = "LORA_GATEWAY_API_KEY"
DEFAULT_TARGET = "127.0.0.1:50051"


def client_parent(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """A parent parser holding the connection flags and --json."""
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


def _read_optional(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def open_client(args: argparse.Namespace) -> GatewayClient:
    return GatewayClient(
        args.target,
        args.api_key or None,
        tls=args.tls,
        root_certificates=_read_optional(args.ca_cert),
        client_cert_chain=_read_optional(args.client_cert),
        client_private_key=_read_optional(args.client_key),
        timeout=args.timeout if args.timeout and args.timeout > 0 else None,
    )
