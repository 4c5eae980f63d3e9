"""Sweep trials keep no checkpoint unless the sweep asks (train.checkpoint.keep in its overrides or
search): a 100-trial sweep should not leave 100 models' weights behind. The best trial stays
reproducible: sweep-export writes its spec, which keeps the run spec's default."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from moeplat.cli.main import main
from moeplat.spec import load_spec

pytestmark = pytest.mark.slow
QUICK = {"train.max_steps": 4, "train.val_every": 2, "data.val_tokens": 128, "tracking.log_model": False}
SEARCH = {"model.moe.top_k": {"kind": "int", "low": 1, "high": 2}}


def _sweep(tmp_path: Path, write_sweep, mlflow_store, name: str, **overrides) -> list[Path]:
    """Run a 2-trial sweep; the run directory of each trial."""
    path = write_sweep(
        tmp_path,
        name,
        overrides={**QUICK, **overrides},
        search=SEARCH,
        sampler={"kind": "grid"},
        pruner={"kind": "none"},
        trials={"n_trials": 2},
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    flags = ["--storage", storage, "--tracking-uri", mlflow_store(tmp_path), "--runs-dir", str(tmp_path)]
    assert main(["sweep", str(path), *flags]) == 0
    study = optuna.load_study(study_name=name, storage=storage)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 2
    assert main(["sweep-export", str(path), "--storage", storage, "-o", str(tmp_path / "best.yaml")]) == 0
    # the exported spec is the best trial's configuration, with the run spec's own checkpointing
    assert load_spec(tmp_path / "best.yaml").spec.train.checkpoint.keep == overrides.get(
        "train.checkpoint.keep"
    )
    runs = sorted((tmp_path / "sweeps" / name).glob("trial-*/tiny/*/run.json"))
    assert len(runs) == 2
    return [r.parent for r in runs]


def test_trials_keep_no_checkpoint_by_default(tmp_path, write_sweep, mlflow_store, one_thread):
    for run_dir in _sweep(tmp_path, write_sweep, mlflow_store, "keepnone"):
        assert not (run_dir / "checkpoints").exists()


def test_a_sweep_that_asks_keeps_its_trials_checkpoints(tmp_path, write_sweep, mlflow_store, one_thread):
    for run_dir in _sweep(
        tmp_path, write_sweep, mlflow_store, "keeplast", **{"train.checkpoint.keep": "last"}
    ):
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
