"""Chat templates: the rendering equals transformers' `apply_chat_template`; conversations are
checked (roles, size); hostile templates are stopped by the sandbox's bounds. No engine.

The judge of fidelity is transformers itself (a library nobody here wrote), on the tiny model's
own template and on two templates of the kind real models ship (ChatML, and a Llama-3-style one
with `raise_exception` and a namespace), with and without `add_generation_prompt`.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lora_gateway import devtools, errors
from lora_gateway.chat import ChatLimits, ChatMessage, ChatTemplates, check_messages
from lora_gateway.engine.base import TokenizerInfo

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- set ns = namespace(system='') %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- if ns.system %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system "
    "+ '<|eot_id|>' }}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CONVERSATIONS = [
    [("user", "hello world")],
    [("system", "be brief"), ("user", "one two three"), ("assistant", "four"), ("user", "five")],
    [("user", "  spaced   out  "), ("assistant", "")],
    [("user", "unicode: caf\u00e9 \u65e5\u672c \U0001f600 <s> </s>")],
]


def messages(pairs: list[tuple[str, str]]) -> list[ChatMessage]:
    return [ChatMessage(role, content) for role, content in pairs]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
async def templates(hf_tokenizer: Any) -> AsyncIterator[ChatTemplates]:
    special = {k: v for k, v in hf_tokenizer.special_tokens_map.items() if isinstance(v, str)}
    chat = ChatTemplates(TokenizerInfo(hf_tokenizer.chat_template, special), ChatLimits())
    await chat.check_base()
    yield chat
    chat.close()


def test_the_tiny_model_ships_its_chat_template(hf_tokenizer: Any) -> None:
    assert hf_tokenizer.chat_template == devtools.TINY_CHAT_TEMPLATE


@pytest.mark.parametrize("template", [None, CHATML, LLAMA3_STYLE], ids=["tiny", "chatml", "llama3"])
@pytest.mark.parametrize("generation_prompt", [True, False])
async def test_rendering_equals_transformers(
    templates: ChatTemplates, hf_tokenizer: Any, template: str | None, generation_prompt: bool
) -> None:
    for pairs in CONVERSATIONS:  # each alternates, as the Llama-3-style template requires
        ours = await templates.render(
            messages(pairs), add_generation_prompt=generation_prompt, template=template
        )
        theirs = hf_tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in pairs],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        assert ours == theirs, pairs
        # Tokenized as transformers does: the template writes the special tokens itself.
        ids = hf_tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in pairs],
            chat_template=template,
            tokenize=True,
            add_generation_prompt=generation_prompt,
            return_dict=False,
        )
        assert hf_tokenizer.encode(ours, add_special_tokens=False) == list(ids)


async def test_template_errors_are_invalid_argument_with_the_reason(
    templates: ChatTemplates,
) -> None:
    with pytest.raises(errors.InvalidArgument, match="roles must alternate"):
        await templates.render(messages([("user", "a"), ("user", "b")]), template=LLAMA3_STYLE)
    # The tiny model's own template refuses an unknown role too, but the gateway refuses it
    # first, naming the message.
    with pytest.raises(errors.InvalidArgument, match=r"messages\[1\]\.role: 'tool' is not one of"):
        await templates.render(messages([("user", "a"), ("tool", "b")]))


@pytest.mark.parametrize(
    ("conversation", "limits", "reason"),
    [
        ([], ChatLimits(), "at least one message"),
        ([("robot", "x")], ChatLimits(), r"messages\[0\]\.role: 'robot'"),
        ([("", "x")], ChatLimits(), r"messages\[0\]\.role: ''"),
        ([("user", "x")] * 4, ChatLimits(max_messages=3), "4 messages, more than the limit of 3"),
        ([("user", "x" * 11)], ChatLimits(max_chars=10), "11 characters of content"),
    ],
)
def test_bad_conversations_are_refused(
    conversation: list[tuple[str, str]], limits: ChatLimits, reason: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=reason):
        check_messages(messages(conversation), limits)


async def test_no_template_or_a_broken_one_is_failed_precondition() -> None:
    none = ChatTemplates(TokenizerInfo(None), ChatLimits())
    big = ChatTemplates(TokenizerInfo("x" * 100), ChatLimits(max_template_bytes=50))
    broken = ChatTemplates(TokenizerInfo("{% for %}"), ChatLimits())
    try:
        with pytest.raises(errors.FailedPrecondition, match="no chat template"):
            await none.render(messages([("user", "a")]))
        for chat, why in ((big, "100 bytes, more than the limit of 50"), (broken, "line 1")):
            await chat.check_base()
            assert chat.base_problem is not None
            assert why in chat.base_problem
            with pytest.raises(errors.FailedPrecondition, match="cannot be used"):
                await chat.render(messages([("user", "a")]))
    finally:
        for chat in (none, big, broken):
            chat.close()


#: (id, template, the reason's words): each must stop well within a second, without memory.
HOSTILE_TEMPLATES = [
    (
        "nested-range-loops",
        "{% for a in range(1000) %}{% for b in range(1000) %}"
        "{% for c in range(1000) %}{% endfor %}{% endfor %}{% endfor %}",
        "longer than",
    ),
    (
        "nested-literal-loops",
        "{% for a in [1,2,3,4,5,6,7,8,9,0] %}" * 10 + "{% endfor %}" * 10,
        "longer than",
    ),
    ("lipsum", "{{ lipsum(1000000) }}", "longer than"),
    (
        "doubling-namespace",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "size limit",
    ),
    (
        "doubling-list",
        "{% set ns = namespace(l=['ab']) %}{% for i in range(64) %}"
        "{% set ns.l = ns.l + ns.l %}{% endfor %}",
        "size limit",
    ),
    (
        "doubling-macro",
        "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s|length }}{% endmacro %}"
        "{{ d('ab', 60) }}",
        "size limit",
    ),
    ("multiply", "{{ 'a' * 1000000000 }}", "size limit"),
    ("power", "{{ 2 ** 100000000 }}", "power"),
    ("str-center", "{{ 'a'.center(1000000000) }}", "width"),
    ("filter-center", "{{ 'a'|center(1000000000) }}", "width"),
    ("filter-indent", "{{ ('a\\n' * 100000)|indent(100000) }}", "indent"),
    ("str-replace", "{{ ('a' * 100000).replace('', 'bbbbbbbbbb') }}", "replace"),
    ("filter-replace", "{{ ('a' * 100000)|replace('', 'bbbbbbbbbb') }}", "replace"),
    ("percent-width", "{{ '%999999999s' % 'a' }}", "format width"),
    ("filter-format", "{{ '%999999999s'|format('a') }}", "format width"),
    ("str-format", "{{ '{:>999999999}'.format('a') }}", "format width"),
    ("tojson-indent", "{{ messages|tojson(indent=100000) }}", "indent"),
    (
        "long-output",
        "{% for i in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
        "longer than 200000 characters",
    ),
    ("recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("dunder", "{{ messages.__class__.__mro__ }}", "unsafe"),
    ("mutation", "{{ messages.append(1) }}", "unsafe"),
    ("include", "{% include 'other' %}", "failed"),
    ("syntax", "{% for %}", "line 1"),
    ("too-big", "x" * (70 << 10), "chat_template_max_bytes"),
]


async def test_hostile_templates_stop_at_their_bounds(templates: ChatTemplates) -> None:
    """Each one is INVALID_ARGUMENT with its reason, within the render timeout (1 s) and some
    slack for a loaded machine, and the process's peak memory does not grow by even 200 MiB
    (several of them would allocate gigabytes unbounded)."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conversation = messages([("system", "be brief"), ("user", "hello")])
    took: dict[str, float] = {}
    for case_id, template, reason in HOSTILE_TEMPLATES:
        started = time.perf_counter()
        with pytest.raises(errors.InvalidArgument, match=reason):
            await templates.render(conversation, template=template)
        took[case_id] = time.perf_counter() - started
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    print(
        f"\nhostile templates: slowest {max(took, key=took.__getitem__)} "
        f"{max(took.values()):.2f} s; peak memory grew {grown_mib:.0f} MiB"
    )
    assert max(took.values()) < 5.0, took
    assert grown_mib < 200
    # The pool is not worn out: an ordinary render still answers at once.
    assert await asyncio.wait_for(templates.render(conversation), 5.0)


async def test_render_runs_off_the_event_loop(templates: ChatTemplates) -> None:
    """While a template spins until its deadline, the loop keeps running."""
    spin = "{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}"
    task = asyncio.create_task(templates.render(messages([("user", "x")]), template=spin * 20))
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.01)
        ticks += 1
    with pytest.raises(errors.InvalidArgument):
        await task
    assert ticks >= 20  # ~1 s of deadline at 10 ms a tick, with room for a slow machine
