"""Sweep spec -> Optuna study on a shared storage; one trial = one `moeplat run` (an MLflow child run)."""

from __future__ import annotations

import logging
import math
import os
import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.sweep import LoadedSweep, SweepSpec
from moeplat.track.mlflow_run import absolute_sqlite

log = logging.getLogger(__name__)
# Heartbeats, retries and the matplotlib plots are marked experimental by Optuna; we rely on them knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
DEFAULT_STORAGE = "sqlite:///optuna.db"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def storage_url(sweep: SweepSpec | None, cli_storage: str | None) -> str:
    """--storage, the sweep's storage, $MOEPLAT_SWEEP_STORAGE, then sqlite:///optuna.db; made
    absolute, so worker processes and later commands find the same file whatever their cwd."""
    spec_storage = sweep.storage if sweep else None
    return absolute_sqlite(
        cli_storage or spec_storage or os.environ.get("MOEPLAT_SWEEP_STORAGE") or DEFAULT_STORAGE
    )


def make_storage(url: str, sweep: SweepSpec) -> RDBStorage:
    """RDB storage (SQLite embedded, PostgreSQL for teams) with heartbeats: a trial whose worker
    died stops beating, is marked FAIL after the grace period, and is retried up to max_retries."""
    t = sweep.trials
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return RDBStorage(
        url,
        engine_kwargs=engine,
        heartbeat_interval=t.heartbeat_s,
        grace_period=3 * t.heartbeat_s,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=t.max_retries),
    )


def make_sampler(sweep: SweepSpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Each worker gets its own seed (sweep.seed for worker 0): workers with one seed would
    propose the very same configurations in parallel. Modulo 2**32, numpy's seed range: the
    worker index defaults to the process id, and 7919 * pid passes it."""
    s, seed = sweep.sampler, (sweep.seed + 7919 * worker) % 2**32
    if s.kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=s.multivariate, n_startup_trials=s.n_startup_trials
        )
    if s.kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.kind == "grid":
        from moeplat.sweep.space import grid_space

        return optuna.samplers.GridSampler(grid_space(sweep), seed=seed)
    if s.kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if s.kind == "qmc":
        return optuna.samplers.QMCSampler(qmc_type=s.qmc_type, seed=seed)
    if s.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=seed)
    try:
        return optuna.samplers.GPSampler(seed=seed)
    except ImportError as e:  # GP needs scipy and torch
        raise SpecError(SpecIssue("sampler.kind", f"the gp sampler is not available here: {e}")) from None


def make_pruner(sweep: SweepSpec) -> optuna.pruners.BasePruner:
    p = sweep.pruner
    if p.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    if p.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(
    loaded: LoadedSweep, url: str, *, create: bool, resume: bool = False, worker: int = 0
) -> optuna.Study:
    sweep = loaded.sweep
    kwargs = dict(
        study_name=sweep.name,
        storage=make_storage(url, sweep),
        sampler=make_sampler(sweep, worker),
        pruner=make_pruner(sweep),
    )
    if not create:
        try:
            return optuna.load_study(**kwargs)
        except KeyError:
            raise SpecError(
                SpecIssue("", f"no study '{sweep.name}' in {url}; start it with `moeplat sweep`")
            ) from None
    directions = [o.direction for o in sweep.objectives]
    try:
        study = optuna.create_study(directions=directions, load_if_exists=resume, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        raise SpecError(
            SpecIssue(
                "name",
                f"a study '{sweep.name}' already exists in {url}: add --resume to continue it, "
                "or rename the sweep",
            )
        ) from None
    study.set_user_attr("sweep_file", os.path.abspath(loaded.path))
    # the objectives' metric names, so optuna-dashboard and our server name the axes (not objective0)
    study.set_metric_names([o.metric for o in sweep.objectives])
    return study


def create_for_workers(loaded: LoadedSweep, url: str) -> None:
    """The study that `moeplat sweep-worker` processes (a server's sweep jobs) will join, created
    once, up front. No sampler is built here (each worker brings its own seed; the gp sampler
    would import torch into the server)."""
    sweep = loaded.sweep
    try:
        study = optuna.create_study(
            study_name=sweep.name,
            storage=make_storage(url, sweep),
            directions=[o.direction for o in sweep.objectives],
            sampler=optuna.samplers.RandomSampler(),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise SpecError(
            SpecIssue("name", f"a study '{sweep.name}' already exists in the sweep storage: rename the sweep")
        ) from None
    study.set_user_attr("sweep_file", os.path.abspath(loaded.path))
    study.set_metric_names([o.metric for o in sweep.objectives])


SURPLUS_ATTR = "surplus"  # a trial started past n_trials by a worker that lost the race: not counted
PENDING = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)


def _counted(trials, below: int | None = None) -> list:
    """The trials that stand for a configuration of the n_trials: a trial that was retried (worker
    died) or re-queued (interrupted) counts once, through its last attempt; interrupted and
    surplus trials not at all. Finished ones and those running or waiting to run; with `below`,
    those numbered below it (a retry supersedes its earlier attempt whatever their numbers)."""
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    superseded |= {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [
        t
        for t in trials
        if (below is None or t.number < below)
        and t.state in FINISHED + PENDING
        and t.number not in superseded
        and not t.user_attrs.get("interrupted")
        and not t.user_attrs.get(SURPLUS_ATTR)
    ]


def finished_count(study: optuna.Study) -> int:
    """Finished configurations (see _counted)."""
    return sum(1 for t in _counted(study.get_trials(deepcopy=False)) if t.state in FINISHED)


def surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether trial `number`, just started, is one too many. Workers check `remaining` and then
    start a trial; two can pass the check for the last slot together. Trial numbers are handed out
    one at a time by the storage, so every worker ranks them the same way: a trial with n_trials
    counted trials (finished, running or waiting) below its number gives way, and n_trials is met
    exactly. A later failure below it (an interrupted trial) is made up by the workers' loop."""
    return len(_counted(study.get_trials(deepcopy=False), below=number)) >= n_trials


def progress(study: optuna.Study, n_trials: int) -> dict:
    """Trials by state, counted as `finished_count` does, against the sweep's n_trials."""
    counted = _counted(study.get_trials(deepcopy=False))
    by = {s: sum(1 for t in counted if t.state == s) for s in FINISHED + PENDING}
    State = optuna.trial.TrialState
    return {
        "n_trials": n_trials,
        "finished": sum(by[s] for s in FINISHED),
        "complete": by[State.COMPLETE],
        "pruned": by[State.PRUNED],
        "failed": by[State.FAIL],
        "running": by[State.RUNNING],
        "waiting": by[State.WAITING],
    }


def remaining(study: optuna.Study, n_trials: int) -> int:
    return max(0, n_trials - finished_count(study))


def objective_values(sweep: SweepSpec, result, counts) -> list[float]:
    values = []
    for o in sweep.objectives:
        if o.metric == "val/loss":
            v = result.val_loss
        elif o.metric == "val/ppl":
            v = math.exp(min(result.val_loss, 50.0)) if result.val_loss is not None else None
        elif o.metric == "val/bpb":
            v = result.val_bpb
        elif o.metric == "perf/tokens_per_s":
            v = result.tokens_per_s
        else:
            v = getattr(counts, o.metric.removeprefix("plan."))
        if v is None or not math.isfinite(v):
            raise RuntimeError(f"objective {o.metric} is {v}: the trial produced no usable value")
        values.append(float(v))
    return values


def sweep_file_of(study_name: str, cli_storage: str | None) -> str:
    """The sweep file a study was created from (recorded by `moeplat sweep`)."""
    url = storage_url(None, cli_storage)
    try:
        attrs = optuna.load_study(study_name=study_name, storage=url).user_attrs
    except KeyError:
        raise SpecError(SpecIssue("", f"no study '{study_name}' in {url} (and no such sweep file)")) from None
    return attrs["sweep_file"]
