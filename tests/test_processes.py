"""The run's leftover check (tests/conftest.py `pytest_sessionfinish`) sees what a run started."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from tests.support import processes


def test_leftovers_finds_a_process_of_this_session_and_stop_ends_it() -> None:
    session = uuid.uuid4().hex
    env = dict(os.environ, **{processes.SESSION_ENV: session})
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = {p.pid for p in processes.leftovers(session, wait_s=0)}
        assert child.pid in found
        assert other.pid not in found  # another session's (or nobody's) process is not ours
        assert processes.stop(child, grace_s=5) != 0
        assert processes.leftovers(session, wait_s=2) == []
    finally:
        for process in (child, other):
            processes.stop(process, grace_s=5)


def test_make_bench_sees_an_engine_it_did_not_start() -> None:
    """`python -m benchmarks` warns when another engine runs: a process named like vLLM's
    engine core, not started by this process (its parent shell has exited), is found; this
    process's own children are not."""
    import psutil

    from benchmarks._support import other_engines

    marker = uuid.uuid4().hex
    script = f"import time; time.sleep(60)  # VLLM::EngineCore {marker}"
    launcher = subprocess.run(
        ["sh", "-c", f'{sys.executable} -c "{script}" >/dev/null 2>&1 & echo $!'],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = psutil.Process(int(launcher.stdout.strip()))
    own = subprocess.Popen([sys.executable, "-c", f"{script} own"])
    try:
        found = [line for line in other_engines() if marker in line]
        assert [line.split(":")[0] for line in found] == [str(orphan.pid)]
    finally:
        orphan.kill()
        processes.stop(own, grace_s=5)
