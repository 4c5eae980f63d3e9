"""Sweeps under faults, end to end on the embedded (SQLite) storage and a real local MLflow store:
several worker processes, a worker killed mid-trial (on PostgreSQL too: heartbeats use the server's
clock), the whole sweep interrupted and resumed, trials that raise or diverge. Real processes and
real signals; trials are a few tiny training steps."""

from __future__ import annotations

import itertools
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main
from moeplat.spec.sweep import load_sweep
from moeplat.sweep.space import suggest
from moeplat.sweep.study import PARENT_RUN_ATTR, SURPLUS_ATTR, finished_count, make_storage, open_study

pytestmark = pytest.mark.slow
State = optuna.trial.TrialState
optuna.logging.set_verbosity(optuna.logging.WARNING)

# A trial long enough to be caught while it trains (the first report comes at step 5), for the run that
# is killed or interrupted; resuming, the same sweep with a smaller step budget (not a searched
# parameter, so the study does not see it) keeps the rest of the test quick.
CATCHABLE = {"train.max_steps": 80, "train.val_every": 5, "data.val_tokens": 128}
QUICK = {"train.max_steps": 6, "train.val_every": 3, "data.val_tokens": 128}
NEVER_PRUNE = {"kind": "median", "n_startup_trials": 1000}  # reports every validation, never prunes
HEARTBEAT_S = 1  # a trial silent for 3 s is stale


def _paths(d: Path, mlflow_store, storage: str | None = None) -> tuple[str, str, list[str]]:
    """Storage URL (default: SQLite in d), a new MLflow store in d and the CLI flags naming both
    (and runs/ in d) explicitly."""
    storage, tracking = storage or f"sqlite:///{d / 'optuna.db'}", mlflow_store(d)
    flags = ["--storage", storage, "--tracking-uri", tracking, "--runs-dir", str(d / "runs")]
    return storage, tracking, flags


def _sweep_runs(tracking_uri: str, study: str) -> tuple[list, list]:
    """(parent runs, child runs) of one sweep in the MLflow store."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    runs = [r for r in runs if r.data.tags.get("optuna.study") == study]
    parents = [r for r in runs if r.data.tags.get("moeplat.kind") == "sweep"]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _running_and_training(trials):
    """A RUNNING trial inside its training loop (it has reported a validation loss) with most of its
    steps to go: a signal sent now reaches it while it trains, not while it finishes."""
    half = CATCHABLE["train.max_steps"] // 2
    return next(
        (t for t in trials if t.state == State.RUNNING and 0 < len(t.intermediate_values) <= half), None
    )


def _table(trials) -> str:
    """The trials, for assertion messages."""
    return "\n".join(
        f"#{t.number} {t.state.name} {t.params} user={t.user_attrs} "
        f"system={ {k: v for k, v in t.system_attrs.items() if k != 'search_space'} } "
        f"reports={sorted(t.intermediate_values)}"
        for t in trials
    )


# --------------------------------------------------------------------------- several workers


def test_two_worker_processes_share_one_study_and_one_parent_run(
    one_thread, workdir, write_sweep, mlflow_store
):
    path = write_sweep(
        workdir,
        "two-workers",
        overrides={"train.max_steps": 9, "train.val_every": 3, "data.val_tokens": 128},
        search={
            "model.moe.top_k": {"kind": "int", "low": 1, "high": 3},
            "model.moe.losses.load_balancing.coef": {"kind": "float", "low": 1e-4, "high": 0.1, "log": True},
        },
        sampler={"kind": "random"},
        pruner={"kind": "median", "n_startup_trials": 2},
        # a generous grace period: a live worker starved of CPU must not look dead to the other one
        trials={"n_trials": 6, "heartbeat_s": 5},
    )
    mlflow_store(workdir)
    # default storage and MLflow store (./optuna.db, ./mlflow.db): the workers must find the same ones
    assert main(["sweep", str(path), "--workers", "2"]) == 0

    study = optuna.load_study(study_name="two-workers", storage=f"sqlite:///{workdir / 'optuna.db'}")
    trials = study.get_trials()
    assert all(t.state in (State.COMPLETE, State.PRUNED) for t in trials), _table(trials)
    # A worker starts a trial when fewer than n_trials are finished or running; the other worker can
    # check in between that check and the new trial showing as RUNNING. The later of two such trials
    # gives way (marked surplus, pruned before training, not counted): exactly n_trials count.
    counted = [t for t in trials if not t.user_attrs.get(SURPLUS_ATTR)]
    assert finished_count(study) == len(counted) == 6, _table(trials)
    assert all(t.state == State.PRUNED and not t.intermediate_values for t in trials if t not in counted)
    trials = counted
    # Both processes ran trials (each trial records host:pid:index of its worker), in parallel.
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2 and {w.rsplit(":", 1)[1] for w in workers} == {"0", "1"}, workers
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), f"trials never overlapped: {spans}"

    parents, children = _sweep_runs(f"sqlite:///{workdir / 'mlflow.db'}", "two-workers")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == study.user_attrs[PARENT_RUN_ATTR]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [t.number for t in trials]
    for c in children:
        assert c.data.tags["optuna.state"] == trials[int(c.data.tags["optuna.trial"])].state.name


# --------------------------------------------------------------------------- a worker killed mid-trial


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def killed_worker(
    request, one_thread, tmp_path_factory, write_sweep, mlflow_store, moeplat_process, poll_trial
):
    """`moeplat sweep` (one worker, n_trials 2) is killed with SIGKILL while its first trial trains;
    `moeplat sweep --resume`, started at once, must notice the dead trial by its silent heartbeat."""
    d = tmp_path_factory.mktemp(f"killed-worker-{request.param}")
    pg = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    storage, tracking, flags = _paths(d, mlflow_store, pg)

    def sweep_file(overrides):
        return write_sweep(
            d,
            "killed-worker",
            overrides=overrides,
            search={"model.moe.top_k": {"kind": "int", "low": 1, "high": 3}},
            sampler={"kind": "random"},
            pruner=NEVER_PRUNE,
            trials={"n_trials": 2, "heartbeat_s": HEARTBEAT_S, "max_retries": 1},
        )

    sweep = moeplat_process(["sweep", str(sweep_file(CATCHABLE)), *flags], d)
    killed = poll_trial(storage, "killed-worker", _running_and_training, sweep)
    sweep.proc.send_signal(signal.SIGKILL)
    assert sweep.wait() == -signal.SIGKILL
    before = optuna.load_study(study_name="killed-worker", storage=storage).get_trials()
    assert [t.state for t in before] == [State.RUNNING], f"the trial ended before the kill:\n{_table(before)}"
    # at once, within the grace period: the resumed worker must notice the dead trial by itself
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)  # where MLflow puts artifacts of experiments it creates, like the CLI's cwd
        assert main(["sweep", str(sweep_file(QUICK)), "--resume", *flags]) == 0
    study = open_study(load_sweep(d / "killed-worker.yaml"), storage, create=False)
    return SimpleNamespace(killed=killed, study=study, trials=study.get_trials(), tracking=tracking)


def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried(killed_worker):
    trials, killed = killed_worker.trials, killed_worker.killed
    why = f"killed #{killed.number}\n{_table(trials)}"
    assert trials[killed.number].state == State.FAIL, why  # not a zombie RUNNING forever
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, why
    retry = retries[0]
    assert retry.params == killed.params and retry.state == State.COMPLETE
    assert retry.system_attrs["retry_history"] == [killed.number]
    # n_trials 2: the killed trial does not count, its retry and one new trial do
    assert len(trials) == 3 and finished_count(killed_worker.study) == 2, why
    assert [t.state for t in trials] == [State.FAIL, State.COMPLETE, State.COMPLETE], why


def test_a_killed_workers_mlflow_run_is_closed_and_the_sweep_keeps_one_parent(killed_worker):
    parents, children = _sweep_runs(killed_worker.tracking, "killed-worker")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    # the killed trial's run (closed as FAILED when its heartbeat stopped) was continued by its
    # retry, #1, from its last checkpoint; #2 is the new trial's
    assert sorted(by_trial) == [1, 2]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert by_trial[1].data.tags["optuna.state"] == by_trial[2].data.tags["optuna.state"] == "COMPLETE"
    assert by_trial[1].data.tags["optuna.study"] == "killed-worker"
    assert {c.info.status for c in children} == {"FINISHED"}  # none left RUNNING or FAILED


def test_a_dead_workers_trial_is_retried_even_when_nothing_else_is_left_to_run(
    one_thread, workdir, write_sweep
):
    path = write_sweep(
        workdir,
        "dead-worker",
        overrides={"train.max_steps": 6, "train.val_every": 3, "tracking.enabled": False},
        search={"model.moe.top_k": {"kind": "int", "low": 1, "high": 3}},
        sampler={"kind": "random"},
        trials={"n_trials": 1, "heartbeat_s": HEARTBEAT_S, "max_retries": 1},
    )
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    loaded = load_sweep(path)
    open_study(loaded, storage, create=True)
    # The storage state a killed worker leaves: a RUNNING trial with sampled parameters whose
    # heartbeat stops now (what SIGKILL leaves, see killed_worker, without its 10 s of setup).
    # The resumed sweep has no other trial to run: it must wait out the grace period, not finish.
    rdb = make_storage(storage, loaded.sweep)
    study = optuna.load_study(study_name="dead-worker", storage=rdb)
    dead = study.ask()
    suggest(dead, loaded)
    rdb.record_heartbeat(dead._trial_id)

    assert main(["sweep", str(path), "--resume", "--storage", storage]) == 0
    trials = study.get_trials()
    assert trials[dead.number].state == State.FAIL, _table(trials)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params, _table(trials)
    assert retries[0].state == State.COMPLETE and finished_count(study) == 1


# --------------------------------------------------------------------------- the whole sweep interrupted

GRID = {"model.moe.top_k": [1, 2], "model.moe.losses.load_balancing.coef": [0.001, 0.1]}


@pytest.fixture(scope="module")
def interrupted_sweep(one_thread, tmp_path_factory, write_sweep, mlflow_store, moeplat_process, poll_trial):
    """`moeplat sweep` over a 4-point grid gets SIGINT (Ctrl-C) while its second trial trains,
    then `moeplat sweep --resume` finishes it. The grid makes repeats visible: every point once."""
    d = tmp_path_factory.mktemp("interrupted-sweep")
    storage, tracking, flags = _paths(d, mlflow_store)

    def sweep_file(overrides):
        return write_sweep(
            d,
            "interrupted",
            overrides=overrides,
            search={k: {"kind": "categorical", "choices": v} for k, v in GRID.items()},
            sampler={"kind": "grid"},
            pruner=NEVER_PRUNE,
            trials={"n_trials": 4, "heartbeat_s": HEARTBEAT_S, "max_retries": 1},
        )

    sweep = moeplat_process(["sweep", str(sweep_file(CATCHABLE)), *flags], d)

    def second_trial_training(trials):
        done = any(t.state == State.COMPLETE for t in trials)
        return _running_and_training(trials) if done else None

    interrupted = poll_trial(storage, "interrupted", second_trial_training, sweep)
    sweep.proc.send_signal(signal.SIGINT)
    out = SimpleNamespace(interrupted=interrupted, rc=sweep.wait(), output=sweep.output(), tracking=tracking)
    out.after_ctrl_c = optuna.load_study(study_name="interrupted", storage=storage).get_trials()
    out.runs_after_ctrl_c = _sweep_runs(tracking, "interrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        assert main(["sweep", str(sweep_file(QUICK)), "--resume", *flags]) == 0
    out.study = open_study(load_sweep(d / "interrupted.yaml"), storage, create=False)
    out.trials = out.study.get_trials()
    return out


def _points(params: list[dict]) -> list[tuple]:
    return sorted(tuple(sorted(p.items())) for p in params)


def test_resume_after_ctrl_c_runs_every_grid_point_exactly_once(interrupted_sweep):
    s = interrupted_sweep
    assert s.rc != 0 and s.interrupted.state == State.RUNNING
    grid = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    complete = [t.params for t in s.trials if t.state == State.COMPLETE]
    why = f"interrupted #{s.interrupted.number}\n{_table(s.trials)}\n{s.output[-2000:]}"
    assert _points(complete) == _points(grid), why  # each grid point completed once, none twice
    assert finished_count(s.study) == 4, why
    # the interrupted trial did not finish, and its configuration was completed by another trial
    assert s.trials[s.interrupted.number].state == State.FAIL, why
    assert s.interrupted.params in complete
    assert not [t for t in s.trials if t.state in (State.RUNNING, State.WAITING)], why


def test_resume_after_ctrl_c_continues_the_same_parent_run(interrupted_sweep):
    parents, children = _sweep_runs(interrupted_sweep.tracking, "interrupted")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == interrupted_sweep.study.user_attrs[PARENT_RUN_ATTR]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # one child per trial that trained, but the re-queued trial continued the interrupted one's run
    assert len(children) == len(interrupted_sweep.trials) - 1
    assert {c.info.status for c in children} == {"FINISHED"}


def test_ctrl_c_stops_cleanly_and_resume_requeues_the_interrupted_trial(interrupted_sweep):
    """Lightning answers Ctrl-C with sys.exit(1); moeplat must still see an interrupt: exit code
    130, the trial FAIL and marked interrupted at once, runs KILLED, and the trial re-queued."""
    s = interrupted_sweep
    assert s.rc == 130 and "interrupted" in s.output
    at_ctrl_c = s.after_ctrl_c[s.interrupted.number]
    assert at_ctrl_c.state == State.FAIL and at_ctrl_c.user_attrs.get("interrupted") is True
    parents, children = s.runs_after_ctrl_c
    assert parents[0].info.status == "KILLED"
    child = next(c for c in children if c.data.tags["optuna.trial"] == str(s.interrupted.number))
    assert child.info.status == "KILLED"
    requeued = [t for t in s.trials if t.user_attrs.get("retry_of") == s.interrupted.number]
    assert len(requeued) == 1
    assert requeued[0].params == s.interrupted.params and requeued[0].state == State.COMPLETE


# --------------------------------------------------------------------------- trials that raise


@pytest.fixture(scope="module")
def failing_trials(one_thread, tmp_path_factory, write_sweep, mlflow_store):
    """A grid where max_bytes=10 leaves an empty corpus (raises when the trial builds its data)
    and lr=1e30 makes the loss NaN within a few steps; one point of four is healthy."""
    d = tmp_path_factory.mktemp("failing-trials")
    storage, tracking, flags = _paths(d, mlflow_store)
    path = write_sweep(
        d,
        "failing",
        overrides={"train.max_steps": 9, "train.val_every": 3, "data.val_tokens": 128},
        search={
            "data.source.max_bytes": {"kind": "categorical", "choices": [400000, 10]},
            "train.optimizer.lr": {"kind": "categorical", "choices": [1.0e-3, 1.0e30]},
        },
        sampler={"kind": "grid"},
        pruner={"kind": "none"},
        trials={"n_trials": 4, "heartbeat_s": HEARTBEAT_S},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        assert main(["sweep", str(path), *flags]) == 0  # failed trials are results, not a failed sweep
    study = open_study(load_sweep(path), storage, create=False)
    return SimpleNamespace(study=study, trials=study.get_trials(), tracking=tracking)


def test_a_trial_that_raises_is_failed_with_its_error_and_the_sweep_goes_on(failing_trials):
    trials = failing_trials.trials
    empty = [t for t in trials if t.params["data.source.max_bytes"] == 10]
    assert len(empty) == 2
    for t in empty:
        assert t.state == State.FAIL and "max_bytes" in t.user_attrs["error"]
    healthy = [t for t in trials if t.params == {"data.source.max_bytes": 400000, "train.optimizer.lr": 1e-3}]
    assert len(healthy) == 1 and healthy[0].state == State.COMPLETE and healthy[0].value > 0
    assert len(trials) == finished_count(failing_trials.study) == 4
    # the parent run records what happened
    parents, _ = _sweep_runs(failing_trials.tracking, "failing")
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["optuna.trials.fail"] == "3"
    assert parents[0].data.tags["optuna.best.0.trial"] == str(healthy[0].number)


def test_a_trial_whose_loss_diverges_is_failed_naming_the_nonfinite_loss(failing_trials):
    diverging = {"data.source.max_bytes": 400000, "train.optimizer.lr": 1e30}
    t = next(t for t in failing_trials.trials if t.params == diverging)
    assert t.state == State.FAIL
    assert re.match(r"NonFiniteLossError: training loss is (nan|-?inf) at step \d+", t.user_attrs["error"])
    _, children = _sweep_runs(failing_trials.tracking, "failing")
    child = next(c for c in children if c.data.tags["optuna.trial"] == str(t.number))
    assert child.info.status == "FAILED" and child.data.tags.get("optuna.state") == "FAIL"
