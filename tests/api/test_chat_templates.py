"""An adapter's own chat template (its upload's chat_template.jinja), through the real gateway.

Judges nobody here wrote: transformers' `apply_chat_template(..., chat_template=TEXT)` for the
prompt token ids and text, the PEFT-merged reference for the output, hashlib for the recorded
sha256, and the S3 server's own listing for "nothing stored". Expected status codes come from
DESIGN.md's table (an invalid adapter file: INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lora_gateway import devtools, errors
from lora_gateway.v1 import inference_pb2 as pb
from tests.api.conftest import MAX_TOKENS, ApiEnv, metadata
from tests.support.s3server import S3Server

pytestmark = pytest.mark.engine

SC = grpc.StatusCode
#: Weights of the templated uploads (the same bytes as the fixture's mlp-r4).
WEIGHTS = "mlp-r4"
CONVERSATION = [("system", "be brief"), ("user", "one two three"), ("assistant", "four")]
#: acme's template: unlike the tiny model's in every token it writes.
TEMPLATE_A = (
    "{%- for message in messages -%}"
    "{{- '[' + (message['role'] | upper) + '] ' + message['content'] + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[ASSISTANT] ' -}}{%- endif -%}"
)
#: globex's template, for the same adapter name and weights.
TEMPLATE_B = (
    "{% for m in messages %}{{ m.content }} <{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}answer:{% endif %}"
)


def hf_ids(tokenizer: Any, template: str | None, add: bool = True) -> list[int]:
    """transformers' own rendering and tokenization (None: the tokenizer's template)."""
    conversation = [{"role": r, "content": c} for r, c in CONVERSATION]
    encoded = tokenizer.apply_chat_template(
        conversation, chat_template=template, add_generation_prompt=add, tokenize=True
    )
    if not isinstance(encoded, list):  # transformers 5 returns a BatchEncoding
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def with_template(source: Path, folder: Path, template: bytes | None) -> Path:
    """A copy of the PEFT folder `source`, with `template` as its chat_template.jinja."""
    shutil.copytree(source, folder)
    if template is not None:
        (folder / "chat_template.jinja").write_bytes(template)
    return folder


async def tokenize(api: ApiEnv, tenant: str, adapter: str, add: bool = True) -> pb.TokenizeResponse:
    messages = pb.Messages(
        messages=[pb.ChatMessage(role=r, content=c) for r, c in CONVERSATION],
        add_generation_prompt=add,
    )
    request = pb.TokenizeRequest(adapter=adapter, messages=messages)
    response: pb.TokenizeResponse = await api.stub.Tokenize(request, metadata=metadata(tenant))
    return response


@pytest.fixture(scope="module")
async def templated(
    api: ApiEnv, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    """acme's "templated" (mlp-r4's weights with TEMPLATE_A) and globex's "templated" (the same
    weights with TEMPLATE_B), uploaded for this module and revoked after it (the package's
    other tests list each tenant's adapters)."""
    work = tmp_path_factory.mktemp("templates")
    source = api.adapters[WEIGHTS]
    uploaded: dict[str, Any] = {}
    try:
        for tenant, template in (("acme", TEMPLATE_A), ("globex", TEMPLATE_B)):
            folder = with_template(source, work / tenant, template.encode())
            async with api.admin(tenant) as admin:
                uploaded[tenant] = await admin.upload_adapter("templated", folder)
        yield uploaded
    finally:
        for tenant in uploaded:
            async with api.admin(tenant) as admin:
                await admin.revoke_adapter("templated")


async def test_an_adapters_template_renders_its_chat_prompts(
    api: ApiEnv,
    templated: dict[str, Any],
    hf_tokenizer: Any,
    reference: devtools.ReferenceGenerator,
) -> None:
    version = templated["acme"]
    # The manifest records the template and its sha256, which is part of the content address.
    assert version.chat_template is not None
    assert version.chat_template.sha256 == hashlib.sha256(TEMPLATE_A.encode()).hexdigest()
    assert version.version != api.versions[WEIGHTS]  # same weights, no template
    assert version.version != templated["globex"].version  # same weights, another template
    base_ids = hf_ids(hf_tokenizer, None)
    for add in (True, False):
        expected = hf_ids(hf_tokenizer, TEMPLATE_A, add)
        assert expected != hf_ids(hf_tokenizer, None, add)  # the test can tell them apart
        response = await tokenize(api, "acme", "templated", add)
        assert list(response.token_ids) == expected
        conversation = [{"role": r, "content": c} for r, c in CONVERSATION]
        assert response.rendered == hf_tokenizer.apply_chat_template(
            conversation, chat_template=TEMPLATE_A, add_generation_prompt=add, tokenize=False
        )
    # The same weights without a template, and the base model, keep the base template.
    assert list((await tokenize(api, "acme", WEIGHTS)).token_ids) == base_ids
    assert list((await tokenize(api, "acme", "")).token_ids) == base_ids

    # Generate renders with it too, and the engine serves the adapter's weights on those ids.
    ids = hf_ids(hf_tokenizer, TEMPLATE_A)
    want = await asyncio.to_thread(reference.generate, ids, api.adapters[WEIGHTS], MAX_TOKENS)
    request = pb.GenerateRequest(
        adapter="templated",
        messages=pb.Messages(messages=[pb.ChatMessage(role=r, content=c) for r, c in CONVERSATION]),
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
    )
    response = await api.stub.Generate(request, metadata=metadata("acme"))
    assert response.usage.prompt_tokens == len(ids)
    assert list(response.token_ids) == want

    # And the OpenAI front's /v1/chat/completions.
    async with api.openai("acme") as client:
        chat = await client.chat.completions.create(
            model="templated",
            messages=[{"role": r, "content": c} for r, c in CONVERSATION],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
        )
        base = await client.chat.completions.create(
            model=WEIGHTS,
            messages=[{"role": r, "content": c} for r, c in CONVERSATION],
            max_tokens=1,
        )
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == len(ids)
    assert base.usage is not None
    assert base.usage.prompt_tokens == len(base_ids)


async def test_another_tenants_template_never_affects_this_tenant(
    api: ApiEnv, templated: dict[str, Any], hf_tokenizer: Any
) -> None:
    """Same adapter name, same weights, two tenants, two templates: each renders its own, in
    any order, and the one that has none (qv-r8 of globex) keeps the base template."""
    for _ in range(2):
        for tenant, template in (("globex", TEMPLATE_B), ("acme", TEMPLATE_A)):
            response = await tokenize(api, tenant, "templated")
            assert list(response.token_ids) == hf_ids(hf_tokenizer, template)
    response = await tokenize(api, "globex", "qv-r8")
    assert list(response.token_ids) == hf_ids(hf_tokenizer, None)
    # globex never reaches acme's adapter of that name (not shared): NOT_FOUND.
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await tokenize(api, "globex", "acme/templated")
    assert hidden.value.code() is SC.NOT_FOUND


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        pytest.param(b"{% for m in messages %}{{ m.content }}", "endfor", id="syntax"),
        pytest.param(b"{{ ''.__class__.__mro__ }}", "unsafe", id="sandbox-escape"),
        pytest.param(b"{{ cycler.__init__.__globals__ }}", "unsafe", id="globals"),
        pytest.param(b"\xff\xfe{{ messages }}", "not UTF-8", id="non-utf8"),
        pytest.param(b"{#" + b"x" * (64 << 10) + b"#}", "chat_template_max_bytes", id="too-big"),
        pytest.param(
            b"{{ raise_exception('roles must alternate') }}", "roles must alternate", id="raises"
        ),
        pytest.param(b"{% if false %}x{% endif %}", "empty", id="renders-nothing"),
    ],
)
async def test_a_bad_template_is_refused_and_nothing_is_stored(
    api: ApiEnv,
    api_s3: S3Server,
    tmp_path: Path,
    template: bytes,
    reason: str,
) -> None:
    folder = with_template(api.adapters[WEIGHTS], tmp_path / "bad", template)
    async with api.admin("acme") as admin:
        with pytest.raises(errors.GatewayError) as refused:
            await admin.upload_adapter("bad-template", folder)
        assert refused.value.code is SC.INVALID_ARGUMENT, refused.value
        assert reason in str(refused.value)
        with pytest.raises(errors.GatewayError) as missing:
            await admin.get_adapter("bad-template")
        assert missing.value.code is SC.NOT_FOUND
    listed = await asyncio.to_thread(
        api_s3.client().list_objects_v2,
        Bucket=api_s3.bucket,
        Prefix="api/tenants/acme/adapters/bad-template/",
    )
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")


async def test_a_cached_template_is_verified_like_the_other_files(
    api: ApiEnv, hf_tokenizer: Any, tmp_path: Path
) -> None:
    """The template comes from the disk cache, checked against its sha256 when it is read: a
    cached copy changed on disk (same size) is DATA_LOSS, and the next request fetches it
    again from the store."""
    folder = with_template(api.adapters[WEIGHTS], tmp_path / "tampered", TEMPLATE_B.encode())
    async with api.admin("acme") as admin:
        version = await admin.upload_adapter("tampered", folder)
        try:
            await admin.prefetch_adapter("tampered")  # its files are in the disk cache now
            cached = api.server.gateway.residency.cache.path_for(version.version[7:])
            original = (cached / "chat_template.jinja").read_bytes()
            (cached / "chat_template.jinja").write_bytes(original.replace(b"answer", b"ANSWER"))
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                await tokenize(api, "acme", "tampered")
            assert lost.value.code() is SC.DATA_LOSS
            response = await tokenize(api, "acme", "tampered")
            assert list(response.token_ids) == hf_ids(hf_tokenizer, TEMPLATE_B)
            assert (cached / "chat_template.jinja").read_bytes() == original
        finally:
            await admin.revoke_adapter("tampered")
