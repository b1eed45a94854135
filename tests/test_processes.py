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
