"""A disk spool for MLflow writes made while the tracking server is unreachable.

Each write a TrackedRun could not send is one JSON line in `run_dir/mlflow-spool.jsonl`: an `op`
(metrics, params, tags, status, text, table, artifact, artifacts, terminate), the run id and the
payload. Replay sends the lines in order and deletes the file once all are sent; a replay cut
short keeps the unsent tail. Replay is idempotent, so a line sent twice (sent, then the process
died before the file was rewritten) does no harm: a metric row keeps the timestamp it was logged
with, and MLflow's SQL stores ignore a row whose (key, step, timestamp, value) the run already has;
params are re-sent with the same value, tags and status overwrite, artifacts overwrite. (MLflow's
plain file store does not deduplicate metric rows; team mode uses a SQL backend.)

Artifacts are spooled by local path (the run directory's plots/ and model/), so a later sync
uploads what is there at that time; one from outside the run directory (a spec file, a temporary
plot) is copied to `spooled-artifacts/` first. Texts are spooled inline.

A run started while the server is away has no MLflow run id yet: it gets a local one
(`local-<uuid>`) and its first spooled line is a `create` (experiment, name, tags, start time).
Replay creates the MLflow run there, tagged `moeplat.local_run_id`, and sends the later lines to
the new id; the tag makes the create idempotent (a replay cut short after it finds the run again)
and lets a sweep trial find its parent run: a `mlflow.parentRunId` naming a local id is resolved
when the parent exists, and set on the children when the parent is created after them.
The run's `run.json`, next to the spool, is rewritten with the new id.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

SPOOL_FILE = "mlflow-spool.jsonl"
KEPT_DIR = "spooled-artifacts"  # copies of artifacts from outside the run directory, until sent
LOCAL_ID_PREFIX = "local-"
LOCAL_ID_TAG = "moeplat.local_run_id"  # on an MLflow run created from a spool: the id it had
PARENT_LOCAL_TAG = "moeplat.parent_local_run_id"  # a child whose parent run is not created yet
PARENT_TAG = "mlflow.parentRunId"
# One request to an http(s) tracking server before a run counts on it: a dead server is known in
# this long at most, instead of after MLflow's retries (10 s and more per request).
PROBE_TIMEOUT_S = float(os.environ.get("MOEPLAT_TRACKING_PROBE_S", "3"))
# Applied (unless already set) to a TrackedRun with a spool on an http(s) server, so a write to a
# dead server fails in seconds rather than after MLflow's default of 7 retries with backoff 2 (minutes).
SHORT_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def new_local_id() -> str:
    return LOCAL_ID_PREFIX + uuid.uuid4().hex


def is_local(run_id: str | None) -> bool:
    return bool(run_id) and run_id.startswith(LOCAL_ID_PREFIX)


def reachable(tracking_uri: str, timeout_s: float | None = None) -> bool:
    """Whether an http(s) tracking server answers a request within `timeout_s`: any HTTP answer
    below 500 (a 404 or 401 from a proxy in front of it too), or a TLS handshake MLflow may be told
    to accept. Other stores are local: True. A refused connection answers at once; a server that
    accepts connections but never answers costs the timeout, not MLflow's retries of every request."""
    import ssl
    import urllib.error
    import urllib.request

    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return True
    try:
        with urllib.request.urlopen(
            tracking_uri.rstrip("/") + "/health", timeout=timeout_s or PROBE_TIMEOUT_S
        ):
            return True
    except urllib.error.HTTPError as e:  # a proxy's 502/503/504: the tracking server behind it is away
        return e.code < 500
    except urllib.error.URLError as e:
        return isinstance(e.reason, ssl.SSLError)
    except (OSError, ValueError):  # timed out, reset, a malformed URI
        return False


def is_unreachable(exc: BaseException) -> bool:
    """The server could not be reached (refused, reset, timed out, retries exhausted on 5xx), as
    opposed to a request it rejected. MLflow wraps the requests error in an MlflowException
    (raised inside the `except`, so it is the exception's __context__)."""
    import requests

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (*kinds, ConnectionError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class Spool:
    """Append-only JSON lines of unsent writes, replayed in order. `created` maps the local run
    ids this spool's replays created MLflow runs for to those runs' ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created: dict[str, str] = {}

    def pending(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(self._kept(record)) + "\n")

    def _kept(self, record: dict) -> dict:
        """An artifact from outside the run directory (a temporary file, e.g. a sweep's plots) is
        copied next to the spool: it may be gone by the time the spool is sent."""
        key = {"artifact": "path", "artifacts": "local_dir"}.get(record["op"])
        if key is None or Path(record[key]).resolve().is_relative_to(self.path.parent.resolve()):
            return record
        dest = self.path.parent.resolve() / KEPT_DIR / uuid.uuid4().hex / Path(record[key]).name
        dest.parent.mkdir(parents=True)
        (shutil.copytree if key == "local_dir" else shutil.copy2)(record[key], dest)
        return {**record, key: str(dest)}

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        # a line cut by a crash mid-write is the last one and was never acknowledged: drop it
        out = []
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise
        return out

    def replay(self, send: Callable[[dict], str | None]) -> int:
        """Send every record in order (`send` returns the new run id of a `create`); the file is
        deleted when all went through. On a failure the unsent records (the failing one first) are
        written back, with the run ids created so far, and the error propagates."""
        records = self.records()
        for i, record in enumerate(records):
            record = self._mapped(record)
            try:
                new_id = send(record)
            except BaseException:
                self._rewrite([self._mapped(r) for r in records[i:]])
                raise
            if record["op"] == "create":
                self._created(record["run_id"], new_id)
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.path.parent / KEPT_DIR, ignore_errors=True)  # every copy is sent
        return len(records)

    def _mapped(self, record: dict) -> dict:
        real = self.created.get(record["run_id"])
        return {**record, "run_id": real} if real and record["op"] != "create" else record

    def _created(self, local_id: str, run_id: str) -> None:
        """Remember the new id, and put it in the run's run.json (next to the spool) so that
        `--resume` and later syncs continue the MLflow run."""
        self.created[local_id] = run_id
        state_file = self.path.parent / "run.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return
        if state.get("run_id") == local_id:
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({**state, "run_id": run_id}, indent=2))
            os.replace(tmp, state_file)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)


def sync(path: str | Path, tracking_uri: str) -> int:
    """Replay the spool at `path` to the server at `tracking_uri` (`moeplat sync`); how many records."""
    from mlflow import MlflowClient

    from moeplat.track.mlflow_run import absolute_sqlite

    client = MlflowClient(absolute_sqlite(tracking_uri))
    return Spool(path).replay(lambda record: send(client, record))


def send(client, record: dict) -> str | None:
    """Perform one spooled write with an MlflowClient; a `create` returns the new run's id."""
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record["run_id"]
    if op == "create":
        return create_run(client, record)
    if is_local(run_id):  # its create was sent by an earlier replay
        run_id = find_local(client, run_id)
        if run_id is None:
            raise RuntimeError(f"no MLflow run was created for {record['run_id']}: its spool lost the create")
    if op == "metrics":
        rows = [Metric(k, float(v), int(ts), int(step)) for k, v, step, ts in record["rows"]]
        for i in range(0, len(rows), 1000):  # MLflow's log_batch limit
            client.log_batch(run_id, metrics=rows[i : i + 1000])
    elif op == "params":
        items = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    elif op == "tags":
        tags = parent_resolved(client, record["tags"])
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    elif op == "status":
        client.update_run(run_id, status=record["status"])
    elif op == "terminate":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "table":  # log_table appends to an existing file: a replayed one is not sent twice
        folder = os.path.dirname(record["artifact_file"]) or None
        if record["artifact_file"] not in {a.path for a in client.list_artifacts(run_id, folder)}:
            client.log_table(run_id, data=record["data"], artifact_file=record["artifact_file"])
    elif op == "artifact":
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif op == "artifacts":
        client.log_artifacts(run_id, record["local_dir"], record["artifact_path"])
    else:
        raise ValueError(f"unknown spool record op {op!r}")
    return None


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing. Two runs starting at once (a sweep's
    workers, `xargs -P`) both find it missing; the loser's create fails on the unique name and it
    takes the winner's."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """experiment_id on a fresh client: also migrates a new SQLite store's schema, which two
    processes starting on it at once would both try (and one fail)."""
    from mlflow import MlflowClient

    return experiment_id(MlflowClient(tracking_uri), name)


def create_run(client, record: dict) -> str:
    """The MLflow run of a run that started while the server was away; the one an earlier,
    interrupted replay created if there is one. Children created before it are attached to it."""
    local = record["run_id"]
    exp_id = experiment_id(client, record["experiment"])
    existing = find_local(client, local, [exp_id])
    if existing:
        return existing
    tags = parent_resolved(client, {**record["tags"], LOCAL_ID_TAG: local})
    run = client.create_run(exp_id, start_time=record["start_time"], tags=tags, run_name=record["run_name"])
    for child in _tagged(client, PARENT_LOCAL_TAG, local):
        client.set_tag(child.info.run_id, PARENT_TAG, run.info.run_id)
        client.delete_tag(child.info.run_id, PARENT_LOCAL_TAG)
    return run.info.run_id


def parent_resolved(client, tags: dict[str, str]) -> dict[str, str]:
    """A sweep trial's parent named by its local id: the parent's MLflow run id once it exists;
    until then the local id waits in PARENT_LOCAL_TAG for the parent's create (above)."""
    parent = tags.get(PARENT_TAG)
    if not is_local(parent):
        return tags
    tags = dict(tags)
    real = find_local(client, parent)
    if real:
        tags[PARENT_TAG] = real
    else:
        tags[PARENT_LOCAL_TAG] = tags.pop(PARENT_TAG)
    return tags


def find_local(client, local_id: str, experiment_ids: list[str] | None = None) -> str | None:
    """The MLflow run created for `local_id`, if any."""
    runs = _tagged(client, LOCAL_ID_TAG, local_id, experiment_ids)
    return runs[0].info.run_id if runs else None


def _tagged(client, key: str, value: str, experiment_ids: list[str] | None = None) -> list:
    from mlflow.entities import ViewType

    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiment_ids:
        return []
    return client.search_runs(experiment_ids, f"tags.`{key}` = '{value}'", run_view_type=ViewType.ALL)
