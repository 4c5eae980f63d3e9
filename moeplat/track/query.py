"""Read-only MLflow queries for the job server's results endpoints (moeplat.server.results).

Plain functions returning plain, JSON-ready dicts: a run summary (params, last metrics, tags, a link
into the MLflow UI), metric histories as [step, value] pairs, and the last per-expert load
fractions as a layer x expert matrix (the `moe/layerNN/load/eXX` telemetry of
moeplat.nn.stats.moe_metrics). Selection and the load matrix reuse moeplat.track.compare.
Non-finite numbers (a diverged loss) become None: JSON has no NaN.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from moeplat.track.compare import CURVES, CompareError, _client, _final_load
from moeplat.track.mlflow_run import JOB_ID_TAG

# MLflow's own rule for run ids (mlflow.utils.validation); anything else is a malformed id
RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")
# per-expert / per-rank telemetry: hundreds of keys in a large model, served by expert_load() instead
_PER_EXPERT = re.compile(r"^moe/layer\d+/(load/e\d+|bias/e\d+|ep_load/r\d+)$")
MAX_KEYS = 50  # metric histories per request


class NotFound(LookupError):
    """An unknown run or experiment (HTTP 404); str(e) says which."""


def prepare_store(tracking_uri: str) -> None:
    """Create a local (SQLite) MLflow store's tables now, at server start: otherwise the first job's
    process and the first results query can race to create them ("table ... already exists")."""
    from mlflow import MlflowClient

    from moeplat.track.mlflow_run import absolute_sqlite

    uri = absolute_sqlite(tracking_uri)
    if uri.startswith("sqlite:///"):
        MlflowClient(uri).search_experiments(max_results=1)


def valid_run_id(run_id: str) -> bool:
    return bool(RUN_ID.match(run_id))


def _num(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds") if ms else None


def _open(tracking_uri: str):
    """The MlflowClient, or None when the SQLite store does not exist yet (nothing was logged)."""
    try:
        return _client(tracking_uri)
    except CompareError:
        return None


def mlflow_url(ui_url: str | None, experiment_id: str, run_id: str) -> str | None:
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if ui_url else None


def run_summary(run, experiment: str, ui_url: str | None = None) -> dict:
    """RunSummary of the server contract (plus experiment_id and end_time)."""
    info = run.info
    return {
        "run_id": info.run_id,
        "name": info.run_name or info.run_id[:8],
        "status": info.status,
        "experiment": experiment,
        "experiment_id": info.experiment_id,
        "start_time": _iso(info.start_time),
        "end_time": _iso(info.end_time),
        "params": dict(run.data.params),
        "metrics": {k: _num(v) for k, v in sorted(run.data.metrics.items()) if not _PER_EXPERT.match(k)},
        "tags": dict(run.data.tags),
        "mlflow_url": mlflow_url(ui_url, info.experiment_id, info.run_id),
    }


def _summaries(client, runs, ui_url: str | None) -> list[dict]:
    names: dict[str, str] = {}
    out = []
    for r in runs:
        exp_id = r.info.experiment_id
        if exp_id not in names:
            names[exp_id] = client.get_experiment(exp_id).name
        out.append(run_summary(r, names[exp_id], ui_url))
    return out


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    from moeplat.track.spool import find_local, is_local

    if client is None:
        raise NotFound(f"unknown run id {run_id!r}")
    if is_local(run_id):  # a run (e.g. a sweep trial) that started while the server was down
        run_id = find_local(client, run_id) or run_id
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NotFound(f"unknown run id {run_id!r}") from None
        raise


def runs_by_ids(tracking_uri: str, run_ids: list[str], ui_url: str | None = None) -> list[dict]:
    """The named runs in the order given (duplicates once); NotFound names the first unknown id."""
    client = _open(tracking_uri)
    runs = [_get_run(client, rid) for rid in dict.fromkeys(run_ids)]
    return _summaries(client, runs, ui_url)


def runs_by_tag(
    tracking_uri: str, key: str, value: str, ui_url: str | None = None, limit: int = 1000
) -> list[dict]:
    """Runs of every experiment whose tag `key` equals `value`, newest first ([] without a store)."""
    client = _open(tracking_uri)
    if client is None:
        return []
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    escaped = value.replace("'", "\\'")
    runs = client.search_runs(
        exp_ids, f"tags.`{key}` = '{escaped}'", max_results=limit, order_by=["attributes.start_time DESC"]
    )
    return _summaries(client, runs, ui_url)


def runs_of_job(tracking_uri: str, job_id: int, ui_url: str | None = None) -> list[dict]:
    """The runs a server job made: the worker runs it with MOEPLAT_JOB_ID, which tags them."""
    return runs_by_tag(tracking_uri, JOB_ID_TAG, str(int(job_id)), ui_url)


def runs_of_experiment(
    tracking_uri: str, experiment: str, ui_url: str | None = None, limit: int = 100
) -> list[dict]:
    client = _open(tracking_uri)
    exp = client.get_experiment_by_name(experiment) if client is not None else None
    if exp is None:
        raise NotFound(f"unknown experiment {experiment!r}")
    runs = client.search_runs([exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    return _summaries(client, runs, ui_url)


def metric_history(tracking_uri: str, run_id: str, keys: list[str] = CURVES) -> dict[str, list[list]]:
    """key -> [[step, value], ...] sorted by step (then time); [] for a key the run never logged."""
    client = _open(tracking_uri)
    run_id = _get_run(client, run_id).info.run_id
    out = {}
    for key in dict.fromkeys(keys):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        out[key] = [[m.step, _num(m.value)] for m in hist]
    return out


def expert_load(tracking_uri: str, run_id: str) -> dict:
    """The last logged load fraction of every expert of every MoE layer (rows sum to 1: the share
    of the layer's routed token-slots each expert received) and the step it was logged at."""
    client = _open(tracking_uri)
    run = _get_run(client, run_id)
    run_id = run.info.run_id
    load_LE, layers = _final_load(run.data.metrics)
    step = None
    if layers:
        hist = client.get_metric_history(run_id, f"moe/layer{layers[0]:02d}/load/e00")
        step = max((m.step for m in hist), default=None)
    return {
        "layers": [f"layer{n:02d}" for n in layers],
        "experts": len(load_LE[0]) if load_LE else 0,
        "load": [[_num(v) for v in row] for row in load_LE],
        "step": step,
    }
