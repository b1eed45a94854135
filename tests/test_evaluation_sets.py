"""Evaluation sets parsed alone (lora_gateway.evaluation.parse_set): the canonical bytes that
name a set, the time limit of schema patterns, and how evaluations share their slots (a fake
gateway: a unit test of the policy). The gateway runs them end to end in
tests/api/test_evaluations.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest

from lora_gateway import errors
from lora_gateway.config import Settings
from lora_gateway.evaluation import Evaluator, _pattern, parse_set
from lora_gateway.tenancy import Principal, Role

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


class _HeldGateway:
    """Just what `Evaluator` uses of a gateway: every generation waits for `release`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = object()
        self.store = SimpleNamespace(spec=SimpleNamespace(name="base"))
        self.release = asyncio.Event()

    async def generate(self, principal: Principal, call: Any) -> AsyncIterator[tuple[Any, Any]]:
        await self.release.wait()
        yield None, SimpleNamespace(text="x")


async def test_evaluation_slots_are_shared_fairly_between_tenants() -> None:
    gateway = _HeldGateway(Settings(evaluation_max_concurrent=4))
    evaluator = Evaluator(gateway)  # type: ignore[arg-type]
    cases = parse_set(json.dumps({"cases": [CASE]}), gateway.settings)
    version = SimpleNamespace(tenant="a", name="bot", sha="1" * 64)

    def run(tenant: str) -> Any:
        principal = Principal(tenant, Role.TENANT_ADMIN, "admin")
        return evaluator.run(principal, version, cases, "2" * 64, f"{tenant}:admin")  # type: ignore[arg-type]

    held = [asyncio.create_task(run("a")), asyncio.create_task(run("a"))]
    await asyncio.sleep(0)
    with pytest.raises(errors.ResourceExhausted, match="evaluation_max_concurrent"):
        await run("a")  # tenant a holds half of the 4 slots
    held += [asyncio.create_task(run("b")), asyncio.create_task(run("b"))]
    await asyncio.sleep(0)
    with pytest.raises(errors.ResourceExhausted):
        await run("c")  # all 4 are taken
    gateway.release.set()
    results = await asyncio.gather(*held)
    assert [r.score for r in results] == [1.0] * 4
    assert (await run("c")).score == 1.0  # slots are given back
