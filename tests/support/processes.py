"""Processes the tests start, and the check that none is left behind.

Every process a test run starts carries `SESSION_ENV` in its environment (inherited from the
pytest process, which sets it at start-up), so that at the end of the run the leftovers of *this*
run can be told apart from anything else on the machine (another run, a benchmark).

`stop(process)` ends a process the way Kubernetes ends a pod: SIGTERM, a grace period, then
SIGKILL of its whole process group (start it with `start_new_session=True`), so that a replica
that ignores SIGTERM cannot leave its vLLM engine core running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

SESSION_ENV = "LORA_GATEWAY_TEST_SESSION"


def stop(process: subprocess.Popen[str] | subprocess.Popen[bytes], grace_s: float = 30.0) -> int:
    """SIGTERM, wait up to `grace_s`, then SIGKILL the process group. Returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.kill()
    return process.wait(10)


def leftovers(session: str, *, wait_s: float = 15.0) -> list[psutil.Process]:
    """Processes other than this one whose environment carries `SESSION_ENV=session`, after
    waiting up to `wait_s` for them to end by themselves."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for process in psutil.process_iter(["pid"]):
            if process.pid == os.getpid():
                continue
            try:
                if (
                    process.environ().get(SESSION_ENV) == session
                    and process.status() != psutil.STATUS_ZOMBIE
                ):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server whose port must be
    known before it starts; one that binds port 0 and reports it is better where it can)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_grouped(
    command: list[str],
    *,
    timeout_s: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(command, capture_output=True, text=True)` in a process group of its own:
    on a timeout the whole group (the command and the engines or servers it started) is killed
    before TimeoutExpired is raised, so nothing is left behind."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def engine_pids() -> set[int]:
    """This process's live vLLM engine processes (EngineCore, Worker); a zombie has ended."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "VLLM" in child.name() or "VLLM" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:  # ended meanwhile, or a zombie
            continue
    return found
