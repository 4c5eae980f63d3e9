"""Results endpoints of the job server: MLflow runs and Optuna studies, read-only.

`router` holds GET /api/runs, /api/runs/{run_id}/history, /api/runs/{run_id}/load, /api/studies
and /api/studies/{name} (docs/server.md has the contract); `job_runs` and `job_studies` serve
/api/jobs/{id}/runs and /api/jobs/{id}/studies in app.py. Settings come from
`request.app.state.settings` (tracking_uri, sweep_storage, mlflow_ui_url, dashboard_url).
MLflow is read through moeplat.track.query and Optuna through moeplat.sweep.query, imported
lazily: the server starts without loading either.

Errors are `{"detail": str}`: 404 for an unknown run, experiment or study, 422 for a malformed
request, 502 when the tracking or sweep store itself fails (the traceback goes to the log only).
Handlers are plain `def`s: FastAPI runs them in its thread pool, as the stores' clients block.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request

log = logging.getLogger(__name__)
router = APIRouter(tags=["results"])
MAX_IDS = 100
_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@\s]+@")  # postgresql://user:secret@host -> user:***@host


def _redact(text: str) -> str:
    return _PASSWORD.sub(r"\1:***@", text)


def _settings(request: Request):
    return request.app.state.settings


def _call(store: str, fn: Callable, *args: Any) -> Any:
    """Run one store query: NotFound -> 404 with its message, any other failure -> 502."""
    from moeplat.sweep.query import NotFound as NoStudy
    from moeplat.track.query import NotFound as NoRun

    try:
        return fn(*args)
    except (NoRun, NoStudy) as e:
        raise HTTPException(404, detail=_redact(str(e))) from None
    except Exception as e:
        log.exception("%s query %s failed", store, fn.__name__)
        first = _redact((str(e).splitlines() or [""])[0])[:300]
        raise HTTPException(502, detail=f"the {store} store failed: {type(e).__name__}: {first}") from None


def _run_id(run_id: str) -> str:
    from moeplat.track.query import valid_run_id

    if not valid_run_id(run_id):
        raise HTTPException(
            422, detail=f"malformed run id {run_id[:80]!r}: MLflow run ids are letters, digits, _ and -"
        )
    return run_id


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@router.get("/api/runs")
def list_runs(
    request: Request,
    ids: str | None = Query(None, description="comma-separated MLflow run ids"),
    job: str | None = Query(None, description="a job id: the runs tagged moeplat.job_id"),
    experiment: str | None = Query(None, description="an MLflow experiment name"),
    limit: int = Query(100, ge=1, le=1000, description="most runs of an experiment, newest first"),
) -> dict:
    """`{"runs": [RunSummary]}` for exactly one of ids=, job= or experiment=."""
    from moeplat.track import query

    given = [name for name, v in (("ids", ids), ("job", job), ("experiment", experiment)) if v is not None]
    if len(given) != 1:
        raise HTTPException(
            422,
            detail="give exactly one of ids=, job= or experiment= (got " + (", ".join(given) or "none") + ")",
        )
    s = _settings(request)
    if ids is not None:
        run_ids = [_run_id(r) for r in _split(ids)]
        if not run_ids or len(run_ids) > MAX_IDS:
            raise HTTPException(422, detail=f"ids= takes 1 to {MAX_IDS} comma-separated run ids")
        runs = _call("MLflow", query.runs_by_ids, s.tracking_uri, run_ids, s.mlflow_ui_url)
    elif job is not None:
        if not (job.isascii() and job.isdigit() and 0 < len(job) <= 18 and int(job) > 0):
            raise HTTPException(422, detail=f"job= takes a job id (a positive integer), not {job[:80]!r}")
        runs = _call("MLflow", query.runs_of_job, s.tracking_uri, int(job), s.mlflow_ui_url)
    else:
        if not experiment.strip():
            raise HTTPException(422, detail="experiment= is empty")
        runs = _call("MLflow", query.runs_of_experiment, s.tracking_uri, experiment, s.mlflow_ui_url, limit)
    return {"runs": runs}


@router.get("/api/runs/{run_id}/history")
def run_history(
    request: Request,
    run_id: str,
    keys: str = Query("train/loss,val/loss", description="comma-separated metric keys"),
) -> dict:
    """`{"history": {key: [[step, value], ...]}}`; a key the run never logged maps to []."""
    from moeplat.track import query

    _run_id(run_id)
    wanted = _split(keys)
    if not wanted or len(wanted) > query.MAX_KEYS or any(len(k) > 250 for k in wanted):
        raise HTTPException(422, detail=f"keys= takes 1 to {query.MAX_KEYS} comma-separated metric keys")
    s = _settings(request)
    return {"history": _call("MLflow", query.metric_history, s.tracking_uri, run_id, wanted)}


@router.get("/api/runs/{run_id}/load")
def run_load(request: Request, run_id: str) -> dict:
    """`{"layers": ["layer01", ...], "experts": E, "load": [[fraction per expert] per layer], "step"}`:
    the last logged per-expert load fractions (all empty for a run without MoE telemetry)."""
    from moeplat.track import query

    _run_id(run_id)
    return _call("MLflow", query.expert_load, _settings(request).tracking_uri, run_id)


@router.get("/api/studies")
def list_studies(request: Request) -> dict:
    """`{"studies": [StudySummary]}`: every study in the server's sweep storage."""
    from moeplat.sweep import query

    s = _settings(request)
    return {"studies": _call("Optuna", query.all_summaries, s.sweep_storage, s.dashboard_url)}


@router.get("/api/studies/{name}")
def study(request: Request, name: str) -> dict:
    """Trials (values, params, run_id), the Pareto front, importances, a dashboard link."""
    from moeplat.sweep import query

    if not name.strip() or len(name) > 512:
        raise HTTPException(422, detail="a study name is 1 to 512 characters")
    s = _settings(request)
    return _call("Optuna", query.study_detail, s.sweep_storage, name, s.dashboard_url)


def job_runs(settings, job_id: int) -> list[dict]:
    """RunSummaries of the MLflow runs tagged moeplat.job_id = job_id, newest first, for
    GET /api/jobs/{id}/runs. [] while the job has logged nothing; 502 (HTTPException) when MLflow fails."""
    from moeplat.track import query

    return _call("MLflow", query.runs_of_job, settings.tracking_uri, job_id, settings.mlflow_ui_url)


def job_studies(settings, study: str | None, storage: str | None = None) -> list[dict]:
    """[StudySummary] of a sweep job's study (from `storage`, else settings.sweep_storage), for
    GET /api/jobs/{id}/studies; [] for a run job or a study not created yet."""
    from moeplat.sweep import query

    if not study:
        return []
    try:
        return [
            _call(
                "Optuna",
                query.study_summary,
                storage or settings.sweep_storage,
                study,
                settings.dashboard_url,
            )
        ]
    except HTTPException as e:
        if e.status_code == 404:
            return []
        raise
