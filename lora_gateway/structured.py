"""Limits on structured-output constraints, checked before anything reaches the engine.

vLLM parses a constraint on its event loop when the request is submitted (xgrammar converts a
JSON schema or a regex into a grammar there) and compiles it against the vocabulary in the
engine core, in one thread shared by every constrained request. A constraint that is too big or
too complex would stall both, so each one is measured here first and refused with
INVALID_ARGUMENT, naming the limit (Settings `structured_max_*`):

- JSON schema: UTF-8 bytes of its text, nesting depth of the document, `properties` declared
  and `enum` values listed over the whole schema, the length of each `pattern` (and
  `patternProperties` key), and a budget of counted repetitions;
- regex: length, and the same repetition budget;
- choice: number of strings, the length of each, bytes together;
- grammar: bytes (xgrammar expands nothing in a grammar: a chain of rules `{1,1000}` each
  compiled in 16 ms here).

The repetition budget (`repetition_cost`): a counted repetition `{n}`, `{n,m}`, `{n,}` costs its
bound times the bounds of the groups around it, and the costs of a request add up. xgrammar
unrolls bounded repetitions of a schema's `pattern`: `(a{1,100}){1,100}` (cost 10,100) took
0.10 s to parse, `(.{1,1000}){1,1000}` (1,001,000) 0.38 s, on the event loop.

Only the shape is checked here; whether a schema means something is vLLM's business (xgrammar
refuses what it cannot compile, answered as INVALID_ARGUMENT too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lora_gateway.config import Settings
from lora_gateway.engine.base import OutputConstraint
from lora_gateway.errors import InvalidArgument

__all__ = ["StructuredLimits", "check_constraint", "repetition_cost"]

_COUNTED = re.compile(r"\{(\d{1,9})(,(\d{0,9}))?\}")


@dataclass(frozen=True)
class StructuredLimits:
    max_schema_bytes: int = 32 << 10
    max_depth: int = 32
    max_properties: int = 256
    max_enum_values: int = 256
    max_regex_chars: int = 1024
    max_repeat: int = 4096
    max_grammar_bytes: int = 32 << 10

    @classmethod
    def of(cls, settings: Settings) -> StructuredLimits:
        return cls(
            max_schema_bytes=settings.structured_max_schema_bytes,
            max_depth=settings.structured_max_schema_depth,
            max_properties=settings.structured_max_schema_properties,
            max_enum_values=settings.structured_max_enum_values,
            max_regex_chars=settings.structured_max_regex_chars,
            max_repeat=settings.structured_max_repeat,
            max_grammar_bytes=settings.structured_max_grammar_bytes,
        )


def repetition_cost(pattern: str) -> int:
    """The counted repetitions of a regex: each bound times the bounds of the groups around
    it, added up (`(a{1,100}){1,100}` costs 100 * 100 + 100). `*`, `+` and `?` cost nothing
    (xgrammar loops over them); a `{` that is not a counted repetition is a literal."""
    # Each open group: the cost of what it holds so far. A closed group or an atom waits in
    # `last` for a quantifier that may follow it.
    groups: list[int] = [0]
    last = 0  # inner cost of the item just read (0 for a plain atom)
    i, size = 0, len(pattern)
    while i < size:
        char = pattern[i]
        if char == "\\":
            last, i = 0, i + 2
            continue
        if char == "[":
            i = _class_end(pattern, i)
            last = 0
            continue
        if char == "(":
            groups.append(0)
            i += 1
            continue
        if char == ")":
            inner = groups.pop() if len(groups) > 1 else 0
            groups[-1] += inner
            last = inner
            i += 1
            continue
        counted = _COUNTED.match(pattern, i) if char == "{" else None
        if counted is not None:
            low = int(counted.group(1))
            high = counted.group(3)
            bound = max(low, int(high) if high else low, 1)
            # The item's inner cost was added once already; it now repeats `bound` times.
            groups[-1] += last * (bound - 1) + bound
            last = last * bound + bound
            i = counted.end()
            continue
        last = 0
        i += 1
    return sum(groups)


def _class_end(pattern: str, start: int) -> int:
    """The index after the character class opening at `start` (or the end of the text)."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


@dataclass
class _Budget:
    limits: StructuredLimits
    repeat: int = 0
    properties: int = 0
    enum_values: int = 0

    def regex(self, what: str, pattern: str) -> None:
        if len(pattern) > self.limits.max_regex_chars:
            raise InvalidArgument(
                f"{what}: {len(pattern)} characters, more than the limit of "
                f"{self.limits.max_regex_chars} (structured_max_regex_chars)"
            )
        self.repeat += repetition_cost(pattern)
        if self.repeat > self.limits.max_repeat:
            raise InvalidArgument(
                f"{what}: counted repetitions ({{n,m}}) cost {self.repeat}, more than the limit "
                f"of {self.limits.max_repeat} (structured_max_repeat: each bound times the "
                "bounds around it, added over the request)"
            )


def _check_schema(text: str, limits: StructuredLimits) -> None:
    size = len(text.encode("utf-8"))
    if size > limits.max_schema_bytes:
        raise InvalidArgument(
            f"json_schema: {size} bytes, more than the limit of {limits.max_schema_bytes} "
            "(structured_max_schema_bytes)"
        )
    try:
        schema = json.loads(text)
    except RecursionError:
        raise InvalidArgument(
            f"json_schema: nested more than {limits.max_depth} levels deep "
            "(structured_max_schema_depth)"
        ) from None
    except ValueError as exc:
        raise InvalidArgument(f"json_schema: not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument("json_schema: a JSON schema is a JSON object")
    budget = _Budget(limits)
    # Iterative walk: (value, depth). Depth counts objects and arrays.
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limits.max_depth:
            raise InvalidArgument(
                f"json_schema: nested more than {limits.max_depth} levels deep "
                "(structured_max_schema_depth)"
            )
        if isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
            continue
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            if key == "properties" and isinstance(item, dict):
                budget.properties += len(item)
                if budget.properties > limits.max_properties:
                    raise InvalidArgument(
                        f"json_schema: more than {limits.max_properties} properties "
                        "(structured_max_schema_properties, counted over the whole schema)"
                    )
            elif key == "enum" and isinstance(item, list):
                budget.enum_values += len(item)
            elif key == "const":
                budget.enum_values += 1
            elif key == "pattern" and isinstance(item, str):
                budget.regex("json_schema: pattern", item)
            elif key == "patternProperties" and isinstance(item, dict):
                for name in item:
                    budget.regex("json_schema: patternProperties", str(name))
            if budget.enum_values > limits.max_enum_values:
                raise InvalidArgument(
                    f"json_schema: more than {limits.max_enum_values} enum/const values "
                    "(structured_max_enum_values, counted over the whole schema)"
                )
            if isinstance(item, dict | list):
                stack.append((item, depth + 1))


def check_constraint(constraint: OutputConstraint, limits: StructuredLimits) -> OutputConstraint:
    """`constraint` if it is within `limits`; InvalidArgument naming the limit otherwise."""
    if constraint.json_schema is not None:
        if not constraint.json_schema.strip():
            raise InvalidArgument("json_schema: empty")
        _check_schema(constraint.json_schema, limits)
    elif constraint.regex is not None:
        if "\x00" in constraint.regex:
            raise InvalidArgument("regex: must not contain a NUL character")
        _Budget(limits).regex("regex", constraint.regex)
    elif constraint.choice is not None:
        choices = constraint.choice
        if not choices:
            raise InvalidArgument("choice: at least one string")
        if len(choices) > limits.max_enum_values:
            raise InvalidArgument(
                f"choice: {len(choices)} strings, more than the limit of "
                f"{limits.max_enum_values} (structured_max_enum_values)"
            )
        if any(not c or len(c) > limits.max_regex_chars for c in choices):
            raise InvalidArgument(
                f"choice: each string must be 1..{limits.max_regex_chars} characters "
                "(structured_max_regex_chars)"
            )
        total = sum(len(c.encode("utf-8")) for c in choices)
        if total > limits.max_schema_bytes:
            raise InvalidArgument(
                f"choice: {total} bytes together, more than the limit of "
                f"{limits.max_schema_bytes} (structured_max_schema_bytes)"
            )
    elif constraint.grammar is not None:
        size = len(constraint.grammar.encode("utf-8"))
        if not constraint.grammar.strip():
            raise InvalidArgument("grammar: empty")
        if size > limits.max_grammar_bytes:
            raise InvalidArgument(
                f"grammar: {size} bytes, more than the limit of {limits.max_grammar_bytes} "
                "(structured_max_grammar_bytes)"
            )
        if "\x00" in constraint.grammar:
            raise InvalidArgument("grammar: must not contain a NUL character")
    if constraint.disable_any_whitespace and constraint.kind not in ("json_schema", "json_object"):
        raise InvalidArgument("disable_any_whitespace applies to JSON constraints only")
    return constraint
