"""A sweep trial on several devices (parallel.devices > 1): its own group of processes.

A trial on one device trains inside the sweep worker (moeplat.sweep.worker). One on N devices
cannot: Lightning starts ranks 1..N-1 by re-running the command line of the process that calls
trainer.fit, and that must not be the worker's (`moeplat sweep` would start again in every rank).
So the worker starts

    python -m moeplat.sweep.trial_process JOB_DIR/job.json

in a new session, and this module's `main` becomes rank 0 of an ordinary `moeplat run`-style
launch: Lightning re-runs the same command for the other ranks (LOCAL_RANK set), the ranks share
one run directory, and only rank 0 creates the trial's MLflow child run (moeplat.train.run.run,
with the sweep's tags and parent run id, as in-process). Rank 0 opens the trial in the study's
storage and reports to it; PruneOnValidation broadcasts its decision, so every rank stops at the
same step. Each rank writes JOB_DIR/result-rank<N>.json (its result, the step it stopped at,
the world size it trained in); the worker reads rank 0's and records the trial as in-process.

A rank that dies takes the others down (Lightning's observer kills the group); the worker then
fails the trial, closes its MLflow run as FAILED and kills whatever is left of the session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "MOEPLAT_RUN_DIR")
STOP_GRACE_S = 30  # after a Ctrl-C, how long the trial's ranks get to close their run


class TrialFailed(RuntimeError):
    """The trial's processes ended without a result (a rank crashed or was killed)."""


@dataclasses.dataclass
class TrialOutcome:
    result: object  # moeplat.train.run.RunResult of rank 0
    pruned_step: int | None
    world_size: int
    steps_per_rank: dict[int, int]


class WorldSize(L.Callback):
    """The number of processes that actually trained (not what the spec asked for)."""

    size = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.size = trainer.world_size


def run_in_processes(job: dict, job_dir: Path) -> TrialOutcome:
    """Start the trial's rank 0 (which starts the others), wait for it, return rank 0's result.
    `job`: base_path, overrides, run (moeplat.train.run.run keywords: runs_root, resume,
    tracking_uri, tags, end_tags), storage, sweep (SweepSpec as JSON), trial_id, monitor, prunable."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for old in job_dir.glob("result-rank*.json"):  # a retried attempt's leftovers
        old.unlink()
    (job_dir / JOB_FILE).write_text(json.dumps(job, indent=2))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    cmd = [sys.executable, "-m", "moeplat.sweep.trial_process", str(job_dir / JOB_FILE)]
    with open(job_dir / "rank0.log", "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _exited(proc.pid, block=True)
    except KeyboardInterrupt:  # the ranks are in their own session: pass the Ctrl-C on, let them close
        _stop(proc.pid)
        raise
    finally:
        # whatever is left of the session (a rank orphaned by rank 0's crash). Rank 0 is not reaped
        # yet (WNOWAIT), so its pid, the session's group id, cannot have been reused by now.
        _signal_session(proc.pid, signal.SIGKILL)
        code = proc.wait()
    return _outcome(job_dir, code)


def _exited(pid: int, block: bool) -> bool:
    """Whether the child `pid` has exited, leaving it unreaped."""
    options = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
    return os.waitid(os.P_PID, pid, options) is not None


def _stop(pid: int) -> None:
    _signal_session(pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    while not _exited(pid, block=False) and time.monotonic() < deadline:
        time.sleep(0.1)


def _signal_session(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # start_new_session: the group id is rank 0's pid


def _outcome(job_dir: Path, code: int) -> TrialOutcome:
    from moeplat.train.run import RunResult

    ranks = {}
    for path in job_dir.glob("result-rank*.json"):
        ranks[int(path.stem.removeprefix("result-rank"))] = json.loads(path.read_text())
    first = ranks.get(0, {})
    if code != 0 or "result" not in first:
        errors = [f"rank {r}: {v['error']}" for r, v in sorted(ranks.items()) if "error" in v]
        if errors:  # a rank that dies by a signal writes nothing; the others say what they saw
            raise TrialFailed("; ".join(errors))
        tail = _tail(job_dir / "rank0.log")
        raise TrialFailed(f"the trial's rank 0 exited with code {code} without a result:\n{tail}")
    return TrialOutcome(
        result=RunResult(**first["result"]),
        pruned_step=first["pruned_step"],
        world_size=first["world_size"],
        steps_per_rank={r: v["result"]["steps"] for r, v in ranks.items() if "result" in v},
    )


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _open_trial(job: dict):
    """The running trial, in the study's storage, with the sweep's pruner (rank 0 only)."""
    import optuna

    from moeplat.spec.sweep import SweepSpec
    from moeplat.sweep.study import make_pruner, make_storage

    sweep = SweepSpec.model_validate_json(job["sweep"])
    study = optuna.load_study(
        study_name=sweep.name,
        storage=make_storage(job["storage"], sweep),
        pruner=make_pruner(sweep),
        sampler=optuna.samplers.RandomSampler(),  # this process samples nothing
    )
    return optuna.trial.Trial(study, job["trial_id"])


def main(job_path: str) -> int:
    """Every rank of the trial runs this (rank 0 from the worker, the others from Lightning)."""
    from moeplat.spec import load_spec
    from moeplat.sweep.pruning import PruneOnValidation
    from moeplat.train.run import run

    job = json.loads(Path(job_path).read_text())
    out = Path(job_path).parent
    # one node (the worker refuses num_nodes > 1): the rank is Lightning's LOCAL_RANK, 0 in the first
    rank = int(os.environ.get("LOCAL_RANK", 0))
    record: dict = {}
    try:
        loaded = load_spec(job["base_path"], job["overrides"])
        (out / f"rank{rank}.pid").write_text(str(os.getpid()))
        trial = _open_trial(job) if rank == 0 and job["prunable"] else None
        pruner, world = PruneOnValidation(trial, job["monitor"]), WorldSize()
        result = run(loaded, progress=False, callbacks=(pruner, world), **job["run"])
        record = {
            "result": dataclasses.asdict(result),
            "pruned_step": pruner.pruned_step,
            "world_size": world.size,
        }
        return 0
    except BaseException as e:  # every way out leaves the worker a reason
        record = {"error": f"{type(e).__name__}: {e}"}
        raise
    finally:
        tmp = out / f"result-rank{rank}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, out / f"result-rank{rank}.json")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1]))
