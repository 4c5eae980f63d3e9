"""Run trials of a study until it has its n_trials: the loop every worker process runs."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path

import optuna

from moeplat.errors import SpecError
from moeplat.spec import load_spec
from moeplat.spec.plan import plan
from moeplat.spec.sweep import LoadedSweep, MaxActiveParams
from moeplat.sweep.pruning import PruneOnValidation
from moeplat.sweep.space import suggest
from moeplat.sweep.study import (
    PARENT_RUN_ATTR,
    SURPLUS_ATTR,
    objective_values,
    open_study,
    remaining,
    surplus,
)

log = logging.getLogger(__name__)
State = optuna.trial.TrialState
# A trial keeps no checkpoint unless the sweep's overrides (or search) set train.checkpoint.keep:
# sweep-export rebuilds the best trial from its parameters, and 100 trials' weights add up.
TRIAL_KEEP = "train.checkpoint.keep=none"


def pruning_monitor(sweep) -> str:
    """The validation metric the pruner compares trials by, on the objective's own scale: val/bpb
    when that is the objective (trials may differ in tokenizer), else val/loss."""
    return "val/bpb" if sweep.objectives[0].metric == "val/bpb" else "val/loss"


def _rejection(counts, sweep) -> str | None:
    """A reason to skip a sampled configuration before training, from its plan alone."""
    for c in sweep.constraints:
        have = counts.active_params if isinstance(c, MaxActiveParams) else counts.total_params
        if have > c.value:
            return f"{c.kind}: {have:,} > {c.value:,}"
    return None


def make_objective(
    loaded: LoadedSweep,
    *,
    tracking_uri: str | None,
    runs_root: str,
    parent_run_id: str | None,
    worker: int = 0,
    storage_url: str | None = None,
):
    from moeplat.track.mlflow_run import set_tags
    from moeplat.track.spool import SPOOL_FILE
    from moeplat.train.run import run

    sweep = loaded.sweep
    who = f"{platform.node()}:{os.getpid()}:{worker}"  # which worker ran a trial: host, process, index
    prunable = len(sweep.objectives) == 1 and sweep.pruner.kind != "none"

    def objective(trial: optuna.Trial):
        if surplus(trial.study, trial.number, sweep.trials.n_trials):  # lost the race for the last slot
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise optuna.TrialPruned("the study already has its n_trials")
        overrides = suggest(trial, loaded)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("worker", who)
        try:  # first, so the sweep's own train.checkpoint.keep (fixed or searched) wins
            loaded_run = load_spec(loaded.base_path, [TRIAL_KEEP, *overrides])
        except SpecError as e:  # the run spec's own checks (e.g. top_k <= num_experts) reject it
            return _reject(trial, "invalid configuration: " + "; ".join(i.format() for i in e.issues))
        counts = plan(loaded_run.spec)
        reason = _rejection(counts, sweep) or _layout_problem(loaded_run.spec)
        if reason:
            return _reject(trial, reason)
        sampled = overrides[len(loaded.fixed_overrides()) :]
        tags = {
            "optuna.study": sweep.name,
            "optuna.trial": trial.number,
            "moeplat.worker": who,
            # MLflow takes this tag as the run name: the trial and what was sampled, not the fixed overrides
            "mlflow.runName": f"{sweep.name} #{trial.number} " + " ".join(map(_short, sampled)),
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        # every attempt of one configuration shares a run directory: a retry resumes from its checkpoint
        trial_runs = f"{runs_root}/trial-{_first_attempt(trial)}"
        earlier = any(Path(trial_runs).glob("*/*/run.json"))
        opts = {
            "runs_root": trial_runs,
            "resume": "last" if earlier else None,
            "tracking_uri": tracking_uri,
            "tags": tags,
            "end_tags": {"FAILED": {"optuna.state": "FAIL"}, "KILLED": {"optuna.state": "FAIL"}},
        }
        try:
            if loaded_run.spec.parallel.world_size > 1:  # its own processes; one device: in this one
                job = {"base_path": loaded.base_path, "overrides": [TRIAL_KEEP, *overrides], "run": opts}
                job["prunable"] = prunable
                result, pruned_step = _train_in_processes(trial, job, loaded_run, sweep, storage_url)
            else:
                pruner = PruneOnValidation(trial if prunable else None, pruning_monitor(sweep))
                result = run(loaded_run, progress=False, callbacks=(pruner,), **opts)
                pruned_step = pruner.pruned_step
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        state = {"optuna.state": "PRUNED" if pruned_step is not None else "COMPLETE"}
        if pruned_step is not None:
            state["optuna.pruned_step"] = pruned_step
        if result.run_id:  # into the trial's spool while its run waits there (server away)
            set_tags(result.tracking_uri, result.run_id, state, spool=Path(result.run_dir) / SPOOL_FILE)
        if pruned_step is not None:
            raise optuna.TrialPruned(f"pruned at step {pruned_step}")
        return objective_values(sweep, result, counts)

    def interruptible(trial: optuna.Trial):
        try:
            return objective(trial)
        except KeyboardInterrupt:  # wherever Ctrl-C lands, the trial is not finished: --resume reruns it
            trial.set_user_attr("interrupted", True)
            raise

    return interruptible


def _layout_problem(spec) -> str | None:
    if spec.parallel.num_nodes > 1:
        return "parallel.num_nodes > 1: a sweep worker runs a trial's processes on its own machine"
    return None


def _train_in_processes(trial: optuna.Trial, job: dict, loaded_run, sweep, storage_url: str | None):
    """parallel.devices > 1: the trial as its own group of processes (moeplat.sweep.trial_process),
    one MLflow child run, rank 0 reporting to this trial. (its RunResult, the step it was pruned at)."""
    from moeplat.sweep.trial_process import TrialFailed, run_in_processes

    job = {
        **job,
        "base_path": os.path.abspath(job["base_path"]),
        "storage": storage_url,
        "sweep": sweep.model_dump_json(),
        "trial_id": trial._trial_id,  # rank 0 reopens this very trial in the storage
        "monitor": pruning_monitor(sweep),
        "prunable": job["prunable"] and storage_url is not None,
    }
    try:
        outcome = run_in_processes(job, Path(job["run"]["runs_root"]) / "ranks" / f"trial-{trial.number}")
    except TrialFailed as e:
        _fail_run(loaded_run.spec, sweep.name, trial.number, job["run"]["tracking_uri"], str(e))
        raise
    trial.set_user_attr("world_size", outcome.world_size)
    trial.set_user_attr("stopped_at", {str(r): s for r, s in sorted(outcome.steps_per_rank.items())})
    return outcome.result, outcome.pruned_step


def _fail_run(spec, study: str, number: int, tracking_uri: str | None, error: str) -> None:
    """A trial whose rank 0 was killed never closed its MLflow run: close it as FAILED now."""
    from moeplat.track.mlflow_run import fail_running_runs, resolve_tracking_uri

    if spec.tracking.enabled:
        uri = resolve_tracking_uri(tracking_uri, spec.tracking.uri)
        tags = {"optuna.study": study, "optuna.trial": number}
        fail_running_runs(
            uri, spec.tracking.experiment, tags, extra={"optuna.state": "FAIL", "moeplat.error": error[:5000]}
        )


def _first_attempt(trial: optuna.Trial) -> int:
    """The number of the first trial of this configuration. A trial retried because its worker
    died (Optuna's failed_trial) or re-queued after a Ctrl-C (retry_of) continues that trial's run
    from its last checkpoint, in the same MLflow run (retagged with this trial's number)."""
    trials = trial.study.get_trials(deepcopy=False)
    number, seen = trial.number, set()
    while number not in seen:
        seen.add(number)
        t = trials[number]
        earlier = t.system_attrs.get("failed_trial", t.user_attrs.get("retry_of"))
        if earlier is None:
            break
        number = earlier
    return number


def _short(override: str) -> str:
    """model.moe.top_k=2 -> top_k=2 (for run names)."""
    key, _, value = override.partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}"


def _reject(trial: optuna.Trial, reason: str):
    trial.set_user_attr("rejected", reason)
    log.warning("trial %d rejected before training: %s", trial.number, reason)
    raise optuna.TrialPruned(reason)


def _close_dead_runs(
    study: optuna.Study, loaded: LoadedSweep, tracking_uri: str | None, done: set[int]
) -> set[int]:
    """A worker killed mid-trial never closed its MLflow run: close it as FAILED, once per trial."""
    from moeplat.track.mlflow_run import fail_running_runs, resolve_tracking_uri

    tracking = loaded.base.spec.tracking
    failed = {t.number for t in study.get_trials(deepcopy=False, states=(State.FAIL,))} - done
    if tracking.enabled:
        uri = resolve_tracking_uri(tracking_uri, tracking.uri)
        for number in failed:
            tags = {"optuna.study": loaded.sweep.name, "optuna.trial": number}
            fail_running_runs(uri, tracking.experiment, tags, extra={"optuna.state": "FAIL"})
    return failed


def requeue_interrupted(study: optuna.Study) -> int:
    """Trials stopped by Ctrl-C or a killed sweep are not finished: queue their parameters again."""
    done = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    n = 0
    for t in study.get_trials(deepcopy=False, states=(State.FAIL,)):
        if t.user_attrs.get("interrupted") and t.number not in done:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            n += 1
    return n


def work(
    loaded: LoadedSweep,
    storage: str,
    *,
    tracking_uri: str | None = None,
    runs_root: str = "runs",
    worker: int = 0,
) -> None:
    """Run trials until the study has n_trials finished ones (several workers may share it);
    `worker` picks this worker's sampler seed."""
    study = open_study(loaded, storage, create=False, worker=worker)
    objective = make_objective(
        loaded,
        tracking_uri=tracking_uri,
        runs_root=f"{runs_root}/sweeps/{loaded.sweep.name}",
        parent_run_id=study.user_attrs.get(PARENT_RUN_ATTR),
        worker=worker,
        storage_url=storage,
    )
    trials = loaded.sweep.trials
    deadline = time.monotonic() + (trials.timeout_s or float("inf"))
    closed: set[int] = set()
    while time.monotonic() < deadline:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial is failed (and re-queued) now
        closed |= _close_dead_runs(study, loaded, tracking_uri, closed)
        left = remaining(study, trials.n_trials)
        running = len(study.get_trials(deepcopy=False, states=(State.RUNNING,)))
        if left <= 0:
            break
        if left <= running:  # the last trials are running elsewhere; stay, in case one needs a retry
            time.sleep(trials.heartbeat_s)
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
