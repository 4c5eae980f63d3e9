"""Small text artifacts of finished runs, written and read after the run: the routing view
(`moeplat route --log` writes routing/route.html and routing/route.json; the job server reads them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moeplat.track.model_store import RunNotFound, _client


def log_texts(tracking_uri: str, run_id: str, artifact_dir: str, files: dict[str, str]) -> list[str]:
    """Store each name -> text of `files` as artifact `artifact_dir`/name of run `run_id` (finished
    or not); returns the artifact paths. RunNotFound when there is no such run."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise RunNotFound(f"no run {run_id!r} in {tracking_uri} (check the id or pass --tracking-uri)") from e
    with tempfile.TemporaryDirectory(prefix="moeplat-artifacts-") as tmp:
        for name, text in files.items():
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            client.log_artifact(run_id, str(path), artifact_dir)
    return [f"{artifact_dir}/{name}" for name in files]


def read_text(tracking_uri: str, run_id: str, path: str) -> str | None:
    """The text of artifact `path` ("routing/route.html") of run `run_id`; None when the run has no
    such artifact. Unknown runs raise moeplat.track.query.NotFound (the server's 404)."""
    from mlflow.exceptions import MlflowException

    from moeplat.track.query import _get_run, _open

    client = _open(tracking_uri)  # None (no store yet): _get_run says the run is unknown
    run_id = _get_run(client, run_id).info.run_id
    folder = os.path.dirname(path)
    if path not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="moeplat-artifact-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except MlflowException:
            return None
        return Path(local).read_text(encoding="utf-8")
