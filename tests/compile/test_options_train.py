"""Every `train`, `tracking` and `parallel` option changes what compile/ (and train/run.py) builds.

Optimizer and schedule options are checked on the built torch objects (param groups, a hand-computed
AdamW step, learning rates after scheduler steps); trainer options on a real `lightning.Trainer`
built from `trainer_kwargs`, so a misspelt keyword or a wrong unit would show; tracking options on
`run_name` / `run_tags`. The slow tests are real three-step training runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from moeplat.compile.model import build_model
from moeplat.compile.optim import build_optimizer, build_scheduler, lr_multiplier
from moeplat.compile.trainer import checkpoint_callback, trainer_kwargs
from moeplat.errors import SpecError
from moeplat.spec import load_spec
from moeplat.train.run import run, run_name, run_tags

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"


def _loaded(*overrides: str):
    return load_spec(TINY, list(overrides))


def _spec(*overrides: str):
    return _loaded(*overrides).spec


def _trainer(*overrides: str) -> L.Trainer:
    kw = trainer_kwargs(_spec("parallel.accelerator=cpu", *overrides))
    return L.Trainer(**kw, logger=False, enable_checkpointing=False, enable_progress_bar=False)


# --- train.optimizer --------------------------------------------------------------------------------


def test_optimizer_hyperparameters_reach_adamw():
    spec = _spec(
        "train.optimizer={kind: adamw, lr: 0.004, betas: [0.8, 0.9], eps: 1.0e-6, weight_decay: 0.3}"
    )
    opt = build_optimizer(spec.train, build_model(spec))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    for group in (decay, no_decay):
        assert group["lr"] == 0.004 and tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0


def test_weight_decay_applies_to_matrices_only():
    spec = _spec("train.optimizer.weight_decay=0.25", "train.optimizer.lr=0.1")
    model = build_model(spec)
    opt = build_optimizer(spec.train, model)
    decay_ids = {id(p) for p in opt.param_groups[0]["params"]}
    no_decay_ids = {id(p) for p in opt.param_groups[1]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay_ids) is (p.ndim >= 2), name
        assert (id(p) in no_decay_ids) is (p.ndim < 2), name
    assert len(decay_ids) + len(no_decay_ids) == len(list(model.parameters()))  # tied head once
    assert no_decay_ids  # the RMSNorm weights

    # With zero gradients AdamW's update is 0, so one step is pure decoupled decay: p *= 1 - lr * wd.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        factor = 1 - 0.1 * 0.25 if p.ndim >= 2 else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


@pytest.mark.parametrize(("lr", "eps"), [(0.01, 1e-8), (0.03, 1e-8), (0.01, 0.5)])
def test_lr_and_eps_set_the_first_adam_step(lr, eps):
    # First AdamW step, bias-corrected: m_hat = g, v_hat = g^2, so p -= lr * g / (|g| + eps)
    # whatever the betas (Kingma & Ba 2015, Alg. 1). Decay off to isolate it.
    spec = _spec(f"train.optimizer={{kind: adamw, lr: {lr}, eps: {eps}, weight_decay: 0.0}}")
    model = build_model(spec)
    opt = build_optimizer(spec.train, model)
    p = model.norm.weight
    g = torch.linspace(-1.0, 1.0, p.numel())
    before = p.detach().clone()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - lr * g / (g.abs() + eps))


def test_betas_set_the_second_adam_step():
    def two_steps(betas: str) -> torch.Tensor:
        spec = _spec(f"train.optimizer={{kind: adamw, lr: 0.01, betas: {betas}, weight_decay: 0.0}}")
        model = build_model(spec)
        opt = build_optimizer(spec.train, model)
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        p = model.norm.weight
        for g in (1.0, 3.0):
            p.grad = torch.full_like(p, g)
            opt.step()
        return p.detach()[0]

    def expected(b1: float, b2: float) -> float:
        m = (1 - b1) * (b1 * 1.0 + 3.0)
        v = (1 - b2) * (b2 * 1.0 + 9.0)
        step2 = (m / (1 - b1**2)) / (math.sqrt(v / (1 - b2**2)) + 1e-8)
        return 1.0 - 0.01 * 1.0 - 0.01 * step2

    assert two_steps("[0.9, 0.95]").item() == pytest.approx(expected(0.9, 0.95), rel=1e-6)
    assert two_steps("[0.5, 0.6]").item() == pytest.approx(expected(0.5, 0.6), rel=1e-6)
    assert expected(0.9, 0.95) != pytest.approx(expected(0.5, 0.6), rel=1e-4)


# --- train.schedule and max_steps -------------------------------------------------------------------


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # tiny: max_steps 12, warmup_cosine warmup 2, min_lr_ratio 0.1 (quickstart's)
        ([], {0: 0.5, 1: 1.0, 2: 1.0, 7: _cosine(0.5, 0.1), 12: 0.1, 20: 0.1}),
        (["train.schedule.min_lr_ratio=0.0"], {1: 1.0, 7: 0.5, 12: 0.0}),
        (["train.schedule.min_lr_ratio=0.5"], {7: 0.75, 12: 0.5}),
        (["train.schedule.warmup_steps=4"], {0: 0.25, 2: 0.75, 3: 1.0, 8: _cosine(0.5, 0.1), 12: 0.1}),
        (["train.schedule.warmup_steps=0"], {0: 1.0, 6: _cosine(0.5, 0.1), 12: 0.1}),
        (["train.max_steps=22"], {0: 0.5, 12: _cosine(0.5, 0.1), 22: 0.1}),
        (
            ["train.schedule={kind: constant, warmup_steps: 3}"],
            {0: 1 / 3, 1: 2 / 3, 2: 1.0, 11: 1.0, 50: 1.0},
        ),
        (["train.schedule={kind: constant}"], {0: 1.0, 5: 1.0, 12: 1.0}),
    ],
)
def test_schedule_options_give_hand_computed_lr_multipliers(overrides, expected):
    train = _spec(*overrides).train
    for step, mult in expected.items():
        assert lr_multiplier(train, step) == pytest.approx(mult, abs=1e-12), step


def test_scheduler_applies_the_multipliers_to_the_spec_lr():
    spec = _spec("train.optimizer.lr=0.002", "train.schedule={kind: warmup_cosine, warmup_steps: 4}")
    opt = build_optimizer(spec.train, torch.nn.Linear(2, 2))
    sched = build_scheduler(spec.train, opt)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.002 / 4)
    assert lrs[3] == pytest.approx(0.002)
    assert lrs[8] == pytest.approx(0.002 * _cosine(0.5, 0.1))
    assert lrs[12] == pytest.approx(0.002 * 0.1)
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"]  # decayed and not alike


# --- trainer_kwargs on a real Trainer -----------------------------------------------------------------


def test_trainer_options_reach_a_real_trainer():
    tr = _trainer(
        "train.max_steps=40",
        "train.grad_accum=3",
        "train.grad_clip=0.5",
        "train.val_every=7",
        "train.log_every=4",
        "train.schedule.warmup_steps=1",
    )
    assert tr.max_steps == 40
    assert tr.accumulate_grad_batches == 3
    assert tr.gradient_clip_val == 0.5
    assert tr.val_check_interval == 7 * 3  # Lightning counts micro-batches; the spec optimizer steps
    assert tr.limit_val_batches == 1.0  # all of the data module's validation sets (data.val_tokens)
    assert tr.log_every_n_steps == 4
    assert tr.check_val_every_n_epoch is None and tr.num_sanity_val_steps == 0


def test_grad_clip_null_turns_clipping_off():
    assert _trainer("train.grad_clip=null").gradient_clip_val is None
    assert trainer_kwargs(_spec("train.grad_clip=2.0"))["gradient_clip_val"] == 2.0


@pytest.mark.parametrize(("grad_accum", "val_every"), [(1, 6), (2, 6), (4, 3)])
def test_val_every_counts_optimizer_steps(grad_accum, val_every):
    kw = trainer_kwargs(_spec(f"train.grad_accum={grad_accum}", f"train.val_every={val_every}"))
    assert kw["val_check_interval"] == val_every * grad_accum
    assert kw["accumulate_grad_batches"] == grad_accum


def test_precision_selects_lightning_precision_plugin():
    full = _trainer("train.precision=32-true")
    assert full.precision == "32-true" and not isinstance(full.precision_plugin, MixedPrecision)
    bf16 = _trainer("train.precision=bf16-mixed")
    assert bf16.precision == "bf16-mixed" and isinstance(bf16.precision_plugin, MixedPrecision)
    assert bf16.precision_plugin.device == "cpu"
    # fp16 autocast does not exist on CPU: Lightning falls back to bf16 there (with a warning), so
    # only the keyword itself is checked here; a GPU run gets true fp16.
    assert trainer_kwargs(_spec("train.precision=16-mixed"))["precision"] == "16-mixed"


def test_parallel_accelerator_and_devices():
    assert trainer_kwargs(_spec("parallel.accelerator=gpu"))["accelerator"] == "gpu"
    assert trainer_kwargs(_spec())["accelerator"] == "auto"
    tr = _trainer("parallel.devices=1")
    assert type(tr.accelerator).__name__ == "CPUAccelerator" and tr.num_devices == 1
    with pytest.raises(SpecError) as err:
        _spec("parallel.devices=2")  # strategy single: tests/spec/test_parallel_spec.py
    assert [i.path for i in err.value.issues] == ["parallel.strategy"]


# --- train.checkpoint_every -------------------------------------------------------------------------


def test_checkpoint_every_saves_every_n_optimizer_steps(tmp_path):
    cb = checkpoint_callback(_spec("train.checkpoint_every=5"), tmp_path)
    assert cb._every_n_train_steps == 5 and cb.monitor is None
    assert cb.save_top_k == -1 and cb.save_last and Path(cb.dirpath) == tmp_path


def test_checkpoint_every_null_keeps_the_best_by_val_loss(tmp_path):
    cb = checkpoint_callback(_spec("train.checkpoint_every=null"), tmp_path)
    assert cb._every_n_train_steps == 0 and cb.monitor == "val/loss" and cb.mode == "min"
    assert cb.save_top_k == 1 and cb.save_last


# --- tracking: run_name template and tags -------------------------------------------------------------


def test_run_name_template_fields():
    loaded = _loaded(
        "model.moe.top_k=1",
        "tracking.run_name={name}/{router}/k{top_k}/E{num_experts}/[{overrides}]",
    )
    assert run_name(loaded) == (
        "tiny/topk/k1/E4/[ model.moe.top_k=1"
        " tracking.run_name={name}/{router}/k{top_k}/E{num_experts}/[{overrides}]]"
    )
    assert run_name(_loaded()) == "tiny"  # default "{name}{overrides}" without overrides
    assert run_name(_loaded("model.moe.num_experts=6")) == "tiny model.moe.num_experts=6"


def test_run_name_and_tags_of_a_dense_model():
    loaded = _loaded(
        "model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 64}", "tracking.run_name={router}-{top_k}"
    )
    assert run_name(loaded) == "dense-0"
    tags = run_tags(loaded)
    assert tags["moeplat.router"] == "dense" and tags["moeplat.dispatch"] == "none"


def test_run_tags_follow_the_spec():
    tags = run_tags(_loaded("model.moe.dispatch={kind: loop}", "model.moe.num_experts=6"))
    assert tags["moeplat.dispatch"] == "loop" and tags["moeplat.experts"] == "6xswiglu"
    assert tags["moeplat.spec_name"] == "tiny" and tags["moeplat.top_k"] == 2
    assert run_tags(_loaded())["moeplat.spec_hash"] != tags["moeplat.spec_hash"]


def test_run_name_with_an_unknown_field_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        _loaded("tracking.run_name={nmae}")
    assert [i.path for i in err.value.issues] == ["tracking.run_name"]


# --- real short runs (slow) ---------------------------------------------------------------------------

SHORT = ["train.max_steps=3", "train.val_every=3", "train.schedule.warmup_steps=1", "data.val_tokens=128"]


@pytest.mark.slow
def test_seed_and_tracking_disabled_in_real_runs(workdir):
    """train.seed: the same seed repeats a run exactly, another seed does not.
    tracking.enabled=false: no MLflow store is created. checkpoint_every: one file per N steps."""
    off = [*SHORT, "tracking.enabled=false", "train.checkpoint_every=1"]
    first = run(_loaded(*off, "train.seed=0"), progress=False)
    again = run(_loaded(*off, "train.seed=0"), progress=False)
    other = run(_loaded(*off, "train.seed=1"), progress=False)
    assert first.steps == 3 and first.run_id is None and first.tracking_uri is None
    assert Path(first.run_dir).resolve().parent == workdir / "runs" / "tiny"  # spec name names the run dir
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()
    assert first.val_loss == again.val_loss
    assert first.val_loss != other.val_loss
    ckpts = sorted(p.name for p in (Path(first.run_dir) / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step000001.ckpt", "step000002.ckpt", "step000003.ckpt"]


@pytest.mark.slow
def test_tracking_uri_experiment_and_run_name_in_a_real_run(workdir):
    from mlflow import MlflowClient

    store = workdir / "store" / "spec.db"
    store.parent.mkdir()
    loaded = _loaded(
        *SHORT,
        f"tracking.uri=sqlite:///{store}",
        "tracking.experiment=options-exp",
        "tracking.run_name={name}-E{num_experts}",
    )
    result = run(loaded, progress=False)
    assert result.tracking_uri == f"sqlite:///{store}" and store.exists()
    assert not (workdir / "mlflow.db").exists()
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("options-exp")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_id == result.run_id and r.info.run_name == "tiny-E4"


def test_train_seed_alone_decides_the_initial_weights():
    """build_model seeds itself from train.seed: the global RNG state before it does not matter."""

    def weights(seed_before: int, *overrides: str) -> torch.Tensor:
        torch.manual_seed(seed_before)
        return torch.cat([p.detach().flatten() for p in build_model(_spec(*overrides)).parameters()])

    torch.testing.assert_close(weights(1), weights(2), rtol=0, atol=0)
    assert not torch.equal(weights(1), weights(1, "train.seed=7"))
    state = torch.random.get_rng_state()
    build_model(_spec())
    assert torch.equal(state, torch.random.get_rng_state())  # and leaves the global RNG alone
