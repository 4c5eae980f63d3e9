"""End to end: a spec file -> Lightning fit -> one MLflow run in a real local store."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main
from moeplat.spec import load_spec
from moeplat.train.run import run

pytestmark = pytest.mark.slow


def _client(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def test_run_logs_everything_to_one_mlflow_run(workdir, tiny_spec_path):
    loaded = load_spec(tiny_spec_path, ["model.moe.top_k=1"])
    result = run(loaded, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", progress=False)

    client = _client(workdir)
    exp = client.get_experiment_by_name("tiny-tests")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.run_id == result.run_id and r.info.status == "FINISHED"
    assert r.info.run_name == "tiny model.moe.top_k=1"

    # params: every resolved spec leaf under its dotted path
    p = r.data.params
    assert p["model.moe.top_k"] == "1" and p["model.d_model"] == "32"
    assert p["data.seq_len"] == "32"  # interpolated value, not "${model.max_seq_len}"
    assert p["train.optimizer.lr"] == str(loaded.spec.train.optimizer.lr)
    assert int(p["plan.total_params"]) > int(p["plan.active_params"]) > 0
    # tags
    t = r.data.tags
    assert t["moeplat.spec_name"] == "tiny" and t["moeplat.router"] == "topk" and t["moeplat.top_k"] == "1"
    assert t["moeplat.spec_hash"] == loaded.spec_hash and t["moeplat.experts"] == "4xswiglu"
    assert "git.commit" in t
    # artifacts: original spec and its base, resolved spec, overrides
    spec_files = {a.path for a in client.list_artifacts(r.info.run_id, "spec")}
    assert {"spec/original", "spec/bases", "spec/resolved.yaml", "spec/overrides.txt"} <= spec_files

    # metrics: losses, perplexity, throughput, lr, telemetry per MoE layer
    m = r.data.metrics
    for key in (
        "train/loss",
        "train/aux_loss",
        "train/lr",
        "val/loss",
        "val/ppl",
        "perf/tokens_per_s",
        "data/unigram_baseline",
        "moe/layer00/load/e03",
        "moe/layer01/dropped_frac",
        "moe/layer00/load_balancing",
        "moe/layer00/z_loss",
        "moe/layer00/maxvio",
    ):
        assert key in m, key
    assert math.isclose(m["val/ppl"], math.exp(m["val/loss"]), rel_tol=1e-4)
    val_hist = client.get_metric_history(r.info.run_id, "val/loss")
    assert len(val_hist) == 2  # at step 6 and 12
    assert math.isclose(val_hist[-1].value, result.val_loss, rel_tol=1e-6)
    train_hist = sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda x: x.step)
    assert train_hist[-1].value < train_hist[0].value  # it learns
    loads = [m[f"moe/layer00/load/e{e:02d}"] for e in range(4)]
    assert math.isclose(sum(loads), 1.0, rel_tol=1e-5)
    assert math.isclose(m["data/unigram_baseline"], result.unigram_baseline, rel_tol=1e-6)

    # the run directory has the checkpoint and the MLflow run id, for --resume
    run_dir = Path(result.run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == result.run_id


def test_resume_continues_the_same_run(workdir, tiny_spec_path, capsys):
    assert main(["run", str(tiny_spec_path), "--set", "train.max_steps=6", "--no-progress"]) == 0
    first_out = capsys.readouterr().out
    run_dir = next((workdir / "runs" / "tiny").iterdir())
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert run_id in first_out

    assert main(["run", str(tiny_spec_path), "--resume", "last", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "12 steps" in out

    client = _client(workdir)
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the same run, not a new one
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val/loss"))
    assert len(steps) == 2 and steps[-1] > steps[0]  # one validation before the stop, one after the resume
    assert runs[0].info.status == "FINISHED"


def test_mlflow_tracking_uri_env_is_respected(workdir, tiny_spec_path, monkeypatch):
    store = workdir / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    loaded = load_spec(
        tiny_spec_path, ["train.max_steps=3", "train.val_every=3", "train.schedule.warmup_steps=1"]
    )
    result = run(loaded, progress=False)
    assert result.tracking_uri == f"sqlite:///{store}"
    assert store.exists() and not (workdir / "mlflow.db").exists()


# Global-batch load balancing with accumulation: the loader's look-ahead restarts at the checkpoint's
# step and the routing pre-pass replays dropout and router jitter.
GLOBAL_BATCH = [
    "train.batch_size=4",
    "train.grad_accum=2",
    "model.moe.router.jitter_eps=0.1",
    "model.moe.losses.load_balancing={coef: 0.1, scope: global_batch}",
]


@pytest.mark.parametrize("options", [[], GLOBAL_BATCH], ids=["default", "global_batch_accum2"])
def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_run(workdir, tiny_spec_path, options):
    """Model, optimizer, schedule, data position and RNG all come back: the resumed run ends with
    exactly the validation loss of the run that was never interrupted."""
    loaded = load_spec(
        tiny_spec_path,
        ["train.checkpoint_every=6", "tracking.enabled=false", "model.dropout=0.1", *options],
    )
    straight = run(loaded, runs_root="a", progress=False)

    interrupted = Path("b") / "tiny" / "interrupted"
    shutil.copytree(straight.run_dir, interrupted)
    shutil.copy(interrupted / "checkpoints" / "step000006.ckpt", interrupted / "checkpoints" / "last.ckpt")
    resumed = run(loaded, runs_root="b", resume=str(interrupted), progress=False)

    assert resumed.steps == straight.steps == 12
    assert resumed.val_loss == straight.val_loss
