"""A tiny sweep end to end, in-process, on the embedded storage and a real local MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main
from moeplat.spec import load_spec
from moeplat.spec.sweep import load_sweep
from moeplat.sweep.pruning import PruneOnValidation
from moeplat.sweep.study import finished_count, open_study
from moeplat.track.spool import SPOOL_FILE
from moeplat.train.run import run

pytestmark = pytest.mark.slow
TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny.yaml"
State = optuna.trial.TrialState


def _sweep_file(tmp_path: Path, n_trials: int = 4, extra: str = "") -> Path:
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(
        f"name: tiny-sweep\nextends: {TINY}\n"
        "overrides: {train.max_steps: 9, train.val_every: 3}\n"
        "search:\n"
        "  model.moe.top_k: {kind: int, low: 1, high: 2}\n"
        "  model.moe.losses.load_balancing.coef: {kind: float, low: 1.0e-3, high: 1.0e-1, log: true}\n"
        f"sampler: {{kind: random}}\ntrials: {{n_trials: {n_trials}}}\n{extra}"
    )
    return path


class _AlwaysPrune:
    def report(self, value, step):
        self.reported = (value, step)

    def should_prune(self):
        return True


def test_pruning_stops_training_at_the_first_validation(workdir):
    loaded = load_spec(TINY, ["tracking.enabled=false"])
    trial = _AlwaysPrune()
    pruner = PruneOnValidation(trial)
    result = run(loaded, progress=False, callbacks=(pruner,))
    assert pruner.pruned_step == result.steps == loaded.spec.train.val_every  # not max_steps (12)
    assert trial.reported == (pytest.approx(result.val_loss, rel=1e-6), 6)


def test_sweep_runs_trials_as_mlflow_children_and_resume_repeats_nothing(workdir, capsys):
    path = _sweep_file(workdir)
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "study tiny-sweep" in out and "best" in out

    loaded = load_sweep(path)
    study = open_study(loaded, "sqlite:///optuna.db", create=False)
    trials = study.get_trials()
    assert finished_count(study) == len(trials) == 4
    assert study.metric_names == [o.metric for o in loaded.sweep.objectives]  # axes named in the dashboard
    assert all(set(t.params) == {"model.moe.top_k", "model.moe.losses.load_balancing.coef"} for t in trials)

    client = MlflowClient("sqlite:///mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    parents = [r for r in runs if r.data.tags.get("moeplat.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    # the parent run spools like a run (moeplat sync runs/tiny-sweep/sweep-parent); nothing was left
    parent_dir = workdir / "runs" / "tiny-sweep" / "sweep-parent"
    assert json.loads((parent_dir / "run.json").read_text())["run_id"] == parents[0].info.run_id
    assert not (parent_dir / SPOOL_FILE).exists()
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [0, 1, 2, 3]
    for c in children:  # named by trial and what was sampled, not by the fixed overrides
        assert c.info.run_name.startswith(f"tiny-sweep #{c.data.tags['optuna.trial']} top_k=")
        assert "coef=" in c.info.run_name and "max_steps" not in c.info.run_name
    for c in children:  # trial parameters under the same dotted names as plain runs
        t = trials[int(c.data.tags["optuna.trial"])]
        assert c.data.params["model.moe.top_k"] == str(t.params["model.moe.top_k"])
        assert c.data.tags["optuna.state"] == t.state.name
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep/plots")}
    assert "sweep/plots/optimization_history.png" in arts
    assert parent.data.tags["optuna.best.0.trial"] == str(study.best_trial.number)

    # starting it again without --resume is refused; with --resume it has nothing left to do
    assert main(["sweep", str(path)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["sweep", str(path), "--resume"]) == 0
    assert len(open_study(loaded, "sqlite:///optuna.db", create=False).get_trials()) == 4

    # raising n_trials and resuming runs exactly the missing trials, under the same parent
    _sweep_file(workdir, n_trials=6)
    assert main(["sweep", str(path), "--resume"]) == 0
    assert len(open_study(load_sweep(path), "sqlite:///optuna.db", create=False).get_trials()) == 6
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert len([r for r in runs if r.data.tags.get("moeplat.kind") == "sweep"]) == 1

    # a study is also found by its name (its sweep file was recorded in the storage)
    assert main(["sweep-worker", "--study", "tiny-sweep"]) == 0  # nothing left: returns at once
    capsys.readouterr()
    assert main(["sweep-status", "tiny-sweep", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sum(status["trials"].values()) == 6 and status["best"]
    assert main(["sweep-export", str(path), "--best", "-o", "best.yaml"]) == 0
    best = load_spec(workdir / "best.yaml").spec
    assert best.model.moe.top_k == study.best_trial.params["model.moe.top_k"]


def test_an_interrupted_trial_is_requeued_on_resume(workdir, monkeypatch):
    import moeplat.train.run as run_module

    path = _sweep_file(workdir, n_trials=3)
    real_run, calls = run_module.run, []

    def interrupting_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(run_module, "run", interrupting_run)
    assert main(["sweep", str(path)]) == 130  # Ctrl-C: stops cleanly with the conventional code
    study = open_study(load_sweep(path), "sqlite:///optuna.db", create=False)
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].state == State.FAIL

    monkeypatch.setattr(run_module, "run", real_run)
    assert main(["sweep", str(path), "--resume"]) == 0
    trials = study.get_trials()
    retry = [t for t in trials if t.user_attrs.get("retry_of") == interrupted[0].number]
    assert len(retry) == 1 and retry[0].params == interrupted[0].params and retry[0].state == State.COMPLETE
    assert finished_count(study) == 3 and len(trials) == 4  # 3 configurations, one of them run twice
