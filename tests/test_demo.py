"""`lora-gateway demo` end to end (slow: it builds its model, trains both adapters and starts its
own engine, 2 to 4 minutes here): it exits 0 and its output tells the story it claims, the
canary of step 10 in detail (issue 11 item 8).

Expected values come from the demo's own design, never from the gateway: v2 carries the support
adapter's own weights, so it passes the house-style set (3/3) and the untrained draft fails
every case; the canary is 20 % of prod, so about 20 of 100 conversations land on v2 (within 4
binomial standard deviations); the rollback leaves every conversation on v1, the version the
demo uploaded first.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.support import processes

#: The demo took 65 s here alone and up to 280 s under load (README): the suite's 300 s default
#: timeout is too short for it.
DEMO_TIMEOUT_S = 900
pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEMO_TIMEOUT_S + 60)]


def _line(lines: list[str], pattern: str) -> re.Match[str]:
    """The first line matching `pattern` (re.search)."""
    for line in lines:
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matches {pattern!r}")


def _after(lines: list[str], command: str) -> list[str]:
    """The output lines of the CLI command the demo printed as `$ lora-gateway COMMAND`."""
    start = lines.index(f"    $ lora-gateway {command}") + 1
    out = []
    for line in lines[start:]:
        if not line.startswith("      "):
            break
        out.append(line.strip())
    return out


def test_demo_tells_its_story_with_a_canary(tmp_path: Path) -> None:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
    done = processes.run_grouped(
        [str(Path(sys.executable).parent / "lora-gateway"), "demo", "--workdir", str(tmp_path)],
        timeout_s=DEMO_TIMEOUT_S,
        env=env,
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    # What it did before the canary.
    assert "    invoices: 3/3 held-out invoices extracted exactly (base model: 0/3)" in lines
    assert _line(lines, r"^    invoices -> NOT_FOUND: ")
    assert _line(lines, r"\(the response's model names the version: invoices@sha256:[0-9a-f]")
    v1_prefix = _line(lines, r"^    globex support  rank 16  (sha256:[0-9a-f]{12})\.\.\.").group(1)
    v2_prefix = _line(lines, r"^    v2 (sha256:[0-9a-f]{12})\.\.\.  the same weights").group(1)
    assert v1_prefix != v2_prefix

    # Step 10: v2 evaluated, then 20 % of prod.
    assert (
        lines.index(
            "[10] globex ships support v2 as a canary on 20% of prod, with the lora-gateway CLI:"
        )
        > 0
    )
    assert _after(lines, "adapter eval run support --version v2")[0].startswith(
        f"{v2_prefix} scored 1 (3/3) on set "
    )
    canary = _after(lines, "adapter canary support prod v1=0.8 v2=0.2 --require-eval 1")
    split = dict(re.findall(r"(sha256:[0-9a-f]{64}) ([0-9.]+)", canary[0]))
    v1 = next(v for v in split if v.startswith(v1_prefix))
    v2 = next(v for v in split if v.startswith(v2_prefix))
    assert (split[v1], split[v2]) == ("0.8", "0.2")
    counts = _line(lines, r"^    100 conversations on support@prod: (\d+) on v1, (\d+) on v2")
    on_v1, on_v2 = int(counts.group(1)), int(counts.group(2))
    assert on_v1 + on_v2 == 100
    assert 4 <= on_v2 <= 36  # 20 +- 4 sd of Binomial(100, 0.2)

    # The draft fails every case; its promotion is refused, naming them.
    draft = _after(lines, "adapter eval run support --version draft")
    assert re.match(r"sha256:[0-9a-f]{12} scored 0 \(0/3\) on set ", draft[0])
    assert [row.split()[:2] for row in draft[2:]] == [[f"question-{i}", "FAIL"] for i in (1, 2, 3)]
    refused = _after(lines, "adapter alias support prod draft --require-eval 1")
    assert refused[0].startswith(
        "error: FAILED_PRECONDITION: alias 'prod' of 'support' requires an evaluation score >= 1"
    )
    assert "scored 0 (0/3); failed question-1 (" in refused[0]
    assert "question-2 (" in refused[0]
    assert "question-3 (" in refused[0]

    # The rollback: prod is v1 alone again, for every conversation.
    assert _after(lines, "adapter canary support prod v1=1") == [f"globex/support@prod -> {v1}"]
    assert "    100 conversations on support@prod: all 100 on v1" in lines
    # The automatic rollback: a policy, the draft on 20 % ungated, rolled back by the gateway.
    assert _line(lines, r"^    the gateway rolled prod back by itself \d+\.\d+s after the split$")
    record = [line for line in _after(lines, "adapter rollback show support") if "rolled" in line]
    assert len(record) == 1
    assert re.search(rf"rolled back prod: .*evaluation 0 < 1 .*back to {v1[:19]}", record[0])
    assert lines.count("    100 conversations on support@prod: all 100 on v1") == 2
    shown = _after(lines, "adapter show support")
    assert f"alias       prod -> {v1}" in shown
    rows = {row.split()[0]: row.split() for row in shown if row.startswith("sha256:")}
    assert rows[v2[:19]][3:6] == ["latest,v2", "1", "(3/3)"]
    assert rows[v1[:19]][3:5] == ["prod,v1", "-"]
    assert _line(
        lines,
        rf"^    canary: v2 scored 3/3 and served {on_v2} of 100 conversations at 20%; the draft "
        r"scored 0/3, its promotion refused; prod rolled back to v1, by hand and then by the "
        r"gateway itself \(\d+\.\d+s after the draft's split\)$",
    )
