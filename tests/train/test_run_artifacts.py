"""What a run leaves in MLflow besides the spec: telemetry interval, plots (also at checkpoints),
run metadata, system metrics, and the model/ artifact (its eval is tests/cli/test_eval.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import yaml
from matplotlib.image import imread
from mlflow import MlflowClient

from moeplat.spec import load_spec
from moeplat.train.plots import MoEPlots
from moeplat.train.run import run

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"

PLOTS = {
    "plots/load_heatmap_layers.png",
    "plots/load_over_steps_layer00.png",
    "plots/load_over_steps_layer01.png",
    "plots/dropped_frac.png",
    "plots/router_entropy.png",
}


class _AtCheckpoint(L.Callback):
    """Records, at each checkpoint, the plots already in the MLflow run (MoEPlots runs before)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.seen: dict[int, set[str]] = {}
        self.plots: MoEPlots | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        client = MlflowClient(self.uri)
        arts = {a.path for a in client.list_artifacts(trainer.logger.version, "plots")}
        self.seen.setdefault(trainer.global_step, set()).update(arts)
        self.plots = next(c for c in trainer.callbacks if isinstance(c, MoEPlots))


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifacts")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [
        "train.checkpoint_every=6",
        "train.moe_log_every=4",
        "tracking.system_metrics_every_s=0.2",
        "tracking.peak_tflops=100",
    ]
    probe = _AtCheckpoint(uri)
    result = run(
        load_spec(TINY, overrides),
        runs_root=tmp / "runs",
        tracking_uri=uri,
        progress=False,
        callbacks=(probe,),
    )
    client = MlflowClient(uri)
    return result, client, client.get_run(result.run_id), probe


def test_moe_telemetry_follows_its_own_interval(tracked_run):
    _, client, r, _ = tracked_run
    steps = [m.step for m in client.get_metric_history(r.info.run_id, "moe/layer00/maxvio")]
    assert sorted(steps) == [0, 4, 8]  # moe_log_every=4, not log_every=3
    loss_steps = {m.step for m in client.get_metric_history(r.info.run_id, "train/loss")}
    assert len(loss_steps) == 4  # train/* still every log_every=3 of the 12 steps
    for key in ("moe/layer01/load_balancing", "moe/layer01/z_loss", "moe/all/z_loss", "moe/layer00/load/e03"):
        assert key in r.data.metrics, key


def test_plots_are_artifacts_and_redrawn_at_checkpoints(tracked_run):
    result, client, r, probe = tracked_run
    assert probe.seen[6] >= PLOTS  # drawn and uploaded at the step-6 checkpoint, before the end
    assert probe.plots.history.steps == [0, 4, 8]
    assert probe.plots.renders == 2  # step 6 and step 12 (checkpoint and train end draw once)
    assert {a.path for a in client.list_artifacts(r.info.run_id, "plots")} == PLOTS
    for name in PLOTS:
        path = client.download_artifacts(r.info.run_id, name, str(result.run_dir))
        height, width, _ = imread(path).shape
        assert height >= 250 and width >= 500, name


def test_run_metadata(tracked_run):
    _, _, r, _ = tracked_run
    t, m, p = r.data.tags, r.data.metrics, r.data.params
    assert r.info.run_name.startswith("tiny train.checkpoint_every=6 train.moe_log_every=4")
    assert t["moeplat.strategy"] == "single" and t["moeplat.devices"] == "1"
    assert t["moeplat.router"] == "topk" and t["moeplat.top_k"] == "2" and t["moeplat.device_name"] == "cpu"
    assert t["git.dirty"] in {"true", "false"} and len(t["git.commit"]) in {40, 7} and t["host"]
    import torch

    assert t["version.torch"] == torch.__version__ and t["version.mlflow"] and t["version.moeplat"]
    assert int(p["plan.total_params"]) > int(p["plan.active_params"]) > 0
    flops_per_token = int(p["plan.flops_per_token_train"])
    assert m["perf/tokens_seen"] == 12 * 4 * 32  # steps x batch x seq_len
    assert m["perf/flops_per_s"] == pytest.approx(m["perf/tokens_per_s"] * flops_per_token, rel=1e-6)
    assert m["perf/mfu"] == pytest.approx(m["perf/flops_per_s"] / 100e12, rel=1e-6)  # tracking.peak_tflops
    assert m["perf/wall_s"] > 0


def test_system_metrics_are_on_by_default(tracked_run):
    _, _, r, _ = tracked_run
    assert "system/cpu_utilization_percentage" in r.data.metrics
    assert "system/system_memory_usage_megabytes" in r.data.metrics


def test_model_artifact_holds_weights_and_resolved_spec(tracked_run):
    result, client, r, _ = tracked_run
    assert {a.path for a in client.list_artifacts(r.info.run_id, "model")} == {
        "model/weights.pt",
        "model/spec.yaml",
        "model/meta.json",
    }
    local = client.download_artifacts(r.info.run_id, "model", str(result.run_dir) + "/dl")
    spec = yaml.safe_load(Path(local, "spec.yaml").read_text())
    assert spec["train"]["moe_log_every"] == 4 and spec["model"]["d_model"] == 32  # resolved, with --set
    meta = json.loads(Path(local, "meta.json").read_text())
    assert meta["step"] == 12 and meta["val_loss"] == pytest.approx(result.val_loss)
