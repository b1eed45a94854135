"""Chat conversations rendered with a chat template: sandboxed, bounded, off the event loop.

A template is compiled as transformers compiles it (`apply_chat_template`): jinja2's
`ImmutableSandboxedEnvironment` with `trim_blocks`, `lstrip_blocks` and the `loopcontrols`
extension, the `tojson` filter without HTML escaping, the `raise_exception` and `strftime_now`
globals, and `{% generation %}` blocks accepted (rendered as their content). It renders with the
same variables: `messages`, `add_generation_prompt`, `tools` and `documents` (None), and the
tokenizer's special tokens (`bos_token`, `eos_token`, ...). Its output is tokenized without
adding special tokens (the template writes its own), as transformers does.

A template may come from a place the operator does not control (an adapter's upload, later), so
rendering is bounded, not only sandboxed:

- a template is at most `chat_template_max_bytes`; compiled ones are cached by their text;
- rendering runs in a thread of its own pool, never on the event loop, and a trace function
  checks the deadline (`chat_render_timeout_s`) at every line the render runs, in the
  template's code and in jinja's (a loop nested ten deep stops at the deadline);
- values cannot grow past `chat_max_prompt_chars` by the operations that make them big in one
  step: `*`, `**`, `%` and `+` are intercepted, string methods and filters with a width or a
  replacement are checked before they run, and every call's result, every namespace
  assignment and the output as it streams are measured;
- whatever goes wrong is INVALID_ARGUMENT with the reason (the template's own
  `raise_exception` message included, as for "roles must alternate").

`ChatTemplates.render` takes an optional template: None means the base model's. An adapter
version's own template (its upload's `chat_template.jinja`) plugs in there, with the version as
its `scope`: compiled templates are cached per scope, so identical template text of two tenants
never shares a cache entry (nor its timing). `ChatTemplates.check_upload` is the upload's check
of such a template: it compiles in this sandbox and renders `SAMPLE_CONVERSATION` within the same
bounds, or the upload is refused (INVALID_ARGUMENT with the reason) and nothing is stored.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from adapter_store.errors import InvalidAdapter
from adapter_store.model import CHAT_TEMPLATE_FILE
from lora_gateway.config import Settings
from lora_gateway.engine.base import TokenizerInfo
from lora_gateway.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "ROLES",
    "SAMPLE_CONVERSATION",
    "ChatLimits",
    "ChatMessage",
    "ChatTemplates",
    "check_messages",
]

#: Roles a message may have.
ROLES = ("system", "user", "assistant")
#: Compiled templates kept (the base model's and adapter versions' own).
_CACHE_SIZE = 32
#: Largest width a template may ask of `%` formatting or `str.format` (`%99999s`).
_MAX_WIDTH = 9999
_WIDE_PERCENT = re.compile(r"%[#0\- +]*(\*|\d{5,}|\.\*|\.\d{5,})")
_WIDE_FORMAT = re.compile(r"\{[^{}]*:[^{}]*(\d{5,}|\{)")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


#: What an uploaded chat template must render (with `add_generation_prompt`) to be accepted:
#: user and assistant turns that alternate, the conversation every template takes (a system
#: message is left out: some real templates refuse one with `raise_exception`).
SAMPLE_CONVERSATION = (
    ChatMessage("user", "Hello, who are you?"),
    ChatMessage("assistant", "An assistant."),
    ChatMessage("user", "Say something short."),
)


@dataclass(frozen=True)
class ChatLimits:
    max_messages: int = 512
    max_chars: int = 200_000
    max_template_bytes: int = 64 << 10
    render_timeout_s: float = 1.0

    @classmethod
    def of(cls, settings: Settings) -> ChatLimits:
        return cls(
            max_messages=settings.chat_max_messages,
            max_chars=settings.chat_max_prompt_chars,
            max_template_bytes=settings.chat_template_max_bytes,
            render_timeout_s=settings.chat_render_timeout_s,
        )


def check_messages(messages: Sequence[ChatMessage], limits: ChatLimits) -> tuple[ChatMessage, ...]:
    """The conversation if it has 1..max_messages messages of known roles and at most
    max_chars characters of content; InvalidArgument with the reason otherwise."""
    if not messages:
        raise InvalidArgument("messages: a conversation needs at least one message")
    if len(messages) > limits.max_messages:
        raise InvalidArgument(
            f"messages: {len(messages)} messages, more than the limit of {limits.max_messages} "
            "(chat_max_messages)"
        )
    total = 0
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            shown = message.role if len(message.role) <= 32 else message.role[:32] + "..."
            raise InvalidArgument(
                f"messages[{index}].role: {shown!r} is not one of {', '.join(ROLES)}"
            )
        total += len(message.content)
    if total > limits.max_chars:
        raise InvalidArgument(
            f"messages: {total} characters of content, more than the limit of "
            f"{limits.max_chars} (chat_max_prompt_chars)"
        )
    return tuple(messages)


# --- the bounded sandbox ----------------------------------------------------------------------


class _Stop(BaseException):
    """Rendering stopped by a bound (the message says which). A BaseException, so that no
    `except Exception` in a template's path (jinja's own included) can swallow it."""


def _size(value: object) -> int:
    if isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
        return len(value)
    return 0


def _bounded_namespace(max_chars: int) -> type[Namespace]:
    """`namespace()` whose attributes cannot hold a value past the size bound (a loop that
    doubles `ns.text` would otherwise reach gigabytes in thirty steps)."""

    class namespace(Namespace):
        def __setitem__(self, name: str, value: Any) -> None:
            if _size(value) > max_chars:
                raise _Stop("a value grew past the size limit")
            super().__setitem__(name, value)

    return namespace


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders
    its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: object) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= 16):
        raise _Stop("tojson: indent must be 0..16")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' environment, with the size bounds of the module docstring."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_Generation, jinja2.ext.loopcontrols],
        )
        self.max_chars = max_chars
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            namespace=_bounded_namespace(max_chars),
        )
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["tojson"] = self._bounded_filter("tojson", _tojson)

    # Binary operators that can make a big value in one step.
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limit = self.max_chars
        if operator == "*":
            count, seq = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(count, int) and _size(seq) * max(count, 0) > limit:
                raise _Stop("a value grew past the size limit")
        elif operator == "**":
            if isinstance(right, int) and isinstance(left, int) and right > 64 and abs(left) > 1:
                raise _Stop("an integer power is too large")
        elif operator == "%":
            if isinstance(left, str) and _WIDE_PERCENT.search(left):
                raise _Stop("a format width is too large")
        elif operator == "+" and _size(left) + _size(right) > limit:
            raise _Stop("a value grew past the size limit")
        result = super().call_binop(context, operator, left, right)
        if _size(result) > limit:
            raise _Stop("a value grew past the size limit")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`str.format` / `format_map` (wrapped when the attribute is read): no huge widths."""
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and _WIDE_FORMAT.search(owner):
            raise _Stop("a format width is too large")
        return super().wrap_str_format(value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if any(_size(v) > __self.max_chars for v in (*args, *kwargs.values())):
            raise _Stop("a value grew past the size limit")
        __self._check_call(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if _size(result) > __self.max_chars:
            raise _Stop("a value grew past the size limit")
        return result

    def _check_call(self, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """String methods whose result can be far larger than their inputs, checked first."""
        owner = getattr(obj, "__self__", None)
        if not isinstance(owner, str):
            return
        name = getattr(obj, "__name__", "")
        values = [*args, *kwargs.values()]
        if name in ("center", "ljust", "rjust", "zfill"):
            if any(isinstance(v, int) and v > self.max_chars for v in values):
                raise _Stop(f"str.{name}: the width is past the size limit")
        elif name == "expandtabs":
            if any(isinstance(v, int) and v > 64 for v in values):
                raise _Stop("str.expandtabs: tab size above 64")
        elif name == "replace":
            self._check_replace(owner, args)

    def _check_replace(self, text: str, args: Sequence[Any]) -> None:
        if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            old, new = args[0], args[1]
            hits = len(text) + 1 if not old else text.count(old)
            if len(text) + hits * max(0, len(new) - len(old)) > self.max_chars:
                raise _Stop("replace: the result would be past the size limit")

    def _bounded_filter(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        limit = self.max_chars
        check_replace = self._check_replace

        @functools.wraps(function)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            # The value a filter applies to comes after jinja's context/env argument, if any.
            values = [a for a in args if not isinstance(a, _JINJA_ARGUMENTS)]
            values += list(kwargs.values())
            text = next((v for v in values if isinstance(v, str)), "")
            widths = [v for v in values[1:] if isinstance(v, int) and not isinstance(v, bool)]
            if name == "indent" and any(w * (text.count("\n") + 1) > limit for w in widths):
                raise _Stop("indent: the result would be past the size limit")
            if name in ("center", "wordwrap", "truncate") and any(w > limit for w in widths):
                raise _Stop(f"{name}: the width is past the size limit")
            if name == "format" and isinstance(text, str) and _WIDE_PERCENT.search(text):
                raise _Stop("a format width is too large")
            if name == "replace" and len(values) >= 3:
                check_replace(str(values[0]), values[1:3])
            result = function(*args, **kwargs)
            if _size(result) > limit:
                raise _Stop("a value grew past the size limit")
            return result

        return bounded


#: What jinja passes to a filter before its value (pass_context, pass_environment, ...).
_JINJA_ARGUMENTS = (jinja2.runtime.Context, jinja2.Environment, jinja2.nodes.EvalContext)


class _Deadline:
    """A trace function that stops the thread's Python code at a deadline."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > self.deadline:
            raise _Stop(f"rendering took longer than {self.seconds:g} s (chat_render_timeout_s)")
        return self.trace


def _bounded(seconds: float, work: Callable[[], str]) -> str:
    """Run `work` in this thread under a deadline; restores the previous trace function."""
    previous = sys.gettrace()
    sys.settrace(_Deadline(seconds).trace)
    try:
        return work()
    except _Stop as exc:
        raise InvalidArgument(f"chat template: {exc}") from None
    finally:
        sys.settrace(previous)


# --- templates ----------------------------------------------------------------------------------


class ChatTemplates:
    """Compiles (cached by text) and renders chat templates in a thread pool of its own."""

    def __init__(self, info: TokenizerInfo, limits: ChatLimits, *, threads: int = 2) -> None:
        self.limits = limits
        self.base_template = info.chat_template
        self.special_tokens = dict(info.special_tokens)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="chat-render")
        self._compiled: OrderedDict[tuple[str | None, str], jinja2.Template] = OrderedDict()
        self._lock = threading.Lock()
        #: Why the base model's template cannot be used (None: it can, or there is none).
        self.base_problem: str | None = None

    async def check_base(self) -> None:
        """Compile the base model's template now (start-up); a problem is kept and answered
        to chat requests (FAILED_PRECONDITION), text and token prompts are unaffected."""
        if self.base_template is None:
            return
        try:
            await self._run(functools.partial(self._compile_only, self.base_template))
        except InvalidArgument as exc:
            self.base_problem = str(exc)

    async def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        template: str | None = None,
        scope: str = "",
    ) -> str:
        """The prompt text of `messages` (checked with `check_messages` first), rendered with
        `template`, or with the base model's template when it is None. `scope` names whose
        template it is (an adapter version's owner): its compiled form is cached apart."""
        messages = check_messages(messages, self.limits)
        if template is None:
            scope = ""
            if self.base_template is None:
                raise FailedPrecondition(
                    "the base model has no chat template: send the prompt as text or token_ids"
                )
            if self.base_problem is not None:
                raise FailedPrecondition(
                    f"the base model's chat template cannot be used: {self.base_problem}"
                )
            template = self.base_template
        variables = self._variables(messages, add_generation_prompt)
        return await self._run(functools.partial(self._render, template, variables, scope))

    def check_upload(self, template: str) -> None:
        """An uploaded chat template's check (blocking: the publishing thread runs it): it
        compiles in the sandbox and renders `SAMPLE_CONVERSATION` with `add_generation_prompt`
        to a non-empty prompt, within the same bounds as a request's render (size, time,
        values). InvalidAdapter with the reason otherwise (INVALID_ARGUMENT)."""
        variables = self._variables(SAMPLE_CONVERSATION, True)
        try:
            rendered = _bounded(
                self.limits.render_timeout_s,
                functools.partial(self._render, template, variables, None),
            )
        except InvalidArgument as exc:
            reason = str(exc).removeprefix("chat template: ")
            raise InvalidAdapter(f"{CHAT_TEMPLATE_FILE}: {reason}") from None
        if not rendered.strip():
            raise InvalidAdapter(
                f"{CHAT_TEMPLATE_FILE}: it renders an empty prompt for a sample conversation"
            )

    def _variables(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool
    ) -> dict[str, Any]:
        return {
            **self.special_tokens,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, work: Callable[[], str]) -> str:
        loop = asyncio.get_running_loop()
        bounded = functools.partial(_bounded, self.limits.render_timeout_s, work)
        return await loop.run_in_executor(self._pool, bounded)

    def _compile_only(self, template: str) -> str:
        self._compile(template, "")
        return template

    def _compile(self, template: str, scope: str | None) -> jinja2.Template:
        """The compiled template, cached under (`scope`, its sha256); `scope` None: not cached
        (an upload's check)."""
        key = (scope, hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest())
        with self._lock:
            cached = self._compiled.get(key) if scope is not None else None
            if cached is not None:
                self._compiled.move_to_end(key)
                return cached
        size = len(template.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_template_bytes:
            raise InvalidArgument(
                f"chat template: {size} bytes, more than the limit of "
                f"{self.limits.max_template_bytes} (chat_template_max_bytes)"
            )
        try:
            compiled = _Sandbox(self.limits.max_chars).from_string(template)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidArgument(f"chat template: {exc.message} (line {exc.lineno})") from None
        except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
            raise InvalidArgument(f"chat template does not compile: {type(exc).__name__}") from None
        if scope is None:
            return compiled
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def _render(self, template: str, variables: Mapping[str, Any], scope: str | None) -> str:
        compiled = self._compile(template, scope)
        limit = self.limits.max_chars
        parts: list[str] = []
        size = 0
        try:
            pieces: Iterator[str] = compiled.generate(**variables)
            for piece in pieces:
                size += len(piece)
                if size > limit:
                    raise InvalidArgument(
                        f"the rendered conversation is longer than {limit} characters "
                        "(chat_max_prompt_chars)"
                    )
                parts.append(piece)
        except InvalidArgument:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidArgument(f"chat template: {exc.message or type(exc).__name__}") from None
        except Exception as exc:  # the template's own failure (a TypeError, a RecursionError...)
            raise InvalidArgument(
                f"chat template failed on this conversation ({type(exc).__name__})"
            ) from None
        return "".join(parts)
