"""What the gateway needs from an inference engine, and the plain types it speaks.

Everything above this layer (residency, services, server) codes against `Engine`; only
`engine/vllm_engine.py` knows vLLM. Types here are plain dataclasses, never protobuf.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"


@dataclass(frozen=True)
class OutputConstraint:
    """Structured output: exactly one of a JSON schema (JSON text), a regex, a list of choices,
    a grammar (EBNF/GBNF or Lark, as vLLM's backends take it) or "any JSON object". Checked
    against the structured-output limits (`lora_gateway.structured`) before it gets here."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    #: JSON only (json_schema, json_object): no whitespace between JSON tokens.
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        kinds = [
            self.json_schema is not None,
            self.regex is not None,
            self.choice is not None,
            self.grammar is not None,
            self.json_object,
        ]
        if sum(kinds) != 1:
            raise ValueError("an output constraint is exactly one of its kinds")

    @property
    def kind(self) -> str:
        """json_schema, regex, choice, grammar or json_object."""
        if self.json_schema is not None:
            return "json_schema"
        if self.regex is not None:
            return "regex"
        if self.choice is not None:
            return "choice"
        if self.grammar is not None:
            return "grammar"
        return "json_object"


@dataclass(frozen=True)
class GenerateParams:
    """Sampling parameters, validated by the services layer before they get here."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    #: Constrain the output (structured output); None: free text.
    structured: OutputConstraint | None = None
    #: Per generated token, its logprob and this many top alternatives; None: no logprobs.
    logprobs: int | None = None
    #: Per prompt token, its logprob and this many top alternatives; None: none.
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text or token ids."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    #: Prefix-cache salt: requests reuse cached KV blocks only of requests with the same salt
    #: (the gateway sets one per tenant; None: shared with every unsalted request).
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("a prompt is exactly one of text or token_ids")


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter version as the engine knows it."""

    #: Engine id, assigned once per version by residency and never reused in a process.
    lora_int_id: int
    #: Includes the sha256 so that anything the engine keys by name (prefix cache) is per-version.
    lora_name: str
    #: Local directory holding adapter_config.json and adapter_model.safetensors.
    path: Path


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position: its id, log-probability and text."""

    token_id: int
    logprob: float
    token: str


@dataclass(frozen=True)
class TokenLogprob:
    """A token of the prompt or the output: its own log-probability (None for the first prompt
    token, which has no context) and the `top` most likely tokens at its position, best first.
    Log-probabilities are the model's (log-softmax of the logits), before temperature and
    penalties; with an output constraint, after the grammar's mask."""

    token_id: int
    logprob: float | None
    token: str
    top: tuple[TopLogprob, ...] = ()


@dataclass
class TokenChunk:
    """One streamed delta. The last one has `finish_reason` set."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: One entry per token of `token_ids` when logprobs were asked for.
    logprobs: list[TokenLogprob] | None = None
    #: Every prompt token, on the first chunk only, when prompt logprobs were asked for.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    """What chat rendering needs from the engine's tokenizer."""

    #: The base model's chat template (Jinja), None when its tokenizer has none.
    chat_template: str | None
    #: Special tokens by role (bos_token, eos_token, ...), passed to the template.
    special_tokens: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """The gateway's view of an engine. Errors raised are `lora_gateway.errors` types."""

    #: Engine adapter slots usable by requests at once (GPU slots).
    max_loras: int
    #: Adapters the engine keeps loaded (CPU cache), the residency capacity.
    max_cpu_loras: int
    #: Longest sequence (prompt + output) in tokens.
    max_model_len: int

    def generate(
        self,
        request_id: str,
        prompt: Prompt,
        params: GenerateParams,
        adapter: LoadedAdapter | None,
    ) -> AsyncIterator[TokenChunk]:
        """Stream deltas. Cancelling the iteration aborts the request in the engine."""
        ...

    async def abort(self, request_ids: Sequence[str]) -> None: ...

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as `generate` tokenizes a text prompt (add_special_tokens) or
        as a rendered chat is tokenized (without: the template writes its own)."""
        ...

    def tokenizer_info(self) -> TokenizerInfo: ...

    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        """Load an adapter. Raises ResourceExhausted beyond `max_cpu_loras`."""
        ...

    async def remove_adapter(self, lora_int_id: int) -> int:
        """Abort the adapter's in-flight requests, then unload it; returns the aborted count."""
        ...

    async def list_adapters(self) -> set[int]: ...

    async def check_health(self) -> None:
        """Raise `errors.EngineDead` or `errors.Unavailable` if the engine cannot serve."""
        ...

    async def shutdown(self) -> None: ...


_lora_ids = itertools.count(1)


def next_lora_id() -> int:
    """A fresh engine adapter id. Ids are never reused within a process (DESIGN invariant 2)."""
    return next(_lora_ids)
