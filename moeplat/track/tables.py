"""MLflow tables on a run after it ended: `moeplat generate --log` appends its samples to the
run's samples/generate.json, one row per prompt (MlflowClient.log_table appends to an existing
table and lists the file as a table for the UI's artifact view)."""

from __future__ import annotations

from moeplat.track.model_store import RunNotFound, _client


def append_table(tracking_uri: str, run_id: str, data: dict[str, list], artifact_file: str) -> None:
    """Append `data` (column -> values, all of one length) to table `artifact_file` of run
    `run_id`, finished or not; RunNotFound when there is no such run."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise RunNotFound(f"no run {run_id!r} in {tracking_uri} (check the id or pass --tracking-uri)") from e
    client.log_table(run_id, data=data, artifact_file=artifact_file)
