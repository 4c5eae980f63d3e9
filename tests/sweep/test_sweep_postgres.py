"""A sweep on a real PostgreSQL storage (the team setup): trials, MLflow parent and children, status."""

from __future__ import annotations

import json

import optuna
import pytest
import sqlalchemy
from mlflow import MlflowClient

from moeplat.cli.main import main
from moeplat.sweep.study import PARENT_RUN_ATTR, finished_count

pytestmark = pytest.mark.slow
State = optuna.trial.TrialState
SEARCH = {
    "model.moe.top_k": {"kind": "int", "low": 1, "high": 3},
    "model.moe.losses.load_balancing.coef": {"kind": "float", "low": 1e-4, "high": 0.1, "log": True},
}


def test_sweep_on_postgres(one_thread, workdir, postgres_url, write_sweep, mlflow_store, capsys):
    path = write_sweep(
        workdir,
        "pg-sweep",
        overrides={"train.max_steps": 12, "train.val_every": 3, "data.val_tokens": 128},
        search=SEARCH,
        pruner={"kind": "median", "n_startup_trials": 1},
        trials={"n_trials": 4, "heartbeat_s": 1, "max_retries": 1},
    )
    mlflow_store(workdir)  # ./mlflow.db, the default store, already has MLflow's schema
    assert main(["sweep", str(path), "--storage", postgres_url]) == 0
    assert "study pg-sweep" in capsys.readouterr().out
    assert not (workdir / "optuna.db").exists()  # nothing went to the embedded default

    # the trials are in PostgreSQL, read back by a fresh client
    study = optuna.load_study(study_name="pg-sweep", storage=postgres_url)
    trials = study.get_trials()
    assert len(trials) == finished_count(study) == 4
    assert all(t.state in (State.COMPLETE, State.PRUNED) for t in trials)
    assert any(t.state == State.COMPLETE for t in trials)
    for t in trials:  # parameters under the run spec's dotted names, within the search space
        assert set(t.params) == set(SEARCH)
        assert 1 <= t.params["model.moe.top_k"] <= 3
        assert f"model.moe.top_k={t.params['model.moe.top_k']}" in t.user_attrs["overrides"]
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        n = conn.execute(
            sqlalchemy.text(
                "SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = 'pg-sweep'"
            )
        ).scalar()
    engine.dispose()
    assert n == 4

    # MLflow (local store in workdir): one parent, one child per trial, tagged with trial and state
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    parents = [r for r in runs if r.data.tags.get("moeplat.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == study.user_attrs[PARENT_RUN_ATTR] and parent.info.status == "FINISHED"
    children = [r for r in runs if r is not parent]
    assert len(children) == 4
    for c in children:
        t = trials[int(c.data.tags["optuna.trial"])]
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.data.tags["optuna.study"] == "pg-sweep"
        assert c.data.tags["optuna.state"] == t.state.name
        assert c.data.params["model.moe.top_k"] == str(t.params["model.moe.top_k"])
        assert float(c.data.params["model.moe.losses.load_balancing.coef"]) == pytest.approx(
            t.params["model.moe.losses.load_balancing.coef"]
        )
        if t.state == State.PRUNED:
            assert int(c.data.tags["optuna.pruned_step"]) == max(t.intermediate_values)
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [0, 1, 2, 3]

    # sweep-status reads the same storage
    assert main(["sweep-status", str(path), "--storage", postgres_url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["study"] == "pg-sweep"
    assert status["trials"] == {s: sum(t.state.name == s for t in trials) for s in status["trials"]}
    assert sum(status["trials"].values()) == 4
    assert [b["number"] for b in status["best"]] == [study.best_trial.number]
    assert status["best"][0]["params"] == study.best_trial.params
