"""Create or continue one MLflow run per `moeplat run`, and log the spec into it."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = (
    "sqlite:///mlflow.db"  # MLflow's own default: `mlflow ui` in the same directory finds it
)
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None) -> str:
    """--tracking-uri, then the spec's tracking.uri, then $MLFLOW_TRACKING_URI, then the local store.

    A relative SQLite path is made absolute here: MLflow caches one store per URI string, so a
    relative URI would keep pointing at the first directory it was used from in a long process."""
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return absolute_sqlite(uri)


def absolute_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + os.path.abspath(uri.removeprefix(prefix))
    return uri


def flatten(tree: object, prefix: str = "") -> dict[str, str]:
    """Every leaf under its dotted path; lists are leaves (as JSON), None is 'null'."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    value = json.dumps(tree) if isinstance(tree, list | type(None)) else str(tree)
    return {prefix: value}


JOB_ID_ENV = "MOEPLAT_JOB_ID"  # set by the job server's worker (moeplat.server.worker)
JOB_ID_TAG = "moeplat.job_id"


def job_tags() -> dict[str, str]:
    """`moeplat.job_id` on every run a server job creates (sweeps: the parent and each trial)."""
    job = os.environ.get(JOB_ID_ENV)
    return {JOB_ID_TAG: job} if job else {}


def git_state(path: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else False
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"git.commit": commit or "unknown", "git.dirty": str(dirty).lower()}


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then deliver it to the handler that was in place.

    A KeyboardInterrupt raised inside an MLflow write can leave its SQLite transaction open,
    holding the database lock: the final flush of the interrupted run then waits for the busy
    timeout and fails with "database is locked", and that error replaces the interrupt (a Ctrl-C'd
    sweep went on with its next trial). Writes are short, so deferring costs nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only delivered to the main thread
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(*caught[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _uninterrupted(write):
    @functools.wraps(write)
    def wrapper(*args, **kwargs):
        with sigint_deferred():
            return write(*args, **kwargs)

    return wrapper


class TrackedRun:
    """A handle on one MLflow run. Construct on rank 0 only. Its writes are not cut by Ctrl-C
    (sigint_deferred): an interrupt lands before or after a write, never inside it.

    With a `spool` path, a write the server cannot take (unreachable: moeplat.track.spool) goes
    to that file and training goes on; the next write first replays the file, at most once every
    RETRY_S seconds while the server stays away, and `moeplat sync` sends what is left. A run
    that finds the server away at its start (a quick TCP probe, not MLflow's retries) gets a local
    id and spools its creation too: the MLflow run is created when the spool is first replayed."""

    RETRY_S = float(os.environ.get("MOEPLAT_SPOOL_RETRY_S", "15"))

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        spool: str | Path | None = None,
    ):
        from mlflow import MlflowClient

        from moeplat.track.spool import SHORT_RETRY_ENV, Spool

        if spool is not None and tracking_uri.startswith(("http://", "https://")):
            for k, v in SHORT_RETRY_ENV.items():
                os.environ.setdefault(k, v)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.spool = Spool(spool) if spool is not None else None
        self._retry_at = 0.0
        # metrics are written from the logger's sender thread, everything else from the training
        # thread: one write at a time keeps the spool's order and its file intact
        self._lock = threading.RLock()
        if run_id is None:
            self.run_id = self._create(experiment, run_name)
        else:
            self.run_id = self._known(run_id)
            self._write({"op": "status", "status": "RUNNING"})

    def _up(self) -> bool:
        from moeplat.track.spool import reachable

        return reachable(self.tracking_uri)

    def _create(self, experiment: str, run_name: str | None) -> str:
        """The new MLflow run's id; with a spool and no server, a local id and a spooled `create`."""
        from moeplat.track.spool import experiment_id, is_unreachable, new_local_id

        if self.spool is None or self._up():
            try:
                exp_id = experiment_id(self.client, experiment)
                return self.client.create_run(exp_id, run_name=run_name, tags=job_tags()).info.run_id
            except Exception as e:
                if self.spool is None or not is_unreachable(e):
                    raise
        run_id = new_local_id()
        start = int(time.time() * 1000)
        record = {"op": "create", "run_id": run_id, "experiment": experiment, "run_name": run_name}
        self.spool.append({**record, "tags": job_tags(), "start_time": start})
        self._retry_at = time.monotonic() + self.RETRY_S
        log.warning(
            "tracking server %s unreachable: training anyway, the run is spooled to %s; "
            "`moeplat sync %s` creates it in MLflow",
            self.tracking_uri,
            self.spool.path,
            self.spool.path.parent,
        )
        return run_id

    def _known(self, run_id: str) -> str:
        """A local id whose spool was already sent (`moeplat sync`) names an MLflow run by now."""
        from moeplat.track.spool import find_local, is_local

        if not is_local(run_id) or (self.spool is not None and self.spool.pending()) or not self._up():
            return run_id
        return find_local(self.client, run_id) or run_id

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def _write(self, record: dict) -> None:
        """Send one write, or spool it while the server is unreachable (keeping the order)."""
        from moeplat.track.spool import is_unreachable, send

        with self._lock:
            if self.spool is None:
                return send(self.client, {**record, "run_id": self.run_id})
            if self.spool.pending() and not self.replay_spool():
                return self.spool.append({**record, "run_id": self.run_id})
            record = {**record, "run_id": self.run_id}  # the replay may have created the MLflow run
            try:
                send(self.client, record)
            except Exception as e:
                if not is_unreachable(e):
                    raise
                self._went_away(e)
                self.spool.append(record)

    def replay_spool(self, force: bool = False) -> bool:
        """Send the spooled writes; True when none are left. Tried at most every RETRY_S seconds
        unless `force`."""
        from moeplat.track.spool import is_unreachable, send

        if self.spool is None or not self.spool.pending():
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        if not self._up():  # a refused or unanswered connect: no need to sit through MLflow's retries
            self._went_away(ConnectionError("no connection"))
            return False
        with self._lock:
            try:
                n = self.spool.replay(lambda r: send(self.client, r))
            except Exception as e:
                if not is_unreachable(e):
                    raise
                self._went_away(e)
                return False
            finally:  # the run's creation may have gone through before a later write failed
                self.run_id = self.spool.created.get(self.run_id, self.run_id)
        log.warning("tracking server back: %d spooled writes sent to MLflow run %s", n, self.run_id)
        return True

    def _went_away(self, e: Exception) -> None:
        if self._retry_at == 0.0 or not self.spool.pending():
            log.warning(
                "tracking server %s unreachable (%s); spooling to %s, training goes on",
                self.tracking_uri,
                str(e).splitlines()[0][:200],
                self.spool.path,
            )
        self._retry_at = time.monotonic() + self.RETRY_S

    @_uninterrupted
    def log_params(self, params: dict[str, object]) -> None:
        self._write({"op": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    @_uninterrupted
    def set_tags(self, tags: dict[str, object]) -> None:
        self._write({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    @_uninterrupted
    def log_metrics(self, metrics: list[tuple[str, float, int, int]]) -> None:
        """(key, value, step, timestamp_ms) rows, sent in batches of MLflow's limit."""
        rows = [(k, float(v), int(step), int(ts)) for k, v, step, ts in metrics]
        self._write({"op": "metrics", "rows": rows})

    @_uninterrupted
    def log_text(self, text: str, artifact_file: str) -> None:
        self._write({"op": "text", "text": text, "artifact_file": artifact_file})

    @_uninterrupted
    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """An MLflow table (columns of equal length; shown by the UI's artifact view), once per file."""
        self._write({"op": "table", "data": data, "artifact_file": artifact_file})

    @_uninterrupted
    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._write({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    @_uninterrupted
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        local = str(Path(local_dir).resolve())
        self._write({"op": "artifacts", "local_dir": local, "artifact_path": artifact_path})

    def start_system_metrics(self, every_s: float, resume: bool = False) -> bool:
        """MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
        disk, network; system/gpu_* where pynvml finds a GPU) sampled every `every_s` seconds by a
        background thread until finish(). Needs psutil: without it, a warning and False."""
        from moeplat.track.spool import is_local

        if importlib.util.find_spec("psutil") is None:
            log.warning("system metrics need psutil (pip install psutil); not logged")
            return False
        if is_local(self.run_id):  # MLflow's sampler needs the run on the server; it is spooled
            log.info("system metrics: not logged, the run started while the tracking server was away")
            return False
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=every_s, resume_logging=resume, tracking_uri=self.tracking_uri
        )
        self._monitor.start()
        return True

    def stop_system_metrics(self) -> None:
        monitor, self._monitor = getattr(self, "_monitor", None), None
        if monitor is not None:
            with sigint_deferred():
                monitor.finish()

    @_uninterrupted
    def finish(self, status: str = "FINISHED") -> None:
        """Close the run; with a spool, one more replay is tried first (whatever the retry wait)."""
        try:
            self.stop_system_metrics()
        except Exception as e:  # its last sample could not be sent: not worth failing the run
            log.warning("system metrics: %s", str(e).splitlines()[0][:200])
        if self.spool is not None:
            self.replay_spool(force=True)
        self._write({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})

    def spool_pending(self) -> bool:
        return self.spool is not None and self.spool.pending()

    def metric_history(self, key: str) -> list:
        return self.client.get_metric_history(self.run_id, key)


VERSIONED = ("moeplat", "torch", "lightning", "mlflow", "optuna", "pydantic", "numpy")


def package_versions() -> dict[str, str]:
    """version.<package> of the packages a run's numbers depend on, and of Python."""
    out = {"version.python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out


def log_spec(run: TrackedRun, resolved: dict, files: list[str], overrides: list[str], tags: dict) -> None:
    """Params = every resolved spec leaf; tags = `tags`, git commit and dirty flag, host, package
    versions; artifacts = original files, resolved spec, overrides."""
    run.log_params(flatten(resolved))
    run.set_tags(
        {**tags, **git_state(Path(__file__).resolve().parent), "host": platform.node(), **package_versions()}
    )
    for i, f in enumerate(files):
        run.log_artifact(f, "spec/original" if i == 0 else "spec/bases")
    run.log_text(yaml.safe_dump(resolved, sort_keys=False), "spec/resolved.yaml")
    run.log_text("\n".join(overrides) + ("\n" if overrides else ""), "spec/overrides.txt")


def set_tags(
    tracking_uri: str, run_id: str, tags: dict[str, object], spool: str | Path | None = None
) -> None:
    """Tag an existing run without reopening it (e.g. a sweep trial's final state). With the run's
    `spool`, the tags wait there while the run has writes spooled or the server is away."""
    from mlflow import MlflowClient

    from moeplat.track.spool import Spool, is_unreachable, reachable, send

    record = {"op": "tags", "run_id": run_id, "tags": {k: str(v) for k, v in tags.items()}}
    queue = Spool(spool) if spool is not None else None
    if queue is not None and (queue.pending() or not reachable(tracking_uri)):
        return queue.append(record)
    try:
        send(MlflowClient(tracking_uri), record)
    except Exception as e:
        if queue is None or not is_unreachable(e):
            raise
        queue.append(record)


def fail_running_runs(
    tracking_uri: str, experiment: str, tags: dict[str, object], extra: dict | None = None
) -> int:
    """Close as FAILED the RUNNING runs carrying all `tags` (e.g. the run of a trial whose
    worker was killed and so never closed it), setting `extra` tags first. Returns how many."""
    from mlflow import MlflowClient

    from moeplat.track.spool import reachable

    if not reachable(tracking_uri):  # nothing to close there now; a sweep goes on without it
        log.warning("tracking server %s unreachable: runs of dead trials stay RUNNING", tracking_uri)
        return 0
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    query = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'RUNNING'"])
    runs = client.search_runs([exp.experiment_id], query)
    for r in runs:
        for k, v in (extra or {}).items():
            client.set_tag(r.info.run_id, k, str(v))
        client.set_terminated(r.info.run_id, status="FAILED")
    return len(runs)
