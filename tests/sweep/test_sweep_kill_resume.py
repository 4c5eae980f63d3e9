"""A sweep killed with SIGKILL mid-trial, at a step drawn from a seeded RNG: `moeplat sweep --resume`
fails the dead trial by its heartbeat and retries it, and the retry resumes the dead trial's run from
its last checkpoint, in the same MLflow run, whose history has each step once; the study reaches
n_trials. (tests/sweep/test_sweep_faults.py covers the study side with a retry on PostgreSQL.)"""

from __future__ import annotations

import json
import random
import signal

import optuna
import pytest
from mlflow import MlflowClient
from resume_checks import assert_exact_history, wait_until_past

from moeplat.cli.main import main
from moeplat.spec.sweep import load_sweep
from moeplat.sweep.study import finished_count, open_study

pytestmark = pytest.mark.slow
State = optuna.trial.TrialState
MAX_STEPS, VAL_EVERY = 24, 4
OVERRIDES = {
    "train.max_steps": MAX_STEPS,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.val_every": VAL_EVERY,
    "data.val_tokens": 128,
}


def test_a_trial_killed_mid_run_is_retried_from_its_checkpoint_into_the_same_run(
    one_thread, workdir, write_sweep, mlflow_store, moeplat_process, capsys
):
    path = write_sweep(
        workdir,
        "kill-resume",
        overrides=OVERRIDES,
        search={"model.moe.top_k": {"kind": "int", "low": 1, "high": 3}},
        sampler={"kind": "random"},
        pruner={"kind": "median", "n_startup_trials": 1000},  # reports, never prunes
        trials={"n_trials": 2, "heartbeat_s": 1, "max_retries": 1},
    )
    storage, tracking = f"sqlite:///{workdir / 'optuna.db'}", mlflow_store(workdir)
    flags = ["--storage", storage, "--tracking-uri", tracking, "--runs-dir", str(workdir / "runs")]
    kill_after = random.Random(2026).randint(2, MAX_STEPS - 8)
    sweep = moeplat_process(["sweep", str(path), *flags], workdir)
    runs = workdir / "runs" / "sweeps" / "kill-resume"  # the trial's run: trial-0/tiny/<timestamp>
    run_dir = wait_until_past(
        lambda: list(runs.glob("**/tiny/*")), kill_after, lambda: sweep.proc.poll() is None
    )
    sweep.proc.send_signal(signal.SIGKILL)
    assert sweep.wait() == -signal.SIGKILL
    killed_run = json.loads((run_dir / "run.json").read_text())["run_id"]

    capsys.readouterr()
    assert main(["sweep", str(path), "--resume", *flags]) == 0  # at once: the heartbeat must tell
    assert "resumed at step" in capsys.readouterr().out
    study = open_study(load_sweep(path), storage, create=False)
    trials = study.get_trials()
    assert [t.state for t in trials] == [State.FAIL, State.COMPLETE, State.COMPLETE]
    # the dead trial turns stale only a grace period after its last heartbeat: the resumed worker may
    # start a new trial before the retry is queued, so the retry is trial 1 or 2
    (retry,) = [t for t in trials[1:] if t.system_attrs.get("failed_trial") == 0]
    assert retry.params == trials[0].params
    assert finished_count(study) == 2  # n_trials: the dead trial counts through its retry

    client = MlflowClient(tracking)
    assert retry.user_attrs["mlflow_run_id"] == killed_run  # continued, not started over
    continued = client.get_run(killed_run)
    assert continued.info.status == "FINISHED"
    assert continued.data.tags["optuna.trial"] == str(retry.number)
    assert continued.data.tags["optuna.state"] == "COMPLETE"
    val_steps = list(range(VAL_EVERY - 1, MAX_STEPS, VAL_EVERY))
    for t in trials[1:]:
        assert_exact_history(client, t.user_attrs["mlflow_run_id"], MAX_STEPS, val_steps)
    assert trials[1].user_attrs["mlflow_run_id"] != trials[2].user_attrs["mlflow_run_id"]
