"""`lora-gateway adapter retention` and `adapter show`, and the SDK's `set_retention`, against
the real gateway (gRPC on 127.0.0.1, the session's vLLM engine, S3 over HTTP).

The CLI runs in a thread (it blocks; the gateway serves on this event loop). Expected values are
what the test itself did: the versions it uploaded and aliased, the requests it sent (their
tokens, their errors, how long they took on the client's clock), the evaluation sets it built
(one case that always passes, one that never does) and when it ran them. Codes come from
DESIGN.md's table: keep_last < 1 INVALID_ARGUMENT, a user key PERMISSION_DENIED, a retired
version NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import pytest

from lora_gateway import errors
from lora_gateway.cli import main
from lora_gateway.client import GenerateOptions
from tests.api.conftest import ApiEnv, key
from tests.conftest import AdapterFactory

pytestmark = pytest.mark.engine

TENANT = "lifecli"
PROMPT = "hello there"


def env(api: ApiEnv, label: str = "admin") -> dict[str, str]:
    return {"LORA_GATEWAY_TARGET": api.target, "LORA_GATEWAY_API_KEY": key(TENANT, label)}


async def cli(
    api: ApiEnv, capsys: pytest.CaptureFixture[str], *argv: str, label: str = "admin"
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lora-gateway ARGV`, run in a thread."""
    code = await asyncio.to_thread(main, list(argv), env(api, label))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_retention_through_the_cli_and_the_sdk(
    api: ApiEnv, capsys: pytest.CaptureFixture[str], make_test_adapter: AdapterFactory
) -> None:
    # Adapters of its own: versions are content-addressed, and test_retention.py looks for
    # its retired version's audit record by sha.
    name = "kept-bot"
    async with api.admin(TENANT) as admin:
        v1 = (
            await admin.upload_adapter(name, make_test_adapter(seed=33), aliases=("prod",))
        ).version
        v2 = (await admin.upload_adapter(name, make_test_adapter(seed=34))).version
        v3 = (await admin.upload_adapter(name, make_test_adapter(seed=35))).version  # latest
        code, shown, _ = await cli(api, capsys, "adapter", "retention", name)
        assert (code, shown) == (0, f"{TENANT}/{name} keeps every version (no retention policy)\n")

        # K out of range: INVALID_ARGUMENT with the reason, nothing changes.
        before = await admin.get_adapter(name)
        for bad, text in (
            ("0", "keep_last must be an integer >= 1"),
            ("-3", "keep_last must be an integer >= 1"),
            (str(2**31), "keep_last must be an integer from 1 to 2147483647"),
        ):
            code, _, err = await cli(api, capsys, "adapter", "retention", name, "--keep-last", bad)
            assert code == 3, err  # exits.py: INVALID_ARGUMENT
            assert err.startswith("error: INVALID_ARGUMENT: "), err
            assert text in err, err
        with pytest.raises(errors.InvalidArgument, match="keep_last must be an integer >= 1"):
            await admin.set_retention(name, 0)
        code, _, err = await cli(
            api, capsys, "adapter", "retention", name, "--keep-last", "1", label="user"
        )
        assert err.startswith("error: PERMISSION_DENIED: ")
        assert code == 6
        assert await admin.get_adapter(name) == before

        # K = 1: the newest (v3, latest) and prod's (v1) stay; v2 is retired.
        code, out, _ = await cli(api, capsys, "adapter", "retention", name, "--keep-last", "1")
        assert code == 0
        assert out.splitlines() == [
            f"{TENANT}/{name} keeps the newest version and every aliased one",
            f"retired {v2}",
            "aborted 0 in-flight request(s)",
        ]
        after = await admin.get_adapter(name)
        assert (after.keep_last, {v.version for v in after.versions}) == (1, {v1, v3})
        with pytest.raises(errors.NotFound):
            await admin.generate(f"{name}@{v2}", PROMPT, GenerateOptions(max_tokens=1))
        code, out, _ = await cli(api, capsys, "adapter", "retention", name, "--json")
        assert json.loads(out) == {"tenant": TENANT, "name": name, "keep_last": 1}

        # The SDK: another policy, then none; nothing more to retire.
        done = await admin.set_retention(name, 2)
        assert (done.retired_versions, done.adapter.keep_last) == ((), 2)
        done = await admin.set_retention(name, None)
        assert (done.retired_versions, done.adapter.keep_last) == ((), 0)
        code, out, _ = await cli(api, capsys, "adapter", "retention", name, "--keep-all", "--json")
        assert json.loads(out)["retired_versions"] == []
        assert (await admin.get_adapter(name)).keep_last == 0


def _ms(text: str) -> float:
    assert text.endswith("ms"), text
    return float(text[:-2]) / 1000


def _when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_show_prints_versions_evaluations_and_recent_calls(
    api: ApiEnv, capsys: pytest.CaptureFixture[str], make_test_adapter: AdapterFactory
) -> None:
    name = "shown-bot"
    always = {"id": "any", "prompt": PROMPT, "max_tokens": 1, "check": {"regex": "(?s).*"}}
    never = {"id": "never", "prompt": PROMPT, "max_tokens": 1, "check": {"exact": "not this"}}
    clock: list[float] = []  # every call's duration on the client's clock
    async with api.admin(TENANT) as admin:
        v1 = (
            await admin.upload_adapter(name, make_test_adapter(seed=31), aliases=("prod",))
        ).version
        v2 = (await admin.upload_adapter(name, make_test_adapter(seed=32))).version  # latest
        await admin.set_alias_weights(name, "prod", {v1: 0.75, v2: 0.25})

        async def timed_eval(version: str) -> tuple[float, float]:
            started = time.time()
            await admin.evaluate_adapter(name, version)
            clock.append(time.time() - started)
            return started, time.time()

        old_set = await admin.put_evaluation_set(name, json.dumps({"cases": [always, never]}))
        v2_ran = await timed_eval(v2)  # 2 calls on v2, 1 token each
        await timed_eval(v1)  # 2 calls on v1; superseded below
        new_set = await admin.put_evaluation_set(name, json.dumps({"cases": [always]}))
        v1_ran = await timed_eval(v1)  # 1 call on v1

        # Requests: 3 on v1 (4 tokens each), 2 streamed on v2 (3 tokens each) and one on v2
        # refused after it resolved (a prompt longer than the context: INVALID_ARGUMENT).
        for _ in range(3):
            started = time.monotonic()
            result = await admin.generate(
                f"{name}@{v1}", PROMPT, GenerateOptions(max_tokens=4, ignore_eos=True)
            )
            clock.append(time.monotonic() - started)
            assert result.completion_tokens == 4
        for _ in range(2):
            started = time.monotonic()
            deltas = [
                d
                async for d in admin.generate_stream(
                    f"{name}@{v2}", PROMPT, GenerateOptions(max_tokens=3, ignore_eos=True)
                )
            ]
            clock.append(time.monotonic() - started)
            assert deltas[-1].completion_tokens == 3
        started = time.monotonic()
        with pytest.raises(errors.InvalidArgument):
            await admin.generate(name, "stretch " * 400, GenerateOptions(max_tokens=1))
        clock.append(time.monotonic() - started)

    code, out, err = await cli(api, capsys, "adapter", "show", name)
    assert code == 0, err
    lines = out.splitlines()
    assert f"eval set    {new_set.sha256} (1 cases, " in out
    assert "retention   keeps every version (no retention policy)" in lines
    split = ", ".join(f"{v} {w:g}" for v, w in sorted({v1: 0.75, v2: 0.25}.items()))
    assert f"alias       prod -> {split}" in lines
    head = next(i for i, line in enumerate(lines) if line.startswith("versions (oldest first"))
    assert lines[head + 1].split() == [
        "VERSION",
        "CREATED",
        "STATUS",
        "ALIASES",
        "EVAL",
        "EVAL",
        "SET",
        "EVALUATED",
        "REQUESTS",
        "ERRORS",
        "P50",
        "P99",
        "TTFT",
        "P50",
        "TOKENS",
    ]
    rows = {line.split()[0]: line.split() for line in lines[head + 2 : head + 4]}
    assert set(rows) == {v1[:19], v2[:19]}
    slowest = max(clock)

    first = rows[v1[:19]]
    assert first[2:4] == ["active", "prod=0.75"]
    assert first[4:7] == ["1", "(1/1)", new_set.sha256[:12]]  # the latest run, on the new set
    assert v1_ran[0] - 1 <= _when(first[7]) <= v1_ran[1] + 1
    # 3 evaluation calls (1 token each) and the 3 requests (4 tokens each), none failed.
    assert first[8:11] == ["6", "0", "(0.0%)"]
    assert first[-1] == str(3 * 1 + 3 * 4)

    second = rows[v2[:19]]
    assert second[2:4] == ["active", "latest,prod=0.25"]
    assert second[4:8] == ["0.5", "(1/2)", old_set.sha256[:12], "(old)"]
    assert v2_ran[0] - 1 <= _when(second[8]) <= v2_ran[1] + 1
    # 2 evaluation calls, 2 streams and the refused one.
    assert second[9:12] == ["5", "1", "(20.0%)"]
    assert second[-1] == str(2 * 1 + 2 * 3)
    for row in (first, second):
        p50, p99, ttft = (_ms(cell) for cell in row[-4:-1])
        assert 0 <= p50 <= p99 <= slowest + 0.001
        assert ttft <= slowest + 0.001

    details = next(i for i, line in enumerate(lines) if line.split()[:2] == ["VERSION", "RANK"])
    by_version = {line.split()[0]: line.split() for line in lines[details + 1 : details + 3]}
    assert by_version[v2][-2] == "INVALID_ARGUMENT=1"
    # 2 streams ran to their length; each evaluation case ended one way or the other.
    finish = dict(item.split("=") for item in by_version[v2][-1].split(","))
    assert int(finish["length"]) >= 2
    assert sum(int(n) for n in finish.values()) == 4

    code, out, _ = await cli(api, capsys, "adapter", "show", name, "--json")
    shown = json.loads(out)
    assert shown["alias_weights"] == {"prod": {v1: 0.75, v2: 0.25}}
    assert shown["evaluation_set"]["sha256"] == new_set.sha256
    latest = shown["latest_evaluations"]
    assert (latest[v1]["score"], latest[v1]["set_sha256"]) == (1.0, new_set.sha256)
    assert (latest[v2]["score"], latest[v2]["set_sha256"]) == (0.5, old_set.sha256)
    assert [c["id"] for c in latest[v2]["cases"] if not c["passed"]] == ["never"]
    serving = {s["version"]: s for s in shown["serving"]}
    assert (serving[v1]["requests"], serving[v1]["completion_tokens"]) == (6, 15)
    assert (serving[v2]["requests"], serving[v2]["errors"]) == (5, 1)
    assert serving[v2]["error_codes"] == {"INVALID_ARGUMENT": 1}
