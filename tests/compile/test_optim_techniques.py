"""The MoE training options of `train` (freeze, router_frozen_steps, router_lr_multiplier, alternate):
validation errors naming the field, the parameter groups, and what the built optimizer and update
schedule do to real parameters (checked step by step on a real AdamW)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeplat.compile.model import build_model
from moeplat.compile.optim import (
    build_optimizer,
    build_scheduler,
    build_update_schedule,
    lr_multiplier,
    partition,
)
from moeplat.errors import SpecError
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tiny.yaml"
DENSE = ["model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 64}"]
HASH = ["model.moe.top_k=1", "model.moe.router={kind: hash}", "model.moe.losses={}"]


def _spec(*overrides: str):
    return load_spec(TINY, list(overrides)).spec


def _paths(err) -> list[str]:
    return [i.path for i in err.value.issues]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "paths"),
    [
        (["train.freeze=[router, experts, non_moe]"], ["train.freeze"]),
        (["train.freeze=[experts, experts]"], ["train.freeze"]),
        (["train.freeze=[attention]"], ["train.freeze.0"]),
        (["train.freeze=[router]", "train.router_frozen_steps=2"], ["train.router_frozen_steps"]),
        (["train.freeze=[router]", "train.router_lr_multiplier=0.1"], ["train.router_lr_multiplier"]),
        (["train.freeze=[router]", "train.alternate={every: 2}"], ["train.alternate"]),
        (["train.freeze=[experts, non_moe]", "train.alternate={every: 2}"], ["train.alternate"]),
        (["train.router_frozen_steps=12"], ["train.router_frozen_steps"]),  # tiny: max_steps 12
        (["train.router_frozen_steps=-1"], ["train.router_frozen_steps"]),
        (["train.router_lr_multiplier=0"], ["train.router_lr_multiplier"]),
        (["train.alternate={every: 0}"], ["train.alternate.every"]),
        (["train.alternate={every: 2, start: experts}"], ["train.alternate.start"]),
    ],
)
def test_invalid_options_name_the_field(overrides, paths):
    with pytest.raises(SpecError) as err:
        _spec(*overrides)
    assert _paths(err) == paths


@pytest.mark.parametrize(
    ("overrides", "paths"),
    [
        ([*DENSE, "train.freeze=[router]"], ["train.freeze"]),
        ([*DENSE, "train.freeze=[non_moe]"], ["train.freeze"]),
        ([*DENSE, "train.router_frozen_steps=3"], ["train.router_frozen_steps"]),
        (
            [*DENSE, "train.router_lr_multiplier=2.0", "train.alternate={every: 1}"],
            ["train.router_lr_multiplier", "train.alternate"],
        ),
        ([*DENSE, "train.init={kind: upcycle, checkpoint: x.ckpt}"], ["train.init"]),
        # a router without parameters: nothing to warm up, scale or freeze
        ([*HASH, "train.router_lr_multiplier=0.5"], ["train.router_lr_multiplier"]),
        ([*HASH, "train.freeze=[router]"], ["train.freeze"]),
    ],
)
def test_options_the_model_cannot_honour_are_spec_errors(overrides, paths):
    with pytest.raises(SpecError) as err:  # `moeplat validate` already says so
        _spec(*overrides)
    assert sorted(_paths(err)) == sorted(paths)


def test_the_defaults_and_the_options_on_an_moe_model_pass():
    _spec()
    _spec(*DENSE)
    _spec("train.freeze=[non_moe]", "train.router_lr_multiplier=0.1", "train.alternate={every: 3}")


# --- parameter groups and freeze ------------------------------------------------------------------


def test_partition_by_module():
    spec = _spec(
        "model.moe.shared_experts={count: 1, gate: true}",
        "model.moe.layers={kind: list, layers: [1]}",
        "model.dense_ffn={kind: swiglu, d_ff: 64}",
    )
    model = build_model(spec)
    groups = partition(model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {g: sorted(names[id(p)] for p in ps) for g, ps in groups.items()}
    assert got["router"] == ["blocks.1.ffn.router.weight", "blocks.1.ffn.shared_gate.weight"]
    assert got["experts"] == sorted(
        ["blocks.1.ffn.experts.w_gate", "blocks.1.ffn.experts.w_up", "blocks.1.ffn.experts.w_down"]
        + [f"blocks.1.ffn.shared.{w}.weight" for w in ("w_gate", "w_up", "w_down")]
    )
    assert "blocks.0.ffn.w_up.weight" in got["non_moe"] and "tok_emb.weight" in got["non_moe"]
    assert sum(len(v) for v in got.values()) == len(list(model.parameters()))  # each once, tied head once


@pytest.mark.parametrize("frozen", [["router"], ["experts"], ["non_moe"], ["router", "experts"]])
def test_freeze_turns_requires_grad_off_and_leaves_the_groups_out(frozen):
    spec = _spec(f"train.freeze={frozen}")
    model = build_model(spec)
    opt = build_optimizer(spec.train, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for group, params in partition(model).items():
        for p in params:
            assert p.requires_grad is (group not in frozen)
            assert (id(p) in in_opt) is (group not in frozen)
    n_frozen = sum(p.numel() for g in frozen for p in partition(model)[g])
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total - n_frozen > 0


# --- router_lr_multiplier ---------------------------------------------------------------------------


def test_router_lr_multiplier_gets_its_own_groups_and_survives_the_schedule():
    spec = _spec("train.router_lr_multiplier=0.25", "train.optimizer.lr=0.004")
    model = build_model(spec)
    opt = build_optimizer(spec.train, model)
    sched = build_scheduler(spec.train, opt)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"decay", "no_decay", "router_decay"}  # routers have no 1-D params
    router_ids = {id(p) for p in partition(model)["router"]}
    assert {id(p) for p in by_name["router_decay"]["params"]} == router_ids
    assert not router_ids & {id(p) for p in by_name["decay"]["params"] + by_name["no_decay"]["params"]}
    assert by_name["router_decay"]["weight_decay"] == spec.train.optimizer.weight_decay
    for step in range(spec.train.max_steps + 1):  # warmup_cosine: warm-up, decay, floor
        expected = 0.004 * lr_multiplier(spec.train, step)
        assert by_name["decay"]["lr"] == pytest.approx(expected, rel=1e-12)
        assert by_name["router_decay"]["lr"] == pytest.approx(0.25 * expected, rel=1e-12)
        opt.step()
        sched.step()


def test_router_lr_multiplier_scales_the_first_adam_step():
    # First AdamW step without decay: p -= lr * g / (|g| + eps), so the router moves lr * mult.
    def first_step(mult: float) -> tuple[torch.Tensor, torch.Tensor]:
        spec = _spec(f"train.router_lr_multiplier={mult}", "train.optimizer.weight_decay=0.0")
        model = build_model(spec)
        opt = build_optimizer(spec.train, model)
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        router, expert = model.blocks[0].ffn.router.weight, model.blocks[0].ffn.experts.w_up
        idx = [id(p) for p in model.parameters()]
        return (before[idx.index(id(router))] - router.detach()), (
            before[idx.index(id(expert))] - expert.detach()
        )

    lr = _spec().train.optimizer.lr  # no scheduler here: the groups' initial lr
    router, expert = first_step(0.1)
    torch.testing.assert_close(router, torch.full_like(router, 0.1 * lr), rtol=1e-4, atol=0)
    torch.testing.assert_close(expert, torch.full_like(expert, lr), rtol=1e-4, atol=0)


# --- the update schedule: router warm-up and alternating updates -----------------------------------


def test_no_schedule_without_options():
    assert build_update_schedule(_spec().train, build_model(_spec())) is None


@pytest.mark.parametrize(
    ("overrides", "held"),
    [
        (["train.router_frozen_steps=3"], ["r", "r", "r", "", "", ""]),
        (["train.alternate={every: 2}"], ["en", "en", "r", "r", "en", "en"]),
        (["train.alternate={every: 1, start: rest}"], ["r", "en", "r", "en", "r", "en"]),
        (["train.alternate={every: 2}", "train.router_frozen_steps=1"], ["ren", "en", "r", "r", "en", "en"]),
        (["train.freeze=[experts]"], ["e"] * 6),
        (
            ["train.freeze=[experts]", "train.alternate={every: 3, start: rest}"],
            ["er", "er", "er", "en", "en", "en"],
        ),
    ],
)
def test_held_groups_by_step(overrides, held):
    spec = _spec(*overrides)
    schedule = build_update_schedule(spec.train, build_model(spec))
    letters = {"router": "r", "experts": "e", "non_moe": "n"}
    got = ["".join(sorted(letters[g] for g in schedule.held(s))) for s in range(6)]
    assert got == ["".join(sorted(h)) for h in held]


def test_held_parameters_do_not_move_not_even_by_weight_decay():
    """A held group's gradients are dropped, so AdamW (weight decay 0.1 here) skips it: bit-identical.
    Zeroing the gradients instead would still decay it; the test checks both."""
    spec = _spec("train.router_frozen_steps=2", "train.optimizer.lr=0.01")
    model = build_model(spec)
    opt = build_optimizer(spec.train, model)
    schedule = build_update_schedule(spec.train, model)
    router = partition(model)["router"]
    start = [p.detach().clone() for p in router]
    x = torch.randint(0, 256, (2, 16))
    for step in range(3):
        opt.zero_grad()
        out = model(x, x)
        (out.loss + out.aux_loss).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
        held = schedule.hold(step)
        assert ("router" in held) is (step < 2)
        opt.step()
        same = [torch.equal(p.detach(), s) for p, s in zip(router, start, strict=True)]
        assert all(same) if step < 2 else not any(same), step
    # the counterfactual: zero gradients do not keep AdamW's decoupled decay away
    p = router[0]
    before = p.detach().clone()
    opt.zero_grad()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert not torch.equal(p.detach(), before)
