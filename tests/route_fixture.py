"""A run to route, without training: the tiny spec's model, built untrained and stored as a run's
model/ (the layout `moeplat run` writes) beside an MLflow run that holds it as its model/ artifact.
Used by tests/cli/test_route.py, tests/server/test_routing.py and tests/web."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny.yaml"


def model_dir(run_dir: Path, overrides: list[str]) -> Path:
    """run_dir/model/ with weights.pt, spec.yaml and meta.json of the tiny spec with `overrides`."""
    from moeplat.compile.model import build_model
    from moeplat.spec import load_spec

    loaded = load_spec(TINY, overrides)
    torch.manual_seed(0)
    out = run_dir / "model"
    out.mkdir(parents=True)
    torch.save(build_model(loaded.spec).state_dict(), out / "weights.pt")
    (out / "spec.yaml").write_text(yaml.safe_dump(loaded.resolved, sort_keys=False))
    meta = {"step": 0, "spec_name": loaded.spec.name, "base_dir": str(TINY.parent)}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def stored_run(tmp: Path, uri: str, experiment: str = "route-tests") -> tuple[str, Path]:
    """(run id, run directory) of a finished MLflow run in `uri` whose model/ is the tiny MoE; the
    run directory's run.json names the run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name="tiny-untrained").info.run_id
    run_dir = tmp / "runs" / "tiny" / run_id
    client.log_artifacts(run_id, str(model_dir(run_dir, [])), "model")
    client.set_terminated(run_id)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    return run_id, run_dir
