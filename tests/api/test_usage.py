"""Usage records through the real gateway: one JSON line per inference call, whatever the front
(gRPC unary and streamed, the OpenAI front through the `openai` package) and however it ends
(OK, NOT_FOUND, the client cancelling), holding the tokens the clients received and never a
prompt, an output or a key; `lora-gateway usage` sums them as the test does.

Tenant `usage` is this module's own (tests/api/conftest.py): every record of it is a call made
here. Expected sums are the clients' own counts (token ids received, the responses' usage), the
expected codes DESIGN.md's table (an unknown adapter is NOT_FOUND) and gRPC's CANCELLED.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from lora_gateway.cli.main import main
from lora_gateway.v1 import inference_pb2 as pb
from tests.api.conftest import ApiEnv, key, metadata

pytestmark = pytest.mark.engine

TENANT = "usage"
#: Prompt texts that must never reach the usage file.
SECRET_PROMPT = "usage-probe: the ostrich juggles marmalade at dawn"
SECRET_CHAT = "usage-probe: a kraken sells umbrellas"


def _records(path: Path) -> list[dict[str, Any]]:  # called in a thread
    lines = path.read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["tenant"] == TENANT]


async def _settled(api: ApiEnv, path: Path, count: int) -> list[dict[str, Any]]:
    """The tenant's records once `count` have been written (the last ones are written as the
    calls end, by the log's thread), and still after a short wait: never more."""
    usage = api.server.usage
    assert usage is not None
    deadline = time.monotonic() + 15
    while True:
        await asyncio.to_thread(usage.flush)
        records = await asyncio.to_thread(_records, path)
        if len(records) >= count or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await asyncio.to_thread(usage.flush)
    return await asyncio.to_thread(_records, path)


async def cli(argv: list[str]) -> int:
    """`lora-gateway ARGV` in a thread (it reads files; the gateway shares this loop)."""
    return await asyncio.to_thread(main, argv)


def _sampling(max_tokens: int, **fields: Any) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, **fields)


async def test_one_usage_record_per_call_and_the_cli_sums_what_clients_received(
    api: ApiEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    async with api.admin(TENANT) as admin:
        uploaded = await admin.upload_adapter("attn-r8", api.adapters["attn-r8"], aliases=("prod",))
    version = uploaded.version
    # What the clients received, per call: (key id, adapter, prompt, completion, code, request).
    got: list[dict[str, Any]] = []
    outputs: list[str] = []

    def note(key_id: str, adapter: str, prompt: int, completion: int, code: str, rid: str) -> None:
        got.append(
            {"key_id": key_id, "adapter": adapter, "prompt_tokens": prompt,
             "completion_tokens": completion, "code": code, "request_id": rid}
        )  # fmt: skip

    user, admin_md = metadata(TENANT), metadata(TENANT, "admin")
    # 1. gRPC unary on the adapter (user key).
    response = await api.stub.Generate(
        pb.GenerateRequest(adapter="attn-r8", text=SECRET_PROMPT, sampling=_sampling(6)),
        metadata=user,
    )
    outputs.append(response.text)
    note("usage-user", "usage/attn-r8", response.usage.prompt_tokens, len(response.token_ids),
         "OK", response.request_id)  # fmt: skip
    # 2. gRPC unary on the base model (tenant-admin key).
    response = await api.stub.Generate(
        pb.GenerateRequest(text=SECRET_PROMPT, sampling=_sampling(5)), metadata=admin_md
    )
    outputs.append(response.text)
    note("usage-admin", "", response.usage.prompt_tokens, len(response.token_ids), "OK",
         response.request_id)  # fmt: skip
    # 3. gRPC stream through the alias, a chat conversation.
    messages = pb.Messages(messages=[pb.ChatMessage(role="user", content=SECRET_CHAT)])
    received, prompt_tokens, rid, text = 0, 0, "", ""
    async for message in api.stub.GenerateStream(
        pb.GenerateRequest(adapter="attn-r8@prod", messages=messages, sampling=_sampling(7)),
        metadata=user,
    ):
        received += len(message.token_ids)
        text += message.text
        rid = rid or message.request_id
        if message.HasField("usage"):
            prompt_tokens = message.usage.prompt_tokens
    outputs.append(text)
    note("usage-user", "usage/attn-r8", prompt_tokens, received, "OK", rid)
    # 4. An adapter that does not exist: NOT_FOUND, no tokens.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.stub.Generate(
            pb.GenerateRequest(
                adapter="no-such-adapter", text=SECRET_PROMPT, request_id="usage-nf"
            ),
            metadata=user,
        )
    assert refused.value.code() is grpc.StatusCode.NOT_FOUND
    note("usage-user", "(unresolved)", 0, 0, "NOT_FOUND", "usage-nf-")
    # 5. The OpenAI front, a completion on the adapter, and a streamed chat on the base model.
    async with api.openai(TENANT) as client:
        completion = await client.completions.create(
            model="attn-r8", prompt=SECRET_PROMPT, max_tokens=4, temperature=0
        )
        assert completion.usage is not None
        outputs.append(completion.choices[0].text)
        note("usage-user", "usage/attn-r8", completion.usage.prompt_tokens,
             completion.usage.completion_tokens, "OK", completion.id)  # fmt: skip
        base = (await client.models.list()).data[0].id
        stream = await client.chat.completions.create(
            model=base,
            messages=[{"role": "user", "content": SECRET_CHAT}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage, chat_id, parts = None, "", []
        async for event in stream:
            chat_id = event.id
            usage = event.usage or usage
            parts.extend(choice.delta.content or "" for choice in event.choices)
        assert usage is not None
        outputs.append("".join(parts))
        note("usage-user", "", usage.prompt_tokens, usage.completion_tokens, "OK", chat_id)
    # 6. A stream the client cancels after its first message: CANCELLED.
    call = api.stub.GenerateStream(
        pb.GenerateRequest(
            adapter="attn-r8", text=SECRET_PROMPT, sampling=_sampling(200, ignore_eos=True)
        ),
        metadata=user,
    )
    first = await call.read()
    assert isinstance(first, pb.GenerateStreamResponse)
    call.cancel()
    cancelled_rid, cancelled_seen = first.request_id, len(first.token_ids)

    path = Path(str(api.server.settings.usage_log))
    records = await _settled(api, path, len(got) + 1)
    assert len(records) == len(got) + 1, records  # exactly one per call
    by_rid = {r["request_id"]: r for r in records}
    assert len(by_rid) == len(records)
    cancelled = by_rid.pop(cancelled_rid)
    assert cancelled["code"] == "CANCELLED"
    assert cancelled["completion_tokens"] >= cancelled_seen
    assert cancelled["ttft_s"] is not None
    for expected in got:
        rid = expected["request_id"]
        matches = [r for r in by_rid.values() if r["request_id"].startswith(rid)]
        assert len(matches) == 1, (rid, records)
        record = matches[0]
        for name in ("key_id", "prompt_tokens", "completion_tokens", "code"):
            assert record[name] == expected[name], (name, record, expected)
        if expected["adapter"] == "usage/attn-r8":
            assert (record["adapter"], record["version"]) == ("usage/attn-r8", version)
        else:
            assert (record["adapter"], record["version"]) == ("", "")
            assert record["base_model"] is (expected["adapter"] == "")
        if expected["code"] == "OK":
            assert record["prompt_tokens"] > 0
            assert record["completion_tokens"] > 0
            assert record["finish_reason"] in {"length", "stop"}
        assert record["latency_s"] >= 0
    streamed = {got[2]["request_id"], got[5]["request_id"]}
    for record in by_rid.values():
        if record["request_id"] in streamed:
            assert 0 <= record["ttft_s"] <= record["latency_s"]
        else:
            assert record["ttft_s"] is None
    raw = await asyncio.to_thread(path.read_text, encoding="utf-8")
    secrets = (SECRET_PROMPT, SECRET_CHAT, "ostrich", "kraken", key(TENANT), key(TENANT, "admin"))
    for secret in secrets:
        assert secret not in raw, secret
    for output in outputs:
        if len(output.strip()) >= 8:
            assert json.dumps(output)[1:-1] not in raw

    # The CLI's sums are the clients' (the cancelled call's tokens are the server's count).
    with_cancel = [*got, {**cancelled, "adapter": "usage/attn-r8"}]
    capsys.readouterr()
    assert await cli(["usage", "--file", str(path), "--tenant", TENANT,
                 "--since", since.isoformat(), "--by", "key", "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["bad_lines"] == 0
    total = summary["total"]
    assert total["requests"] == len(with_cancel) == 7
    assert total["errors"] == 2
    assert total["prompt_tokens"] == sum(g["prompt_tokens"] for g in with_cancel)
    assert total["completion_tokens"] == sum(g["completion_tokens"] for g in with_cancel)
    per_key = {g["key"]: g for g in summary["groups"]}
    assert set(per_key) == {"usage-user", "usage-admin"}
    assert per_key["usage-admin"]["requests"] == 1
    assert per_key["usage-admin"]["completion_tokens"] == got[1]["completion_tokens"]
    assert await cli(["usage", "--file", str(path), "--tenant", TENANT,
                 "--since", since.isoformat(), "--by", "adapter", "--json"]) == 0  # fmt: skip
    per_adapter = {g["key"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert set(per_adapter) == {"usage/attn-r8", "(base model)", "(unresolved)"}
    on_adapter = [g for g in with_cancel if g["adapter"] == "usage/attn-r8"]
    assert per_adapter["usage/attn-r8"]["requests"] == len(on_adapter) == 4
    assert per_adapter["usage/attn-r8"]["completion_tokens"] == sum(
        g["completion_tokens"] for g in on_adapter
    )
    assert per_adapter["(unresolved)"]["errors"] == 1
    # --by version, as a table; and an --until before the calls: nothing.
    assert await cli(["usage", "--file", str(path), "--tenant", TENANT,
                 "--since", since.isoformat(), "--by", "version"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert version[: len("sha256:") + 12] in table
    assert "total" in table
    assert await cli(["usage", "--file", str(path), "--tenant", TENANT, "--since", "2000-01-01",
                 "--until", since.isoformat(), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["total"]["requests"] == 0

    # Bad lines in a second file are counted and named, never fatal.
    broken = tmp_path / "usage.1.jsonl"
    good = json.dumps(records[0])
    lines = f"not json\n[1, 2]\n{good[:-1]}, \n" + '{"ts": "yesterday"}\n\n' + good + "\n"
    await asyncio.to_thread(broken.write_text, lines, encoding="utf-8")
    assert await cli(["usage", "--file", str(path), "--file", str(broken), "--tenant", TENANT,
                 "--since", since.isoformat(), "--json"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    both = json.loads(captured.out)
    assert both["bad_lines"] == 4
    assert both["bad_examples"] == [f"{broken}:{n}" for n in (1, 2, 3, 4)]
    assert both["total"]["requests"] == total["requests"] + 1
    assert "4 line(s) are not usage records" in captured.err
