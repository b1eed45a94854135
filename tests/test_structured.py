"""Structured-output limits: what is refused, with which setting named, and what passes. No
engine (the engine tests and tests/faults/test_hostile.py send these through it)."""

from __future__ import annotations

import json

import pytest

from lora_gateway import errors
from lora_gateway.config import Settings
from lora_gateway.engine.base import OutputConstraint
from lora_gateway.structured import StructuredLimits, check_constraint, repetition_cost

LIMITS = StructuredLimits.of(Settings())


def schema(value: object) -> OutputConstraint:
    return OutputConstraint(json_schema=json.dumps(value))


def nested(depth: int) -> dict[str, object]:
    """Object schemas `depth` deep: a JSON document 2 * depth - 1 deep."""
    node: dict[str, object] = {"type": "string"}
    for _ in range(depth - 1):
        node = {"type": "object", "properties": {"a": node}}
    return node


def wide(count: int) -> dict[str, object]:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(count)}}


@pytest.mark.parametrize(
    ("pattern", "cost"),
    [
        ("[a-z]+", 0),
        ("a{3}", 3),
        ("[a-z]{1,64}@[a-z]{2,24}", 88),
        ("(a{1,100}){1,100}", 100 * 100 + 100),
        ("((a{1,30}){1,30}){1,30}", (30 * 30 + 30) * 30 + 30),
        (r"\{3}", 0),  # an escaped brace is a literal
        ("[{]{5}", 5),  # a brace inside a class is a literal; the class repeats 5 times
        ("a{", 0),
        ("a{2,}", 2),
    ],
)
def test_repetition_cost(pattern: str, cost: int) -> None:
    assert repetition_cost(pattern) == cost


@pytest.mark.parametrize(
    ("constraint", "reason"),
    [
        (OutputConstraint(json_schema="x" * (33 << 10)), "structured_max_schema_bytes"),
        (OutputConstraint(json_schema="{"), "not valid JSON"),
        (OutputConstraint(json_schema="[]"), "a JSON schema is a JSON object"),
        (OutputConstraint(json_schema=" "), "empty"),
        (schema(nested(17)), "structured_max_schema_depth"),
        (OutputConstraint(json_schema="[" * 20_000 + "]" * 20_000), "schema_bytes|depth"),
        (schema(wide(257)), "structured_max_schema_properties"),
        (schema({"enum": list(range(257))}), "structured_max_enum_values"),
        (schema({"anyOf": [{"const": i} for i in range(257)]}), "structured_max_enum_values"),
        (schema({"type": "string", "pattern": "a" * 1025}), "structured_max_regex_chars"),
        (schema({"type": "string", "pattern": "(.{1,1000}){1,1000}"}), "structured_max_repeat"),
        (
            schema(
                {
                    "type": "object",
                    "properties": {f"p{i}": {"pattern": "[a-z]{1,512}"} for i in range(9)},
                }
            ),
            "structured_max_repeat",
        ),
        (schema({"patternProperties": {"(a{1,100}){1,100}": {}}}), "structured_max_repeat"),
        (OutputConstraint(regex="a" * 1025), "structured_max_regex_chars"),
        (OutputConstraint(regex="(a{1,100}){1,100}"), "structured_max_repeat"),
        (OutputConstraint(regex="a\x00b"), "NUL"),
        (OutputConstraint(choice=()), "at least one"),
        (OutputConstraint(choice=tuple(str(i) for i in range(257))), "structured_max_enum_values"),
        (OutputConstraint(choice=("ok", "")), "structured_max_regex_chars"),
        (OutputConstraint(choice=("x" * 1025,)), "structured_max_regex_chars"),
        (OutputConstraint(choice=tuple("x" * 1000 for _ in range(40))), "schema_bytes"),
        (OutputConstraint(grammar="root ::= " + '"a" ' * 9000), "structured_max_grammar_bytes"),
        (OutputConstraint(grammar="  "), "empty"),
        (OutputConstraint(regex="a+", disable_any_whitespace=True), "JSON constraints only"),
    ],
)
def test_over_the_limits_is_invalid_argument_naming_the_limit(
    constraint: OutputConstraint, reason: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=reason):
        check_constraint(constraint, LIMITS)


@pytest.mark.parametrize(
    "constraint",
    [
        schema(nested(16)),
        schema(wide(256)),
        schema({"enum": list(range(256))}),
        schema({"type": "string", "pattern": "a" * 1024}),
        schema({"type": "string", "pattern": "(a{1,60}){1,60}"}),  # cost 3,660
        schema({"properties": {"properties": {"type": "string"}}}),  # a property so named
        OutputConstraint(regex="[a-z]{1,64}@[a-z]{2,24}"),
        OutputConstraint(choice=tuple(str(i) for i in range(256))),
        OutputConstraint(grammar='root ::= "a" ("b" | "c"){1,1000}'),
        OutputConstraint(json_object=True, disable_any_whitespace=True),
    ],
)
def test_at_the_limits_passes(constraint: OutputConstraint) -> None:
    assert check_constraint(constraint, LIMITS) is constraint


def test_limits_follow_the_settings() -> None:
    tight = StructuredLimits.of(
        Settings(structured_max_schema_depth=2, structured_max_regex_chars=3)
    )
    with pytest.raises(errors.InvalidArgument, match="2 levels"):
        check_constraint(schema(nested(2)), tight)
    with pytest.raises(errors.InvalidArgument, match="limit of 3"):
        check_constraint(OutputConstraint(regex="abcd"), tight)


def test_a_constraint_is_exactly_one_kind() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        OutputConstraint()
    with pytest.raises(ValueError, match="exactly one"):
        OutputConstraint(regex="a", grammar="root ::= 'a'")
