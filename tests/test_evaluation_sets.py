"""Evaluation sets parsed alone (lora_gateway.evaluation.parse_set): the canonical bytes that
name a set, and the time limit of schema patterns. The gateway runs them end to end in
tests/api/test_evaluations.py."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import pytest

from lora_gateway import errors
from lora_gateway.config import Settings
from lora_gateway.evaluation import _pattern, parse_set

CASE = {"id": "a", "prompt": "hi", "check": {"exact": "x"}}


def test_the_canonical_form_names_the_set() -> None:
    settings = Settings()
    one = parse_set(json.dumps({"cases": [CASE]}), settings)
    spaced = json.dumps({"cases": [dict(reversed(list(CASE.items())))]}, indent=4)
    assert parse_set(spaced, settings).canonical == one.canonical
    # The stored form states the default max_tokens, so a later default cannot change a set.
    assert json.loads(one.canonical) == {"cases": [{**CASE, "max_tokens": 16}]}
    assert parse_set(one.canonical, settings).canonical == one.canonical
    other = parse_set(json.dumps({"cases": [{**CASE, "prompt": "ho"}]}), settings)
    assert hashlib.sha256(other.canonical).digest() != hashlib.sha256(one.canonical).digest()


def test_limits_come_from_the_settings() -> None:
    tight = Settings(evaluation_max_cases=1, evaluation_max_case_tokens=4)
    two = {"cases": [CASE, {**CASE, "id": "b"}]}
    with pytest.raises(errors.InvalidArgument, match="1 to 1 cases"):
        parse_set(json.dumps(two), tight)
    with pytest.raises(errors.InvalidArgument, match="more than 4"):
        parse_set(json.dumps({"cases": [{**CASE, "max_tokens": 5}]}), tight)


def test_schema_patterns_match_with_a_time_limit() -> None:
    schema = {"type": "string", "pattern": "(a|aa)+$"}
    checker = jsonschema.validators.extend(
        jsonschema.validators.validator_for(schema), {"pattern": _pattern}
    )(schema)
    problems = [e.message for e in checker.iter_errors("a" * 60 + "b")]
    assert problems == ["pattern '(a|aa)+$': match timed out"]
    assert list(checker.iter_errors("aaaa")) == []
