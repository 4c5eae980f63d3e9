"""Expert specialisation by validation source (issue 17, part 3): a run whose validation is split by
source counts each MoE layer's routed slots per source and logs moe/specialization (+ per layer),
draws plots/specialization.png, and `moeplat compare` shows it; a single-source run logs none of it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from mlflow import MlflowClient

from moeplat.compile.data import build_data
from moeplat.compile.model import build_model
from moeplat.nn.specialization import specialization_bits
from moeplat.spec import load_spec
from moeplat.train.system import LMSystem

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
# code (the stdlib's source) and prose (this repository's docs/*.md): two real domains, no package needed
MIX = (
    "data.source={kind: mixture, sources: ["
    "{name: code, weight: 0.5, source: {kind: python_stdlib, max_bytes: 200000}}, "
    f"{{name: prose, weight: 0.5, source: {{kind: text_files, paths: ['{REPO / 'docs'}'], patterns: ['*.md']}}}}]}}"
)
BPE = "data.tokenizer={kind: bpe, vocab_size: 320, min_frequency: 2}"
SMALL = ["data.val_tokens=224", "train.batch_size=2", "model.vocab_size=auto"]  # 7 sequences a source


def _validate(*overrides: str) -> tuple[LMSystem, object]:
    """A freshly built model (seed 0) validated once on one CPU process."""
    loaded = load_spec(TINY, list(overrides))
    dm, _ = build_data(loaded.spec, loaded.base_dir)
    torch.manual_seed(0)
    system = LMSystem(build_model(loaded.spec), configure=None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(system, datamodule=dm, verbose=False)
    return system, dm


def _hand_count(model, dm) -> torch.Tensor:
    """Routed slots [source, layer, expert]: the model over each source's validation sequences."""
    model.eval()
    per_source = []
    with torch.no_grad():
        for val_set in dm.val_sets:
            x_BS = torch.stack([val_set[i][0] for i in range(len(val_set))])
            out = model(x_BS)
            per_source.append(torch.stack([out.moe[layer].routed_E.double() for layer in sorted(out.moe)]))
    return torch.stack(per_source)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_a_mixture_validation_logs_the_specialization_of_its_hand_counted_load(tokenizer):
    system, dm = _validate(MIX, *SMALL, *([BPE] if tokenizer == "bpe" else []))
    got = system.val_source_load
    assert got is not None and got.names == ["code", "prose"] and got.layers == [0, 1]
    want_SLE = _hand_count(system.model, dm)
    assert want_SLE[:, 0].sum(dim=1).tolist() == [7 * 32 * 2] * 2  # 7 sequences x 32 tokens x top-2
    assert torch.equal(torch.tensor(got.counts_SLE, dtype=torch.float64), want_SLE)
    m = system.last_val
    scores = [specialization_bits(want_SLE[:, j]) for j in range(2)]
    assert m["moe/layer00/specialization"] == pytest.approx(scores[0], rel=1e-12)
    assert m["moe/layer01/specialization"] == pytest.approx(scores[1], rel=1e-12)
    assert m["moe/specialization"] == pytest.approx(sum(scores) / 2, rel=1e-12)
    assert 0 < m["moe/specialization"] < 1  # two sources: at most H(1/2, 1/2) = 1 bit
    assert {k for k in m if "/load_entropy/" in k} == {
        f"moe/layer0{i}/load_entropy/{s}" for i in (0, 1) for s in ("code", "prose")
    }
    assert all(0 < m[k] <= 2 for k in m if "/load_entropy/" in k)  # 4 experts: at most 2 bits


def test_null_experts_weigh_each_source_by_its_real_expert_slots():
    """MoE++ null experts (a token takes 0-2 real experts): only real-expert slots count, so the two
    sources' weights differ from their equal token counts; the score is that of the hand count."""
    system, dm = _validate(MIX, *SMALL, "model.moe.router={kind: topk, null_experts: 2}")
    want_SLE = _hand_count(system.model, dm)
    assert torch.equal(torch.tensor(system.val_source_load.counts_SLE, dtype=torch.float64), want_SLE)
    slots = want_SLE[:, 0].sum(dim=1).tolist()
    assert slots[0] != slots[1] and max(slots) < 7 * 32 * 2
    scores = [specialization_bits(want_SLE[:, j]) for j in range(2)]
    assert system.last_val["moe/specialization"] == pytest.approx(sum(scores) / 2, rel=1e-12)


def test_a_single_source_validation_logs_no_specialization():
    system, _ = _validate(*SMALL)
    assert system.val_source_load is None
    assert not [k for k in system.last_val if "specialization" in k or "load_entropy" in k]


def test_a_mixture_run_logs_the_score_at_each_validation_draws_the_heatmap_and_compare_shows_it(tmp_path):
    from matplotlib.image import imread

    from moeplat.cli.compare import format_table
    from moeplat.track.compare import compare
    from moeplat.train.run import run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [MIX, *SMALL, "train.max_steps=4", "train.val_every=2"]
    overrides += ["tracking.system_metrics=false", "tracking.log_model=false"]
    result = run(load_spec(TINY, overrides), runs_root=tmp_path / "runs", tracking_uri=uri, progress=False)
    client = MlflowClient(uri)
    val_steps = sorted(m.step for m in client.get_metric_history(result.run_id, "val/loss"))
    assert len(val_steps) == 2  # val_every=2 of 4 steps
    for key in ("moe/specialization", "moe/layer00/specialization", "moe/layer01/load_entropy/prose"):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == val_steps, key
    assert "plots/specialization.png" in {a.path for a in client.list_artifacts(result.run_id, "plots")}
    png = client.download_artifacts(result.run_id, "plots/specialization.png", str(tmp_path))
    height, width, _ = imread(png).shape  # two layer panels side by side
    assert width > height > 100
    c = compare(uri, run_ids=[result.run_id])
    last = client.get_run(result.run_id).data.metrics["moe/specialization"]
    assert c.metrics["moe/specialization (last)"] == [last]
    assert c.metrics["moe/layer00/specialization"] == [
        client.get_run(result.run_id).data.metrics["moe/layer00/specialization"]
    ]
    assert "moe/specialization (last)" in format_table(c)


def _torchrun(out: Path, world: int, *overrides: str) -> list[dict]:
    """tests/data/val_by_data_ddp.py on `world` gloo processes: each rank's validation metrics."""
    import json

    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    with socket.socket() as sock:  # a free port: torchrun's --master-port 0 hangs with 2 processes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = REPO / "tests" / "data" / "val_by_data_ddp.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
    cmd += ["--master-port", str(port), str(script), str(out), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text())["metrics"] for r in range(world)]


@pytest.mark.slow
def test_two_ddp_ranks_count_the_load_one_process_counts(tmp_path):
    """7 sequences a source over 2 ranks (4 + 3, the short rank padded with an ignored sequence):
    the counts summed over ranks, padding left out, give the one-process scores."""
    (one,) = _torchrun(tmp_path / "one", 1, MIX, *SMALL)
    two = _torchrun(tmp_path / "two", 2, MIX, *SMALL)
    keys = [k for k in one if "specialization" in k or "load_entropy" in k]
    assert len(keys) == 1 + 2 + 4
    for metrics in two:
        for key in keys:
            assert metrics[key] == pytest.approx(one[key], rel=1e-9), key
