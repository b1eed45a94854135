"""Evaluation sets and gated promotion through the real gateway: gRPC on 127.0.0.1, the
session's vLLM engine, S3 over HTTP (SeaweedFS).

The set is built from the PEFT-merged references of adapter A (attn-r8): its greedy outputs
(exact and regex checks, text and chat prompts) and a threshold on the reference log-softmax of
its answer (min_logprob), so A passes every case and B (mlp-r4), whose references differ, fails
those; a json_schema case (constrained to a boolean) both pass. Expected scores and failing
case ids come from the references, never from the gateway. Codes from DESIGN.md's table: a bad
set INVALID_ARGUMENT, a refused promotion FAILED_PRECONDITION, a user key PERMISSION_DENIED,
another tenant's adapter NOT_FOUND, capacity exhausted RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import regex

from lora_gateway import devtools, errors
from lora_gateway.client import AsyncGatewayClient, Evaluation, Evaluations
from tests.api.conftest import ApiEnv, key

pytestmark = pytest.mark.engine

TENANT = "evals"
NAME = "graded"
TOKENS = 6
PROMPTS = ["the quick brown", "one two three four", "hello there", "alpha beta", "red green"]
CHAT = [{"role": "user", "content": "five six seven"}]


@dataclass(frozen=True)
class Graded:
    a: str
    b: str
    #: A third version, never evaluated.
    c: str
    cases: list[dict[str, Any]]
    #: Ids of the cases B must fail (from the references).
    b_fails: set[str]


def _text(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def _chat_ids(tokenizer: Any) -> list[int]:
    encoded = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if not isinstance(encoded, list):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def _answer_logprob(
    reference: devtools.ReferenceGenerator, prompt: str, adapter: Path, answer: list[int]
) -> float:
    rows = reference.log_softmax(prompt, adapter, answer)
    start = len(reference.encode(prompt)) - 1
    return math.fsum(float(rows[start + i][token]) for i, token in enumerate(answer))


def build_cases(
    api: ApiEnv, reference: devtools.ReferenceGenerator, tokenizer: Any
) -> tuple[list[dict[str, Any]], set[str]]:
    a, b = api.adapters["attn-r8"], api.adapters["mlp-r4"]
    cases: list[dict[str, Any]] = []
    fails: set[str] = set()
    usable = []
    for prompt in PROMPTS:
        want_a = _text(tokenizer, reference.generate(prompt, a, TOKENS))
        want_b = _text(tokenizer, reference.generate(prompt, b, TOKENS))
        # A reference ending inside a UTF-8 character is held back by vLLM's detokenizer.
        if want_a and want_a != want_b and not want_a.endswith("\ufffd"):
            usable.append((prompt, want_a))
    assert len(usable) >= 2, "the references of A and B must differ on two prompts"
    (p1, t1), (p2, t2) = usable[:2]
    cases.append({"id": "exact-1", "prompt": p1, "max_tokens": TOKENS, "check": {"exact": t1}})
    pattern = "^" + regex.escape(t2) + "$"
    cases.append({"id": "regex-2", "prompt": p2, "max_tokens": TOKENS, "check": {"regex": pattern}})
    fails |= {"exact-1", "regex-2"}
    chat_ids = _chat_ids(tokenizer)
    chat_a = _text(tokenizer, reference.generate(chat_ids, a, TOKENS))
    chat_b = _text(tokenizer, reference.generate(chat_ids, b, TOKENS))
    if chat_a != chat_b and not chat_a.endswith("\ufffd"):
        cases.append(
            {"id": "chat", "messages": CHAT, "max_tokens": TOKENS, "check": {"exact": chat_a}}
        )
        fails.add("chat")
    # min_logprob: an answer A generates (a prefix of its greedy tokens that its text encodes
    # back to) is likelier under A than under B; the threshold halfway. The tiny model's
    # distributions are nearly flat, so the gap is small, but far above the engine's distance
    # from the reference (LOGPROB_TOLERANCE, 1e-4 per token, in test_grpc_features.py).
    best: tuple[float, str, str, float] | None = None
    for prompt in PROMPTS:
        ids = reference.generate(prompt, a, TOKENS)
        for k in range(len(ids), 0, -1):
            text = _text(tokenizer, ids[:k])
            if tokenizer(text, add_special_tokens=False)["input_ids"] == ids[:k]:
                under_a = _answer_logprob(reference, prompt, a, ids[:k])
                under_b = _answer_logprob(reference, prompt, b, ids[:k])
                if best is None or under_a - under_b > best[0]:
                    best = (under_a - under_b, prompt, text, (under_a + under_b) / 2)
                break
    assert best is not None
    assert best[0] > 0.01, best
    _, prompt, answer, threshold = best
    cases.append(
        {"id": "likely", "prompt": prompt, "check": {"min_logprob": threshold, "answer": answer}}
    )
    fails.add("likely")
    cases.append(
        {
            "id": "json",
            "prompt": p2,
            "max_tokens": 8,
            "check": {"json_schema": {"type": "boolean"}},
        }
    )
    return cases, fails


@pytest.fixture(scope="module")
async def graded(api: ApiEnv, reference: devtools.ReferenceGenerator, hf_tokenizer: Any) -> Graded:
    cases, fails = await asyncio.to_thread(build_cases, api, reference, hf_tokenizer)
    async with api.admin(TENANT) as admin:
        a = await admin.upload_adapter(NAME, api.adapters["attn-r8"])
        b = await admin.upload_adapter(NAME, api.adapters["mlp-r4"])
        c = await admin.upload_adapter(NAME, api.adapters["qv-r8"])
    return Graded(a.version, b.version, c.version, cases, fails)


def set_json(cases: list[dict[str, Any]]) -> str:
    return json.dumps({"cases": cases})


async def test_bad_sets_are_refused_and_change_nothing(api: ApiEnv, graded: Graded) -> None:
    good = graded.cases[0]
    bad: list[tuple[Any, str]] = [
        ("not json", "not valid JSON"),
        ({"cases": []}, "1 to"),
        ({"cases": [good], "extra": 1}, "nothing else"),
        ({"cases": [good, good]}, "appears twice"),
        ({"cases": [{**good, "id": "../x"}]}, "case id"),
        ({"cases": [{**good, "check": {"regex": "(unclosed"}}]}, "invalid regex"),
        ({"cases": [{**good, "check": {"regex": "a{5000}"}}]}, "structured_max_repeat"),
        ({"cases": [{**good, "check": {"json_schema": {"type": 5}}}]}, "invalid JSON schema"),
        ({"cases": [{**good, "check": {"exact": "x", "regex": "y"}}]}, "exactly one"),
        ({"cases": [{**good, "check": {"min_logprob": 1.0, "answer": "x"}}]}, "<= 0"),
        ({"cases": [{**good, "max_tokens": 100_000}]}, "evaluation_max_case_tokens"),
        ({"cases": [{"id": "p", "check": {"exact": ""}}]}, "exactly one of 'prompt'"),
        ({"cases": [{**good, "id": f"c{i}"} for i in range(33)]}, "evaluation_max_cases"),
        ({"cases": [{**good, "prompt": "x" * 300_000}]}, "evaluation_max_set_bytes"),
    ]
    async with api.admin(TENANT) as admin:
        before = await admin.get_evaluations(NAME)
        for doc, reason in bad:
            text = doc if isinstance(doc, str) else json.dumps(doc)
            with pytest.raises(errors.InvalidArgument, match=regex.escape(reason)):
                await admin.put_evaluation_set(NAME, text)
        assert await admin.get_evaluations(NAME) == before
    async with AsyncGatewayClient(api.target, key(TENANT)) as user:
        with pytest.raises(errors.PermissionDenied):
            await user.put_evaluation_set(NAME, set_json(graded.cases))
    async with api.admin("globex") as other:
        with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
            await other.put_evaluation_set(NAME, set_json(graded.cases), tenant=TENANT)
        with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
            await other.get_evaluations(NAME, tenant=TENANT)


async def test_evaluate_gate_and_immutable_results(api: ApiEnv, graded: Graded) -> None:
    total = len(graded.cases)
    async with api.admin(TENANT) as admin:
        # Before any set: a gated move is refused with "no evaluation".
        with pytest.raises(errors.FailedPrecondition, match="no evaluation"):
            await admin.set_alias(NAME, "prod", graded.a, require_eval_min_score=1.0)
        info = await admin.put_evaluation_set(NAME, set_json(graded.cases))
        assert info.cases == total
        assert len(info.sha256) == 64
        # The same set again is the same set.
        assert (await admin.put_evaluation_set(NAME, set_json(graded.cases))).sha256 == info.sha256

        first_a = await admin.evaluate_adapter(NAME, graded.a)
        assert first_a.score == 1.0, first_a.failures
        assert (first_a.passed, first_a.total) == (total, total)
        assert first_a.set_sha256 == info.sha256
        assert first_a.version == graded.a
        assert first_a.base_model
        assert "VLLMEngine" in first_a.engine
        result_b = await admin.evaluate_adapter(NAME, graded.b, set_sha256=info.sha256)
        assert {c.id for c in result_b.failures} == graded.b_fails
        assert result_b.score == pytest.approx((total - len(graded.b_fails)) / total)
        assert all(c.reason for c in result_b.failures)

        # Gate: A moves, B is refused naming its failed cases, C (never evaluated) too.
        moved = await admin.set_alias(NAME, "prod", graded.a, require_eval_min_score=1.0)
        assert moved.aliases["prod"] == graded.a
        with pytest.raises(errors.FailedPrecondition) as refused:
            await admin.set_alias(NAME, "prod", graded.b, require_eval_min_score=1.0)
        for case_id in graded.b_fails:
            assert case_id in str(refused.value)
        with pytest.raises(errors.FailedPrecondition, match="no evaluation"):
            await admin.set_alias(NAME, "prod", graded.c, require_eval_min_score=0.5)
        # A lower bar lets B's score through.
        low = result_b.score
        await admin.set_alias(NAME, "canary", graded.b, require_eval_min_score=low)

        # The alias's stored policy applies without the request field, to weights too.
        policies = await admin.set_alias_policy(NAME, "prod", 1.0)
        assert policies.alias_policies == {"prod": 1.0}
        with pytest.raises(errors.FailedPrecondition, match="its policy"):
            await admin.set_alias(NAME, "prod", graded.b)
        with pytest.raises(errors.FailedPrecondition, match="exact-1"):
            await admin.set_alias_weights(NAME, "prod", {graded.a: 0.9, graded.b: 0.1})
        assert (await admin.get_adapter(NAME)).aliases["prod"] == graded.a
        await admin.set_alias_policy(NAME, "prod", 0)
        split = await admin.set_alias_weights(NAME, "prod", {graded.a: 0.9, graded.b: 0.1})
        assert split.alias_weights["prod"] == {graded.a: 0.9, graded.b: 0.1}

        # Results are appended, never rewritten.
        second_a = await admin.evaluate_adapter(NAME, graded.a)
        stored = await admin.get_evaluations(NAME, graded.a)
        assert stored.results == (first_a, second_a)
        everything = await admin.get_evaluations(NAME)
        assert result_b in everything.results
        assert len(everything.results) == 3
        assert everything.current_set == info
        # By alias: prod's primary version is A (weight 0.9).
        assert (await admin.get_evaluations(NAME, "prod")).results == (first_a, second_a)
        with pytest.raises(errors.NotFound):
            await admin.get_evaluations(NAME, "nowhere")

        # A set that is not the current one is refused before anything runs.
        with pytest.raises(errors.FailedPrecondition, match="current evaluation set"):
            await admin.evaluate_adapter(NAME, graded.a, set_sha256="0" * 64)

        # At most evaluation_max_concurrent (1) evaluations at once.
        outcomes = await asyncio.gather(
            admin.evaluate_adapter(NAME, graded.c),
            admin.evaluate_adapter(NAME, graded.c),
            return_exceptions=True,
        )
        assert sum(isinstance(o, Evaluation) for o in outcomes) == 1, outcomes
        assert sum(isinstance(o, errors.ResourceExhausted) for o in outcomes) == 1, outcomes

    audit_path = Path(str(api.server.settings.audit_log))
    audit = (await asyncio.to_thread(audit_path.read_text)).splitlines()
    records = [json.loads(line) for line in audit]
    evaluated = [r for r in records if r.get("rpc") == "EvaluateAdapter" and r["adapter"] == NAME]
    assert len(evaluated) >= 3
    assert any("failed exact-1" in r["detail"] for r in evaluated)
    assert any(r.get("rpc") == "PutEvaluationSet" for r in records)


async def test_a_canary_failing_its_evaluation_is_rolled_back_on_schedule(
    api: ApiEnv, graded: Graded
) -> None:
    """Automatic rollback's evaluation rule (docs/lifecycle.md): the current set is re-run on
    each canary on a schedule (every second here, the package's floor); B fails A's cases and
    is rolled back, A passes them and stays a canary. The scheduled results are stored like
    EvaluateAdapter's, by the gateway."""
    name = "scheduled"
    guard = api.server.rollbacks
    assert guard is not None
    async with api.admin(TENANT) as admin:
        a = (await admin.upload_adapter(name, api.adapters["attn-r8"], aliases=("bad",))).version
        b = (await admin.upload_adapter(name, api.adapters["mlp-r4"], aliases=("good",))).version
        await admin.put_evaluation_set(name, set_json(graded.cases))
        try:
            # bad: stable A, canary B (fails the set); good: stable B, canary A (passes it).
            for alias, stable, canary in (("bad", a, b), ("good", b, a)):
                await admin.set_rollback_policy(name, alias, min_eval_score=1.0, eval_interval_s=1)
                split = await admin.set_alias_weights(name, alias, {stable: 0.5, canary: 0.5})
                assert split.alias_stable[alias] == stable

            async def settled() -> tuple[Evaluations, Evaluations]:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    of_a = await admin.get_evaluations(name, a)
                    of_b = await admin.get_evaluations(name, b)
                    rolled = "bad" in (await admin.get_adapter(name)).rollbacks
                    if of_a.results and of_b.results and rolled:
                        return of_a, of_b
                    await asyncio.sleep(0.1)
                raise AssertionError("the scheduled evaluations did not run within 60 s")

            of_a, of_b = await settled()
            total = len(graded.cases)
            want_b = (total - len(graded.b_fails)) / total
            assert {c.id for c in of_b.results[0].failures} == graded.b_fails
            assert of_b.results[0].score == pytest.approx(want_b)
            assert of_a.results[0].score == 1.0
            assert all(r.evaluated_by.startswith("gateway:") for r in of_a.results + of_b.results)
            info = await admin.get_adapter(name)
            record = info.rollbacks["bad"]
            assert (record.reason, record.canary, record.stable) == ("evaluation", b, a)
            assert (record.value, record.threshold) == (pytest.approx(want_b), 1.0)
            assert info.aliases["bad"] == a
            assert "bad" not in info.alias_weights
            # The passing canary stays one, checks after its result (every 0.25 s) later.
            await asyncio.sleep(0.6)
            info = await admin.get_adapter(name)
            assert info.alias_weights["good"] == {a: 0.5, b: 0.5}
            assert "good" not in info.rollbacks
            # At most one run per interval (1 s): A's results over the time since its first.
            runs = (await admin.get_evaluations(name, a)).results
            first = datetime.fromisoformat(runs[0].finished_at)
            span = (datetime.now(UTC) - first).total_seconds()
            assert len(runs) <= span + 2, (len(runs), span)
            # B, no canary any more, is not evaluated again.
            assert len((await admin.get_evaluations(name, b)).results) == len(of_b.results)
        finally:
            # End the canary (no more scheduled runs) and wait for a run in flight to finish.
            await admin.set_alias(name, "good", b)
            for _ in range(300):
                if not guard.evaluating:
                    break
                await asyncio.sleep(0.1)
