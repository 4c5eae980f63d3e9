"""A disk spool for MLflow writes made while the tracking server is unreachable.

Each write a TrackedRun could not send is one JSON line in `run_dir/mlflow-spool.jsonl`: an `op`
(metrics, params, tags, status, text, artifact, artifacts, terminate), the run id and the
payload. Replay sends the lines in order and deletes the file once all are sent; a replay cut
short keeps the unsent tail. Replay is idempotent, so a line sent twice (sent, then the process
died before the file was rewritten) does no harm: a metric row keeps the timestamp it was logged
with, and MLflow's SQL stores ignore a row whose (key, step, timestamp, value) the run already has;
params are re-sent with the same value, tags and status overwrite, artifacts overwrite. (MLflow's
plain file store does not deduplicate metric rows; team mode uses a SQL backend.)

Artifacts are spooled by local path (the run directory's plots/ and model/), so a later sync
uploads what is there at that time; texts are spooled inline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

SPOOL_FILE = "mlflow-spool.jsonl"
# Applied (unless already set) to a TrackedRun with a spool on an http(s) server, so a write to a
# dead server fails in seconds rather than after MLflow's default of 7 retries with backoff 2 (minutes).
SHORT_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


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
    """Append-only JSON lines of unsent writes, replayed in order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def pending(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

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

    def replay(self, send: Callable[[dict], None]) -> int:
        """Send every record in order; the file is deleted when all went through. On a failure the
        unsent records (the failing one first) are written back and the error propagates."""
        records = self.records()
        for i, record in enumerate(records):
            try:
                send(record)
            except BaseException:
                self._rewrite(records[i:])
                raise
        self.path.unlink(missing_ok=True)
        return len(records)

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


def send(client, record: dict) -> None:
    """Perform one spooled write with an MlflowClient."""
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record["run_id"]
    if op == "metrics":
        rows = [Metric(k, float(v), int(ts), int(step)) for k, v, step, ts in record["rows"]]
        for i in range(0, len(rows), 1000):  # MLflow's log_batch limit
            client.log_batch(run_id, metrics=rows[i : i + 1000])
    elif op == "params":
        items = [Param(k, v) for k, v in record["params"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif op == "status":
        client.update_run(run_id, status=record["status"])
    elif op == "terminate":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    elif op == "text":
        client.log_text(run_id, record["text"], record["artifact_file"])
    elif op == "artifact":
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif op == "artifacts":
        client.log_artifacts(run_id, record["local_dir"], record["artifact_path"])
    else:
        raise ValueError(f"unknown spool record op {op!r}")
