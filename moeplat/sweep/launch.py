"""`moeplat sweep`: create or resume the study and its MLflow parent run, then run N workers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from moeplat.spec.sweep import LoadedSweep
from moeplat.sweep.report import summarize_to_mlflow
from moeplat.sweep.study import PARENT_RUN_ATTR, open_study
from moeplat.sweep.worker import requeue_interrupted, work

log = logging.getLogger(__name__)


def _parent_run(loaded: LoadedSweep, study, tracking_uri: str | None, runs_root: str):
    """The sweep's parent MLflow run. Like a run's, its writes spool to disk while the tracking
    server is away (runs/<sweep>/sweep-parent: `moeplat sync` sends what is left)."""
    from moeplat.track.mlflow_run import TrackedRun, flatten, resolve_tracking_uri
    from moeplat.track.spool import SPOOL_FILE

    spec = loaded.base.spec
    if not spec.tracking.enabled:
        return None
    uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri)
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    parent_dir = Path(runs_root) / loaded.sweep.name / "sweep-parent"
    parent_dir.mkdir(parents=True, exist_ok=True)
    parent = TrackedRun(
        uri,
        spec.tracking.experiment,
        f"sweep {loaded.sweep.name}",
        run_id=run_id,
        spool=parent_dir / SPOOL_FILE,
    )
    (parent_dir / "run.json").write_text(json.dumps({"run_id": parent.run_id, "tracking_uri": uri}, indent=2))
    if run_id is None:
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
        parent.set_tags({"optuna.study": loaded.sweep.name, "moeplat.kind": "sweep"})
        parent.log_params(flatten({"sweep": loaded.sweep.model_dump(mode="json")}))
        parent.log_artifact(loaded.path, "sweep")
    return parent


def run_sweep(
    loaded: LoadedSweep,
    storage: str,
    *,
    workers: int = 1,
    resume: bool = False,
    tracking_uri: str | None = None,
    runs_root: str = "runs",
) -> object:
    study = open_study(loaded, storage, create=True, resume=resume)
    if resume and (n := requeue_interrupted(study)):
        log.warning("re-queued %d interrupted trial(s)", n)
    parent = _parent_run(loaded, study, tracking_uri, runs_root)
    status = "FAILED"
    try:
        if workers == 1:
            work(loaded, storage, tracking_uri=tracking_uri, runs_root=runs_root)
        else:
            _run_processes(loaded, storage, workers, tracking_uri, runs_root)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            summarize_to_mlflow(study, parent)
            parent.finish(status)
            if parent.spool_pending():
                spooled = Path(runs_root) / loaded.sweep.name / "sweep-parent"
                log.warning(
                    "tracking server unreachable: send the sweep's summary with `moeplat sync %s`", spooled
                )
    return study


def _stop(procs: list[subprocess.Popen]) -> None:
    """Ctrl-C in a terminal reaches the workers too (one process group): give them time to close
    their trials; forward it to those that did not get it (e.g. a SIGINT sent to this process
    alone), and kill what still runs after that."""
    for sig, wait_s in ((None, 5), (signal.SIGINT, 30), (signal.SIGKILL, 5)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive if sig else []:
            p.send_signal(sig)
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=wait_s)


def worker_env(workers: int) -> dict[str, str]:
    """Share the cores: N workers each running torch with all cores' threads oversubscribe the
    machine, and OpenMP's spinning threads then slow every trial by an order of magnitude
    (seen: 8 s per quick-start step with 2 workers on 2 cores instead of 0.15 s)."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def _run_processes(loaded: LoadedSweep, storage: str, workers: int, tracking_uri, runs_root: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "moeplat.cli.main",
        "sweep-worker",
        loaded.path,
        "--storage",
        storage,
        "--runs-dir",
        runs_root,
    ]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri]
    procs = [
        subprocess.Popen([*cmd, "--worker-index", str(i)], env=worker_env(workers)) for i in range(workers)
    ]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        _stop(procs)
        raise
    failed = [c for c in codes if c != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} sweep workers exited with errors {failed}")
