"""moeplat.server.die_with: a worker's job process dies with the worker (Linux), without a
preexec_fn in the worker (one that hung the worker's fork once enough threads existed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

DIE_WITH = [sys.executable, "-m", "moeplat.server.die_with"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_the_command_runs_in_place_with_its_arguments_and_exit_code():
    out = subprocess.run(
        [*DIE_WITH, str(os.getpid()), sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(3)", "a b", "c"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 3 and out.stdout.strip() == "['a b', 'c']", out.stderr


def test_the_job_dies_when_its_worker_is_killed():
    # a "worker" that starts its job through die_with, prints the job's pid and waits
    worker_code = (
        "import os, subprocess, sys, time;"
        f"p = subprocess.Popen({DIE_WITH!r} + [str(os.getpid()), 'sleep', '60']);"
        "time.sleep(0.5); print(p.pid, flush=True); time.sleep(60)"
    )
    worker = subprocess.Popen([sys.executable, "-c", worker_code], stdout=subprocess.PIPE, text=True)
    try:
        job = int(worker.stdout.readline())
        assert _alive(job) and Path(f"/proc/{job}/cmdline").read_bytes().startswith(
            b"sleep"
        )  # exec'd in place
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert _wait_dead(job), "the job outlived its worker"
    finally:
        worker.kill()


def test_a_job_whose_worker_is_already_gone_kills_itself():
    """The parent is not the named worker (it died before prctl): the job must not run on."""
    out = subprocess.run([*DIE_WITH, "1", "echo", "ran"], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL and "ran" not in out.stdout
