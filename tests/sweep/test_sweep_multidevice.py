"""Sweep trials on two devices (parallel.devices: 2, DDP over gloo on CPU): each trial is its own
group of two processes and one MLflow child run; the pruner's decision (rank 0's) stops both ranks
at the same step; a rank that dies fails its trial and the sweep goes on. Every wait has a
timeout: a rank left in a collective would hang."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main

pytestmark = pytest.mark.slow
State = optuna.trial.TrialState
TWO = {"parallel.devices": 2, "parallel.strategy": {"kind": "ddp"}, "parallel.accelerator": "cpu"}
QUICK = {
    "train.max_steps": 6,
    "train.val_every": 2,
    "train.schedule": {"kind": "constant"},
    "data.val_tokens": 128,
    "tracking.log_model": False,
}


def _flags(d: Path, mlflow_store) -> tuple[str, str, list[str]]:
    storage, tracking = f"sqlite:///{d / 'optuna.db'}", mlflow_store(d)
    return (
        storage,
        tracking,
        ["--storage", storage, "--tracking-uri", tracking, "--runs-dir", str(d / "runs")],
    )


def _children(tracking: str, study: str) -> dict[int, object]:
    """Trial number -> its MLflow child run."""
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    kids = [
        r for r in runs if r.data.tags.get("optuna.study") == study and "mlflow.parentRunId" in r.data.tags
    ]
    assert len(kids) == len({r.data.tags["optuna.trial"] for r in kids}), "one child run per trial"
    return {int(r.data.tags["optuna.trial"]): r for r in kids}


def _run_dirs(d: Path, study: str, number: int) -> list[Path]:
    return [p.parent for p in (d / "runs" / "sweeps" / study / f"trial-{number}").glob("tiny/*/run.json")]


def test_two_device_trials_run_as_two_processes_and_one_child_run_each(
    tmp_path, write_sweep, mlflow_store, one_thread
):
    storage, tracking, flags = _flags(tmp_path, mlflow_store)
    search = {"model.moe.top_k": {"kind": "int", "low": 1, "high": 2}}
    path = write_sweep(
        tmp_path,
        "two",
        overrides={**QUICK, **TWO},
        search=search,
        sampler={"kind": "grid"},
        pruner={"kind": "none"},
        trials={"n_trials": 2},
    )
    assert main(["sweep", str(path), *flags]) == 0
    trials = optuna.load_study(study_name="two", storage=storage).get_trials()
    assert [t.state for t in trials] == [State.COMPLETE, State.COMPLETE]
    children = _children(tracking, "two")
    assert sorted(children) == [0, 1]
    for t in trials:
        assert t.user_attrs["world_size"] == 2  # what Lightning trained with, not what the spec asked
        assert t.user_attrs["stopped_at"] == {"0": 6, "1": 6}
        child = children[t.number]
        assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == "COMPLETE"
        assert child.info.run_id == t.user_attrs["mlflow_run_id"]
        assert child.data.metrics["val/loss"] == pytest.approx(t.value)
        (run_dir,) = _run_dirs(tmp_path, "two", t.number)
        assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank1.log"]  # ranks 0 and 1 only
        assert not (run_dir / "checkpoints").exists()  # trials keep no checkpoint by default


def test_a_pruned_two_device_trial_stops_both_ranks_at_the_same_step(
    tmp_path, write_sweep, mlflow_store, one_thread
):
    """The first trial (one device, a useful learning rate) sets the median; the second (two
    devices, a learning rate that learns nothing) is worse at its first validation, so the median
    pruner prunes it there: step 2 of 6 on both ranks."""
    storage, tracking, flags = _flags(tmp_path, mlflow_store)
    sweep = {"pruner": {"kind": "median", "n_startup_trials": 1}, "sampler": {"kind": "random"}}

    def write(lr: float, n_trials: int, **extra):
        lr_range = {"train.optimizer.lr": {"kind": "float", "low": lr, "high": lr}}
        trials = {"n_trials": n_trials}
        write_sweep(tmp_path, "prune", overrides={**QUICK, **extra}, search=lr_range, trials=trials, **sweep)
        return tmp_path / "prune.yaml"

    assert main(["sweep", str(write(1e-2, 1)), *flags]) == 0
    assert main(["sweep", str(write(1e-9, 2, **TWO)), "--resume", *flags]) == 0
    first, second = optuna.load_study(study_name="prune", storage=storage).get_trials()
    assert first.state == State.COMPLETE and "world_size" not in first.user_attrs  # in-process
    assert second.state == State.PRUNED and second.user_attrs["world_size"] == 2
    assert list(second.intermediate_values) == [2]  # one report, then stopped
    assert second.user_attrs["stopped_at"] == {"0": 2, "1": 2}
    child = _children(tracking, "prune")[1]
    assert child.info.status == "FINISHED"
    assert child.data.tags["optuna.state"] == "PRUNED" and child.data.tags["optuna.pruned_step"] == "2"


def test_a_rank_that_dies_fails_its_trial_and_the_sweep_goes_on(
    tmp_path, write_sweep, mlflow_store, one_thread, moeplat_process, poll_trial
):
    storage, tracking, flags = _flags(tmp_path, mlflow_store)
    long = {**QUICK, **TWO, "train.max_steps": 400}
    path = write_sweep(
        tmp_path,
        "crash",
        overrides=long,
        search={"model.moe.top_k": {"kind": "int", "low": 1, "high": 2}},
        sampler={"kind": "grid"},
        pruner={"kind": "median", "n_startup_trials": 1000},  # reports every validation, never prunes
        trials={"n_trials": 1},
    )
    sweep = moeplat_process(["sweep", str(path), *flags], tmp_path)
    training = poll_trial(
        storage, "crash", lambda ts: next((t for t in ts if t.intermediate_values), None), sweep
    )
    ranks = tmp_path / "runs" / "sweeps" / "crash" / f"trial-{training.number}" / "ranks"
    pids = {p.stem: int(p.read_text()) for p in ranks.glob("trial-*/rank*.pid")}
    assert sorted(pids) == ["rank0", "rank1"]
    os.kill(pids["rank1"], signal.SIGKILL)
    assert sweep.wait(timeout=180) == 0
    (trial,) = optuna.load_study(study_name="crash", storage=storage).get_trials()
    # rank 0 sees its peer gone in the next collective, or Lightning's observer kills it
    assert trial.state == State.FAIL and trial.user_attrs["error"].startswith("TrialFailed: ")
    assert "rank 1" not in trial.user_attrs["error"]  # SIGKILL: rank 1 wrote nothing
    child = _children(tracking, "crash")[trial.number]
    assert child.info.status == "FAILED" and child.data.tags["optuna.state"] == "FAIL"
    for pid in pids.values():  # no rank left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_multi_node_trial_is_rejected_before_training(tmp_path, write_sweep, mlflow_store):
    storage, _, flags = _flags(tmp_path, mlflow_store)
    nodes = {"parallel.num_nodes": 2, "parallel.strategy": {"kind": "ddp"}, "parallel.accelerator": "cpu"}
    path = write_sweep(
        tmp_path,
        "nodes",
        overrides={**QUICK, **nodes},
        search={"model.moe.top_k": {"kind": "int", "low": 1, "high": 2}},
        trials={"n_trials": 1},
    )
    assert main(["sweep", str(path), *flags]) == 0
    (trial,) = optuna.load_study(study_name="nodes", storage=storage).get_trials()
    assert trial.state == State.PRUNED and "num_nodes" in trial.user_attrs["rejected"]
    assert not (tmp_path / "runs" / "sweeps" / "nodes").exists()  # nothing trained
