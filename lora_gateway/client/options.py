"""`GenerateOptions`: how a completion is generated, one type for both clients and the CLI.

    client.generate("support@prod", "Hello", GenerateOptions(max_tokens=32, temperature=0.7))

Each field is one option and is written once, here: its type, its default, its constraints
(`Field(...)`, checked when the options are made, before anything is sent) and the docstring
under it, which is also the help text of the `lora-gateway generate` flag derived from it
(`max_tokens` -> `--max-tokens`). The protobuf request is filled from the fields by name (see
`_convert.py`). Adding an option is adding a field here and its protobuf field; no signature,
flag or request builder spells the options out again. The output options (structured output:
`json_schema`, `regex`, `choice`, `grammar`, `json_object`, `disable_any_whitespace`; and
`logprobs`, `prompt_logprobs`) are fields like the others: the constraint's go into
`SamplingParams.constraint`, the rest into `SamplingParams` by name. The prompt (text, token ids,
or a chat conversation: a sequence of `ChatMessage`) is not an option: it is the call's own
argument (`Prompt`).

An option left None is left unset in the request, so the server's default applies.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Final

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic import model_validator as _model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass
from pydantic.fields import FieldInfo

from lora_gateway.errors import InvalidArgument

__all__ = ["ChatMessage", "GenerateOptions", "OptionSpec", "Prompt", "option_specs"]

_U32: Final = 2**32 - 1
_U64: Final = 2**64 - 1
#: The documented limits of the API (inference.proto, SamplingParams).
MAX_STOP: Final = 8
MAX_STOP_CHARS: Final = 128
MAX_STOP_TOKEN_IDS: Final = 64


def _as_tuple(value: object) -> object:
    """A single string is one item; any other sequence becomes a tuple (hashable, immutable)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


_Items = (BeforeValidator(_as_tuple), AfterValidator(tuple))
_StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
_TokenId = Annotated[int, Field(ge=0, le=_U32)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
#: The most alternatives per token a server allows by default (Settings.max_logprobs may differ).
_LOGPROBS = Annotated[int, Field(ge=0, le=1024)]
#: The kinds of output constraint; at most one per call.
CONSTRAINT_KINDS: Final = ("json_schema", "regex", "choice", "grammar", "json_object")


def _schema_text(value: object) -> object:
    """A JSON schema given as a dict is sent as its JSON text."""
    if isinstance(value, dict):
        return json.dumps(value)
    return value


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: role "system", "user" or "assistant", and its text."""

    role: str
    content: str


#: A prompt: text, or a conversation (rendered with the model's chat template by the server).
Prompt = str | Sequence[ChatMessage]


@_pydantic_dataclass(
    frozen=True,
    kw_only=True,
    config=ConfigDict(
        strict=True,  # no silent coercion: True is not 1, "0.5" is not 0.5
        allow_inf_nan=False,
        extra="forbid",
        use_attribute_docstrings=True,
    ),
)
class GenerateOptions:
    """Sampling and output options of one Generate or GenerateStream call (all optional).

    Immutable and validated when made: a bad value raises `errors.InvalidArgument` naming the
    option. `dataclasses.replace(options, temperature=0.2)` makes a changed copy.
    """

    # --- length -------------------------------------------------------------------------------
    max_tokens: Annotated[int, Field(ge=0, le=_U32)] = 0
    """Tokens to generate at most; 0 means the server's default. Capped per tenant."""
    min_tokens: Annotated[int, Field(ge=0, le=_U32)] = 0
    """Tokens to generate before end-of-sequence or a stop may end the output."""
    ignore_eos: bool = False
    """Keep generating after the end-of-sequence token."""
    stop: Annotated[Sequence[_StopString], Field(max_length=MAX_STOP), *_Items] = ()
    """Stop string, not included in the output (at most 8, each at most 128 characters)."""
    stop_token_ids: Annotated[
        Sequence[_TokenId], Field(max_length=MAX_STOP_TOKEN_IDS), *_Items
    ] = ()
    """Token id that ends the output (at most 64)."""

    # --- sampling -----------------------------------------------------------------------------
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    """Sampling temperature in [0, 2]; 0 is greedy (the server's default)."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in
    (0, 1]; unset is 1."""
    top_k: Annotated[int, Field(ge=0, le=_U32)] | None = None
    """Sample among the k most likely tokens; unset or 0 disables it."""
    seed: Annotated[int, Field(ge=0, le=_U64)] | None = None
    """Seed for reproducible sampling."""
    presence_penalty: _Penalty | None = None
    """Penalty for tokens already present in the output, in [-2, 2] (as in vLLM)."""
    frequency_penalty: _Penalty | None = None
    """Penalty growing with how often a token appeared in the output, in [-2, 2]."""
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    """Penalty for tokens of the prompt and output, in (0, 2]; 1 is none."""

    # --- output: structured output (at most one kind) and logprobs -------------------------
    json_schema: Annotated[str, BeforeValidator(_schema_text), Field(min_length=1)] | None = None
    """Constrain the output to this JSON schema (JSON text; a dict is sent as its JSON)."""
    regex: Annotated[str, Field(min_length=1)] | None = None
    """Constrain the output to match this regular expression as a whole."""
    choice: Annotated[Sequence[str], *_Items] = ()
    """Constrain the output to exactly one of these strings."""
    grammar: Annotated[str, Field(min_length=1)] | None = None
    """Constrain the output to this grammar (EBNF/GBNF `root ::= ...`, or Lark)."""
    json_object: bool = False
    """Constrain the output to any JSON object."""
    disable_any_whitespace: bool = False
    """JSON constraints only: no whitespace between JSON tokens (compact output)."""
    logprobs: _LOGPROBS | None = None
    """Return each generated token's logprob and this many top alternatives (0: its own)."""
    prompt_logprobs: _LOGPROBS | None = None
    """Return each prompt token's logprob and this many top alternatives."""

    @_model_validator(mode="wrap")
    @classmethod
    def _validate(cls, values: Any, handler: Any) -> Any:
        """Each field, then the checks across fields; every problem is one `InvalidArgument`
        that names each option concerned."""
        try:
            options = handler(values)
        except ValidationError as exc:
            raise InvalidArgument(f"invalid generate options: {_explain(exc)}") from None
        if options.max_tokens and options.min_tokens > options.max_tokens:
            raise InvalidArgument(
                f"invalid generate options: min_tokens ({options.min_tokens}) must be <= "
                f"max_tokens ({options.max_tokens})"
            )
        kinds = [k for k in CONSTRAINT_KINDS if getattr(options, k) not in (None, (), False)]
        if len(kinds) > 1:
            raise InvalidArgument(
                f"invalid generate options: at most one output constraint, got {', '.join(kinds)}"
            )
        if options.disable_any_whitespace and kinds not in (["json_schema"], ["json_object"]):
            raise InvalidArgument(
                "invalid generate options: disable_any_whitespace needs json_schema or json_object"
            )
        return options


def _explain(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        fields = [str(part) for part in error["loc"] if isinstance(part, str)]
        if fields:
            problems.append(f"{fields[0]}: {message} (got {repr(error.get('input'))[:60]})")
        else:
            problems.append(message)
    return "; ".join(problems)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option as a front end (the CLI) needs it: derived from `GenerateOptions`' fields."""

    name: str
    #: The field's docstring, on one line.
    doc: str
    #: The value's type, or each item's when `repeated`: bool, int, float or str.
    type: type
    repeated: bool
    default: object


@functools.cache
def option_specs() -> tuple[OptionSpec, ...]:
    """Every field of `GenerateOptions`, in definition order."""
    hints = typing.get_type_hints(GenerateOptions)
    infos: dict[str, FieldInfo] = getattr(GenerateOptions, "__pydantic_fields__")  # noqa: B009
    specs = []
    for f in dataclasses.fields(GenerateOptions):
        kind, repeated = _value_type(hints[f.name])
        doc = " ".join((infos[f.name].description or f.name.replace("_", " ")).split())
        specs.append(OptionSpec(f.name, doc, kind, repeated, f.default))
    return tuple(specs)


def _value_type(hint: Any) -> tuple[type, bool]:
    """`int | None` -> (int, False); `Sequence[str]` -> (str, True)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (Sequence, tuple, list):
        return _value_type(args[0])[0], True
    if args:  # an Optional
        return _value_type(args[0])
    if hint in (bool, int, float, str):
        return typing.cast(type, hint), False
    raise TypeError(f"GenerateOptions: no front-end type for {hint!r}")
