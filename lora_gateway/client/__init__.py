"""Python SDK for lora-gateway: a blocking `GatewayClient` and an asyncio `AsyncGatewayClient`.

    from lora_gateway.client import GatewayClient, GenerateOptions

    with GatewayClient("gateway:50051", api_key) as client:
        result = client.generate("support@prod", "hello", GenerateOptions(max_tokens=32))
        print(result.text, result.adapter)

    async with AsyncGatewayClient("gateway:50051", api_key) as client:
        async for delta in client.generate_stream("acme/support", "hello"):
            print(delta.text, end="")
        page = await client.list_adapters()          # an AdapterPage of Adapter

Both clients have the same methods and share everything but the call itself (one blocks, one
awaits): the options type, request building and result conversion, metadata, the upload reader,
the retry policy and the error mapping live once, in this package's modules:

    options.py     GenerateOptions: every sampling and output option, validated; the CLI's
                   `generate` flags are derived from it
    results.py     what calls return: frozen dataclasses (GenerateResult, Adapter, Residency, ...)
    _convert.py    protobuf <-> those types, in one place
    _rpcs.py       each RPC once: arguments checked, request built, answer read
    _transport.py  channel, credentials, metadata, one deadline per call, retries
    _errors.py     a failed call as the `lora_gateway.errors` class of its status code
    _upload.py     an adapter folder as an UploadAdapter stream
    _sync.py       GatewayClient;   _aio.py   AsyncGatewayClient

Metadata: `authorization: Bearer <api key>`; `x-lora-adapter: <owner/name>` (`ROUTING_HEADER`)
on Generate, GenerateStream, Pin, Unpin and Prefetch, for consistent-hash routing by a front proxy
(a hint only: the server resolves and authorizes the reference from the request body);
`x-request-id` when a `request_id` is given.

Errors: every failure raises the `lora_gateway.errors` class of its status code with the
server's message (`errors.NotFound("adapter not found")`); the exception's `code` is the status
code received. Codes with no class of their own (UNKNOWN, UNIMPLEMENTED, ...) raise the base
`GatewayError`; CANCELLED raises `errors.Aborted`. Invalid arguments detected before anything is
sent (a bad option, page size or adapter folder) raise `errors.InvalidArgument`. A refusal by a
rate limit (RESOURCE_EXHAUSTED) carries the server's `retry-after` hint as `error.retry_after_s`
(seconds; None when the server sent none).

Retries: only UNAVAILABLE is retried, at most `max_retries` times, with exponential backoff and
jitter, within the call's deadline (the deadline covers all attempts). Every admin RPC is safe
to repeat: versions are content-addressed (a repeated upload or compose yields the same
version), share/unshare/pin/revoke and set_retention are idempotent. An upload is retried from
the start, re-reading the files. A stream is retried only until its first message arrives; after
that an UNAVAILABLE is raised, since the tokens already delivered cannot be taken back.
"""

from lora_gateway.client._aio import AsyncGatewayClient
from lora_gateway.client._sync import GatewayClient
from lora_gateway.client._transport import ROUTING_HEADER
from lora_gateway.client.options import ChatMessage, GenerateOptions, Prompt
from lora_gateway.client.results import (
    Adapter,
    AdapterFile,
    AdapterPage,
    AdapterStatus,
    AdapterVersion,
    ComposePart,
    Evaluation,
    EvaluationCase,
    Evaluations,
    EvaluationSetInfo,
    GenerateResult,
    Residency,
    ResidencyEntry,
    ResidencyTier,
    RetentionResult,
    RevokeResult,
    Rollback,
    RollbackPolicy,
    ServedAdapter,
    StreamDelta,
    TenantUsage,
    TokenizeResult,
    TokenLogprob,
    TopLogprob,
    VersionServing,
)

__all__ = [
    "ROUTING_HEADER",
    "Adapter",
    "AdapterFile",
    "AdapterPage",
    "AdapterStatus",
    "AdapterVersion",
    "AsyncGatewayClient",
    "ChatMessage",
    "ComposePart",
    "Evaluation",
    "EvaluationCase",
    "EvaluationSetInfo",
    "Evaluations",
    "GatewayClient",
    "GenerateOptions",
    "GenerateResult",
    "Prompt",
    "Residency",
    "ResidencyEntry",
    "ResidencyTier",
    "RetentionResult",
    "RevokeResult",
    "Rollback",
    "RollbackPolicy",
    "ServedAdapter",
    "StreamDelta",
    "TenantUsage",
    "TokenLogprob",
    "TokenizeResult",
    "TopLogprob",
    "VersionServing",
]
