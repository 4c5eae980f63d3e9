"""The model artifact of a run, read back from MLflow: find the run, download model/, register it.

What model/ holds is written by moeplat.train.model_artifact (weights.pt, spec.yaml, meta.json).
"""

from __future__ import annotations

import os
from pathlib import Path

from moeplat.track.mlflow_run import absolute_sqlite

MODEL_DIR = "model"


class RunNotFound(Exception):
    """A user mistake: no such run, no MLflow store there, or the run has no model/ artifact."""


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    uri = absolute_sqlite(tracking_uri)
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        path = "/" + uri.removeprefix("sqlite:///").lstrip("/")
        if not os.path.exists(path):  # MlflowClient would silently create an empty store
            raise RunNotFound(f"no MLflow store at {path} (pass --tracking-uri)")
    return MlflowClient(uri)


def download_model(tracking_uri: str, run_id: str, dst: str | Path) -> tuple[Path, object]:
    """Download run `run_id`'s model/ into `dst`; returns (local model dir, the MLflow run)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise RunNotFound(f"no run {run_id!r} in {tracking_uri} (check the id or pass --tracking-uri)") from e
    names = {a.path for a in client.list_artifacts(run_id, MODEL_DIR)}
    if f"{MODEL_DIR}/weights.pt" not in names:
        raise RunNotFound(
            f"run {run_id!r} ({run.info.run_name}, {run.info.status}) has no model/weights.pt artifact: "
            "it did not finish, or ran with tracking.log_model: false"
        )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # 3 small files
    local = client.download_artifacts(run_id, MODEL_DIR, str(dst))
    return Path(local), run


def download_artifact_dir(tracking_uri: str, run_id: str, name: str, dst: str | Path) -> Path | None:
    """Download run `run_id`'s artifact directory `name` (e.g. tokenizer/) into `dst`; None if the
    run has none."""
    client = _client(tracking_uri)
    if not client.list_artifacts(run_id, name):
        return None
    return Path(client.download_artifacts(run_id, name, str(dst)))


def register_model(tracking_uri: str, run_id: str, name: str) -> str:
    """Register run `run_id`'s model/ in the MLflow model registry under `name`; returns the version."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="moeplat model: weights.pt + resolved spec.yaml")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
    version = client.create_model_version(name, source, run_id=run_id, tags={"moeplat.format": "weights.pt"})
    return str(version.version)


def log_metrics_to_run(
    tracking_uri: str, run_id: str, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None
) -> None:
    """Add `metrics` (at `step`) and `tags` to an existing run, finished or not: what is measured
    on a run's model later (moeplat eval --tasks) sits beside what training logged."""
    import time

    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )
