"""The OpenAI-compatible HTTP front, judged by the official `openai` package as the client
against the real server on 127.0.0.1 (same process as gRPC, the session's engine).

Expected texts come from the PEFT-merged reference decoded by transformers' tokenizer; HTTP
statuses from DESIGN.md's table mapped to HTTP (400, 401, 404, 429), never from the code under
test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import jsonschema
import openai
import pytest

from lora_gateway import devtools
from tests.api.conftest import MAX_TOKENS, ApiEnv, key

pytestmark = pytest.mark.engine

PROMPT = "the quick brown fox"
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "tag"],
    "additionalProperties": False,
}


async def base_name(api: ApiEnv) -> str:
    async with api.openai() as client:
        models = await client.models.list()
    return models.data[0].id


def decoded(hf_tokenizer: Any, ids: list[int]) -> str:
    """The reference's text. The byte-level tokenizer may end on a partial UTF-8 character
    (U+FFFD when decoded); vLLM's detokenizer holds such trailing bytes back, so they are cut
    from both sides of a comparison (`same_text`)."""
    return str(hf_tokenizer.decode(ids, skip_special_tokens=True))


def same_text(got: str | None, expected: str) -> bool:
    return (got or "").rstrip("\ufffd") == expected.rstrip("\ufffd")


def chat_ids(hf_tokenizer: Any) -> list[int]:
    encoded = hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    if not isinstance(encoded, list):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


async def test_models_lists_what_the_caller_may_use(api: ApiEnv) -> None:
    async with api.openai("acme") as acme, api.openai("globex") as globex:
        mine = [m.id for m in (await acme.models.list()).data]
        theirs = [m.id for m in (await globex.models.list()).data]
    assert mine[1:] == ["all-r16-rslora", "attn-r8", "mlp-r4"]
    assert theirs[1:] == ["qv-r8"]
    assert mine[0] == theirs[0]  # the base model


@pytest.mark.parametrize("model", ["attn-r8", "attn-r8@prod", "acme/mlp-r4", None])
async def test_completion_equals_reference(
    api: ApiEnv,
    hf_tokenizer: Any,
    reference: devtools.ReferenceGenerator,
    model: str | None,
) -> None:
    name = model or await base_name(api)
    adapter = None if model is None else model.split("/")[-1].split("@")[0]
    directory = None if adapter is None else api.adapters[adapter]
    expected = await asyncio.to_thread(reference.generate, PROMPT, directory, MAX_TOKENS)
    async with api.openai() as client:
        completion = await client.completions.create(
            model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
    assert same_text(completion.choices[0].text, decoded(hf_tokenizer, expected))
    # The version that served: the reference as the request spelt it, pinned to the version.
    pinned = name if adapter is None else f"{name.split('@')[0]}@{api.versions[adapter]}"
    assert completion.model == pinned
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(expected)


async def test_chat_and_its_stream_equal_reference(
    api: ApiEnv, hf_tokenizer: Any, reference: devtools.ReferenceGenerator
) -> None:
    ids = chat_ids(hf_tokenizer)
    expected = decoded(
        hf_tokenizer,
        await asyncio.to_thread(reference.generate, ids, api.adapters["attn-r8"], MAX_TOKENS),
    )
    async with api.openai() as client:
        chat = await client.chat.completions.create(
            model="attn-r8", messages=CONVERSATION, max_tokens=MAX_TOKENS, temperature=0
        )
        assert same_text(chat.choices[0].message.content, expected)
        assert chat.usage is not None
        assert chat.usage.prompt_tokens == len(ids)
        stream = await client.chat.completions.create(
            model="attn-r8",
            messages=CONVERSATION,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage, finish = [], None, None
        async for event in stream:
            if event.usage is not None:
                usage = event.usage
            for choice in event.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert same_text("".join(parts), expected)
    assert finish in {"length", "stop"}
    assert usage is not None
    assert usage.completion_tokens == chat.usage.completion_tokens


async def test_responses_name_the_version_a_weighted_alias_chose(
    api: ApiEnv, make_test_adapter: Any
) -> None:
    """Through a canary (prod split 50/50 between two versions): each completion's `model`, and
    each chunk's of a stream, is `name@sha256:<hex>` of a version of the split, and that
    version is the one that served: a request pinned to it gives the same tokens."""
    name = "oa-split"
    async with api.admin("lifecli") as admin:
        v1 = (await admin.upload_adapter(name, api.adapters["attn-r8"], aliases=("prod",))).version
        v2 = (await admin.upload_adapter(name, api.adapters["mlp-r4"])).version
        await admin.set_alias_weights(name, "prod", {v1: 0.5, v2: 0.5})
    pinned = {f"{name}@{v1}", f"{name}@{v2}"}

    def tokens(completion: Any) -> list[str]:
        return list(completion.choices[0].logprobs.tokens)

    served: dict[str, list[list[str]]] = {}
    async with api.openai("lifecli") as client:

        async def complete(model: str, **extra: Any) -> Any:
            return await client.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=MAX_TOKENS,
                temperature=0,
                logprobs=0,
                **extra,
            )

        for index in range(8):  # these 8 keys land on both versions (the choice is a hash)
            completion = await complete(f"{name}@prod", user=f"user-{index}")
            assert completion.model in pinned
            served.setdefault(completion.model, []).append(tokens(completion))
        assert set(served) == pinned
        solo = {model: tokens(await complete(model)) for model in pinned}
        for model, outputs in served.items():
            assert all(output == solo[model] for output in outputs), model
        assert solo[f"{name}@{v1}"] != solo[f"{name}@{v2}"]  # the naming is not vacuous

        # Chat, whole and streamed, with the routing key in the header.
        chat = await client.chat.completions.create(
            model=f"{name}@prod",
            messages=CONVERSATION,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_headers={"x-routing-key": "conversation-7"},
        )
        assert chat.model in pinned
        stream = await client.chat.completions.create(
            model=f"{name}@prod",
            messages=CONVERSATION,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-routing-key": "conversation-7"},
        )
        models, parts = set(), []
        async for event in stream:
            models.add(event.model)
            parts.extend(choice.delta.content or "" for choice in event.choices)
        assert models == {chat.model}  # the same key: the same version, named in every chunk
        assert "".join(parts) == chat.choices[0].message.content


async def test_json_schema_response_validates(api: ApiEnv) -> None:
    async with api.openai() as client:
        for model in ("mlp-r4", await base_name(api)):
            chat = await client.chat.completions.create(
                model=model,
                messages=CONVERSATION,
                max_tokens=60,
                temperature=0,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": SCHEMA},
                },
                # Compact JSON (vLLM's extension): a random model would fill max_tokens with
                # whitespace otherwise.
                extra_body={"structured_outputs": {"disable_any_whitespace": True}},
            )
            content = chat.choices[0].message.content or ""
            jsonschema.validate(json.loads(content), SCHEMA)
            assert chat.choices[0].finish_reason == "stop"


async def test_chat_logprobs_equal_the_grpc_ones(api: ApiEnv) -> None:
    async with api.openai() as client:
        chat = await client.chat.completions.create(
            model="attn-r8",
            messages=CONVERSATION,
            max_tokens=MAX_TOKENS,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
    assert chat.choices[0].logprobs is not None
    content = chat.choices[0].logprobs.content or []
    assert len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0.0
        best = max(t.logprob for t in entry.top_logprobs)
        assert entry.logprob == pytest.approx(best, abs=1e-6)  # greedy: the best one


async def test_another_tenants_adapter_is_404_exactly_like_a_missing_one(api: ApiEnv) -> None:
    answers = []
    async with api.openai("globex") as client:
        for model in ("attn-r8", "acme/attn-r8", "no-such-model"):
            with pytest.raises(openai.NotFoundError) as caught:
                await client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
            answers.append((caught.value.status_code, caught.value.body))
    assert answers[0][0] == 404
    assert answers == [answers[2]] * 3


async def test_a_revoked_adapter_is_404(api: ApiEnv) -> None:
    async with api.admin("globex") as admin:
        await admin.upload_adapter("doomed", api.adapters["mlp-r4"])
        async with api.openai("globex") as client:
            done = await client.completions.create(model="doomed", prompt=PROMPT, max_tokens=2)
            assert done.usage is not None
            assert done.usage.completion_tokens == 2
            await admin.revoke_adapter("doomed")
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="doomed", prompt=PROMPT, max_tokens=2)
            assert "doomed" not in [m.id for m in (await client.models.list()).data]


async def test_errors_in_openai_format_with_their_status(api: ApiEnv) -> None:
    async with openai.AsyncOpenAI(base_url=api.base_url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as unauthenticated:
            await bad.models.list()
    assert unauthenticated.value.status_code == 401
    async with api.openai() as client:
        with pytest.raises(openai.BadRequestError) as invalid:
            await client.chat.completions.create(
                model="attn-r8", messages=[{"role": "wizard", "content": "x"}], max_tokens=2
            )
        assert invalid.value.status_code == 400
        assert isinstance(invalid.value.body, dict)
        assert "role" in invalid.value.body["message"]
        deep: dict[str, Any] = {"type": "string"}
        for _ in range(40):
            deep = {"type": "array", "items": deep}
        with pytest.raises(openai.BadRequestError, match="structured_max_schema_depth"):
            await client.chat.completions.create(
                model="attn-r8",
                messages=CONVERSATION,
                max_tokens=2,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "d", "schema": deep},
                },
            )
    # `slow` may send one request a minute: the second of two is 429 with retry-after.
    name = await base_name(api)
    async with openai.AsyncOpenAI(
        base_url=api.base_url, api_key=key("slow"), max_retries=0
    ) as slow:
        with contextlib.suppress(openai.RateLimitError):  # its one may be spent already
            await slow.completions.create(model=name, prompt="x", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as limited:
            await slow.completions.create(model=name, prompt="x", max_tokens=1)
    assert limited.value.status_code == 429
    assert int(limited.value.response.headers["retry-after"]) >= 1
