"""Read-only Optuna queries for the job server's results endpoints (moeplat.server.results).

Plain, JSON-ready dicts: a study's trials (values, params, the MLflow run of each trial), its best
trial or Pareto front (moeplat.sweep.report.best_trials) and parameter importances
(report.importances; for a multi-objective study Optuna's joint ones and one set per objective).
Reading never creates anything: a SQLite storage file that does not exist means "no such study".
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings

import optuna

from moeplat.sweep.report import best_trials, importances
from moeplat.sweep.study import progress, storage_url

log = logging.getLogger(__name__)
RUN_ATTR = "mlflow_run_id"  # set on each trial by moeplat.sweep.worker


class NotFound(LookupError):
    """An unknown study (HTTP 404); str(e) says which."""


@functools.lru_cache(maxsize=8)
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per URL for the life of the server process."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def _absent(url: str) -> bool:
    """A SQLite storage file that does not exist (opening it would create it)."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return False
    return not os.path.exists("/" + url.removeprefix("sqlite:///").lstrip("/"))


def _load(storage: str | None, name: str) -> tuple[optuna.Study, int]:
    url = storage_url(None, storage)
    if _absent(url):
        raise NotFound(f"unknown study {name!r} (no Optuna storage at {url})")
    st = _storage(url)
    try:
        study_id = st.get_study_id_from_name(name)
    except KeyError:
        raise NotFound(f"unknown study {name!r}") from None
    return optuna.load_study(study_name=name, storage=st), study_id


def _num(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def dashboard_link(dashboard_url: str | None, study_id: int) -> str | None:
    """optuna-dashboard's page of one study (its route is /dashboard/studies/<id>)."""
    return f"{dashboard_url.rstrip('/')}/dashboard/studies/{study_id}" if dashboard_url else None


def _metrics(study: optuna.Study) -> list[str]:
    """The objectives' names: Optuna's metric names when the study has them, else objective0.."""
    names = study.metric_names
    return list(names) if names else [f"objective{i}" for i in range(len(study.directions))]


def _trial(t: optuna.trial.FrozenTrial) -> dict:
    return {
        "number": t.number,
        "state": t.state.name,
        "values": [_num(v) for v in t.values] if t.values is not None else None,
        "params": dict(t.params),
        "run_id": t.user_attrs.get(RUN_ATTR),
        "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
        "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
    }


def _importances(study: optuna.Study, metrics: list[str]) -> tuple[dict, dict[str, dict[str, float]]]:
    """(importances, by objective). One objective: report.importances. Several: Optuna's joint
    importances (its default evaluator, PED-ANOVA, ranks the trials by Pareto dominance) and one
    set per objective, the target negated for a maximised one (PED-ANOVA looks for low values).
    ({}, {}) with fewer than 3 complete trials."""
    if len(study.directions) == 1:
        return {k: float(v) for k, v in importances(study).items()}, {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}, {}
    targets = {"": None}
    for i, (metric, d) in enumerate(zip(metrics, study.directions, strict=True)):
        sign = -1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0
        targets[metric] = lambda t, i=i, sign=sign: sign * t.values[i]
    out: dict[str, dict[str, float]] = {}
    for metric, target in targets.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "computes ... low `target` values"
                got = optuna.importance.get_param_importances(study, target=target)
        except (RuntimeError, ValueError) as e:  # e.g. a single distinct value everywhere
            log.info("no importances for %s: %s", metric or "the study", e)
            continue
        out[metric] = {k: float(v) for k, v in got.items()}
    return out.pop("", {}), out


def best_values(study: optuna.Study) -> list[float | None] | None:
    """The best value reached for each objective over the complete trials (for a single objective,
    the best trial's value); None before any trial completes."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return None
    out = []
    for i, d in enumerate(study.directions):
        pick = max if d == optuna.study.StudyDirection.MAXIMIZE else min
        out.append(_num(pick(t.values[i] for t in complete)))
    return out


def study_detail(storage: str | None, name: str, dashboard_url: str | None = None) -> dict:
    """Every trial, the Pareto front (for a single objective: the best trial) as trial numbers,
    importances (for several objectives also `importances_by_metric`, one set per objective)."""
    study, study_id = _load(storage, name)
    metrics = _metrics(study)
    joint, by_metric = _importances(study, metrics)
    return {
        "name": name,
        "directions": [d.name.lower() for d in study.directions],
        "metrics": metrics,
        "trials": [_trial(t) for t in study.get_trials(deepcopy=False)],
        "pareto": [t.number for t in best_trials(study)],
        "importances": joint,
        "importances_by_metric": by_metric,
        "dashboard_url": dashboard_link(dashboard_url, study_id),
    }


def study_summary(storage: str | None, name: str, dashboard_url: str | None = None) -> dict:
    """StudySummary of the server contract; NotFound for an unknown study."""
    study, study_id = _load(storage, name)
    return {
        "name": name,
        "n_trials": len(study.get_trials(deepcopy=False)),
        "best_values": best_values(study),
        "directions": [d.name.lower() for d in study.directions],
        "dashboard_url": dashboard_link(dashboard_url, study_id),
    }


def study_progress(storage: str | None, name: str, n_trials: int) -> dict:
    """Trials by state against n_trials (moeplat.sweep.study.progress); NotFound for an unknown study."""
    study, _ = _load(storage, name)
    return progress(study, n_trials)


def all_summaries(storage: str | None, dashboard_url: str | None = None) -> list[dict]:
    """StudySummary of every study in the storage, in creation order ([] without a storage)."""
    url = storage_url(None, storage)
    if _absent(url):
        return []
    st = _storage(url)
    return [study_summary(url, s.study_name, dashboard_url) for s in st.get_all_studies()]
