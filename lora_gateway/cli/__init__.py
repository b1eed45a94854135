"""The `lora-gateway` command.

    lora-gateway serve --config gateway.yaml --model ./tiny --store file:///var/adapters
    lora-gateway generate --adapter support@prod --prompt "hello" --max-tokens 32 [--json]
    lora-gateway adapter upload --name support --alias canary ./my-adapter
    lora-gateway adapter list | show | alias | share | unshare | compose | pin | unpin |
                         prefetch | revoke
    lora-gateway residency
    lora-gateway store repair-shares --config gateway.yaml
    lora-gateway store sweep --config gateway.yaml [--dry-run] [--min-age S] [--tenant T]
    lora-gateway dev make-model | make-adapter | hash-key | new-key
    lora-gateway demo

One module per job: `main.py` (parser and dispatch), `serve.py` (`serve`: one flag per
`Settings` field, help from its docstring; flags win over the environment, which wins over the
file; invalid settings exit 2), `generate.py` (`generate`: one flag per `GenerateOptions` field,
derived the same way), `adapters.py` (`adapter ...`, `residency`), `store.py` (`store ...`),
`dev.py` (`dev ...`, `demo`), `connect.py` (the client flags), `format.py` (tables, text and
JSON of the SDK's result types; never protobuf), `exits.py` (exit codes).

Client commands take `--target HOST:PORT` and `--api-key KEY`. Their defaults come from
LORA_GATEWAY_TARGET and LORA_GATEWAY_API_KEY: the only environment variables read outside
`config.py`, through the `environ` mapping given to `main` (`os.environ` when None). API keys and
prompts are never logged or echoed.

Exit codes: 0 success; 1 other failure; 2 usage or invalid settings; 3 INVALID_ARGUMENT;
4 NOT_FOUND; 5 UNAUTHENTICATED; 6 PERMISSION_DENIED; 7 RESOURCE_EXHAUSTED; 8 FAILED_PRECONDITION;
9 UNAVAILABLE; 10 DATA_LOSS; 11 DEADLINE_EXCEEDED; 12 ABORTED (also a generation that ended with
finish_reason "abort"); 130 interrupted. An error prints `error: <CODE>: <message>` on stderr.
"""

from lora_gateway.cli.exits import EXIT_CODES, exit_code
from lora_gateway.cli.main import build_parser, main

__all__ = ["EXIT_CODES", "build_parser", "exit_code", "main"]
