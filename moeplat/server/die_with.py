"""`python -m moeplat.server.die_with PID COMMAND...`: become COMMAND (exec), set up to be killed
(SIGKILL) by the kernel when the worker PID, its parent, dies: Linux's PR_SET_PDEATHSIG, which
survives exec. Elsewhere COMMAND just runs and outlives its worker.

Why a separate exec and not `preexec_fn` in the worker: a preexec_fn makes subprocess fork
(not vfork) and run Python in the child of a process with many threads (torch's, uvicorn's, the
worker's own), where a lock held by another thread at the fork (an at-fork handler, a finalizer)
hangs the child before its exec, and the worker with it. Seen as a worker thread that never
started its job once a test process had run enough before it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m moeplat.server.die_with WORKER_PID COMMAND [ARG...]")
    worker_pid, command = int(argv[0]), argv[1:]
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        prctl = None
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != worker_pid:  # the worker died before prctl: nobody will send it
            os.kill(os.getpid(), signal.SIGKILL)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
