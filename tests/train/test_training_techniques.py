"""MoE training techniques in real Lightning runs of the tiny spec: router warm-up, alternating
updates, freezing, the router learning rate, upcycling a checkpoint written by `moeplat run`,
and --resume with all of them. Weights are read back from the per-step checkpoints."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from moeplat.cli.main import main
from moeplat.compile.model import build_model
from moeplat.compile.optim import partition
from moeplat.compile.upcycle import load_state_dict, upcycle_from_spec
from moeplat.spec import load_spec
from moeplat.train.run import run

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny.yaml"
SHORT = [
    "train.val_every=100",
    "data.val_tokens=128",
    "train.schedule.warmup_steps=1",
    "train.checkpoint_every=1",
    "tracking.enabled=false",
]
SIGMOID = ["model.moe.router={kind: sigmoid_bias, gamma: 0.01}", "model.moe.losses={}"]


def _run(steps: int, *overrides: str, **kw):
    loaded = load_spec(TINY, [*SHORT, f"train.max_steps={steps}", *overrides])
    return loaded.spec, run(loaded, progress=False, **kw)


def _groups_by_key(spec) -> dict[str, str]:
    """state_dict key -> router / experts / non_moe (buffers of a router count as router)."""
    model = build_model(spec)
    group_of = {id(p): g for g, ps in partition(model).items() for p in ps}
    names = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        owner = model.get_submodule(module)
        p = owner._parameters.get(leaf)
        names[key] = group_of[id(p)] if p is not None else "router"  # bias_E of sigmoid_bias
    return names


def _changed(run_dir: str, spec, steps: int) -> list[set[str]]:
    """For each step 1..steps, the groups whose weights changed in that step (bit-exact)."""
    groups = _groups_by_key(spec)
    states = [build_model(spec).state_dict()]
    states += [load_state_dict(f"{run_dir}/checkpoints/step{s:06d}.ckpt") for s in range(1, steps + 1)]
    changed = []
    for before, after in itertools.pairwise(states):
        changed.append({groups[k] for k in groups if not torch.equal(before[k], after[k])})
    return changed


def test_router_warm_up_keeps_the_router_and_its_bias_bit_identical(workdir):
    spec, result = _run(5, *SIGMOID, "train.router_frozen_steps=3")
    changed = _changed(result.run_dir, spec, 5)
    assert changed == [{"experts", "non_moe"}] * 3 + [{"router", "experts", "non_moe"}] * 2
    # without the option the router moves from the first step: the test above can fail
    spec, result = _run(2, *SIGMOID)
    assert _changed(result.run_dir, spec, 2) == [{"router", "experts", "non_moe"}] * 2


def test_alternating_updates_follow_the_phases(workdir):
    spec, result = _run(6, "train.alternate={every: 2}", "train.grad_accum=2")
    changed = _changed(result.run_dir, spec, 6)
    router, rest = {"router"}, {"experts", "non_moe"}
    assert changed == [router, router, rest, rest, router, router]


def test_freeze_trains_only_the_other_groups_and_logs_the_count(workdir):
    loaded = load_spec(
        TINY, [*SHORT, "train.max_steps=3", "tracking.enabled=true", "train.freeze=[router, experts]"]
    )
    result = run(loaded, progress=False)
    spec = loaded.spec
    assert _changed(result.run_dir, spec, 3) == [{"non_moe"}] * 3
    client = MlflowClient(result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics["train/trainable_params"]
    model = build_model(spec)
    assert logged == sum(p.numel() for p in partition(model)["non_moe"])


def test_router_lr_multiplier_in_the_saved_optimizer(workdir):
    spec, result = _run(4, "train.router_lr_multiplier=0.1")
    ckpt = torch.load(f"{result.run_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    groups = {g["name"]: g for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert groups["router_decay"]["lr"] == pytest.approx(0.1 * groups["decay"]["lr"], rel=1e-12)
    assert groups["decay"]["lr"] < spec.train.optimizer.lr  # the cosine schedule did act on both


def test_resume_continues_warm_up_alternation_and_lr_ratio_exactly(workdir):
    options = ["train.router_frozen_steps=3", "train.alternate={every: 2, start: rest}"]
    options += ["train.router_lr_multiplier=3.0", "train.checkpoint_every=2", *SIGMOID]
    loaded = load_spec(TINY, [*SHORT, "train.max_steps=8", "train.val_every=8", *options])
    straight = run(loaded, runs_root="a", progress=False)
    interrupted = Path("b") / "tiny" / "interrupted"
    shutil.copytree(straight.run_dir, interrupted)
    shutil.copy(interrupted / "checkpoints" / "step000002.ckpt", interrupted / "checkpoints" / "last.ckpt")
    resumed = run(loaded, runs_root="b", resume=str(interrupted), progress=False)
    assert resumed.steps == straight.steps == 8
    assert resumed.val_loss == straight.val_loss
    for step in (4, 6, 8):  # the weights, the router's bias_E included, bit for bit
        a = load_state_dict(f"{straight.run_dir}/checkpoints/step{step:06d}.ckpt")
        b = load_state_dict(str(interrupted / "checkpoints" / f"step{step:06d}.ckpt"))
        assert all(torch.equal(a[k], b[k]) for k in a), step


def test_upcycle_a_dense_moeplat_run_then_train_and_resume_without_it(workdir, capsys):
    dense_over = ["model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 32}"]
    dense_spec, dense = _run(4, *dense_over)
    dense_model = build_model(dense_spec)
    dense_model.load_state_dict(load_state_dict(dense.run_dir))

    init = f"train.init={{kind: upcycle, checkpoint: {dense.run_dir}}}"
    spec = load_spec(TINY, [*SHORT, "train.max_steps=4", init]).spec
    moe = build_model(spec)
    assert upcycle_from_spec(spec, moe)
    x = torch.randint(0, 256, (2, 16))
    want, got = dense_model.eval()(x, x), moe.eval()(x, x)
    torch.testing.assert_close(got.logits_BSV, want.logits_BSV, rtol=1e-5, atol=1e-5)

    # the real run starts there (its step-1 experts are one small step away from the dense FFN)
    args = ["run", str(TINY), "--no-progress", "--runs-dir", "up"]
    for o in [*SHORT, "train.max_steps=4", "train.checkpoint_every=2", init]:
        args += ["--set", o]
    assert main(args) == 0
    run_dir = next((workdir / "up" / "tiny").iterdir())
    step2 = load_state_dict(str(run_dir / "checkpoints" / "step000002.ckpt"))
    dense_w = dense_model.blocks[0].ffn.w_up.weight.t()
    drift = (step2["blocks.0.ffn.experts.w_up"] - dense_w).abs().max().item()
    fresh_drift = (build_model(spec).blocks[0].ffn.experts.w_up - dense_w).abs().max().item()
    assert drift < 0.1 * fresh_drift

    # --resume reads the run's own checkpoint, not the dense one (which may be gone by then)
    shutil.rmtree(dense.run_dir)
    shutil.copy(run_dir / "checkpoints" / "step000002.ckpt", run_dir / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main([*args, "--resume", str(run_dir)]) == 0
    assert "4 steps" in capsys.readouterr().out

    # and a fresh run without it is a spec error naming the field: exit 2, nothing trained
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.init.checkpoint" in err and "no such file" in err
