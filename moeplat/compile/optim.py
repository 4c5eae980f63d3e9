"""Spec -> optimizer, learning-rate schedule, and which parameters each optimizer step updates.

The MoE training techniques of `train` act on three parameter groups (`partition`):

- router: every parameter of an MoE layer outside its experts, i.e. what computes the mixing
  weights: the router (scores, noise weights) and the gates of the shared experts;
- experts: the routed experts and the shared experts of every MoE layer (shared experts count as
  experts, as in DeepSeekMoE, Dai et al. 2024, sec. 3.2, where they are "shared experts");
- non_moe: everything outside the MoE layers (embedding, attention, norms, dense FFNs, head).

`freeze` switches a group off for the whole run (requires_grad=False, not in the optimizer).
Router warm-up and alternating updates hold a group for some steps instead: its gradients are
set to None before the step (LMSystem.on_before_optimizer_step), and torch's AdamW skips a
parameter without gradient entirely, so neither the update nor the decoupled weight decay moves it
and its Adam moments stay as they were.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moeplat.nn import MoELayer
from moeplat.spec.sections import PARAM_GROUPS, Constant, TrainSpec, WarmupCosine

log = logging.getLogger(__name__)

# submodules of an MoELayer that hold experts; every other MoE-layer parameter is "router"
EXPERT_MODULES = ("experts", "shared")


def partition(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of `model` by group (router, experts, non_moe), each once (a tied head once)."""
    moe_group: dict[int, str] = {}
    for layer in model.modules():
        # MoELayer, or moeplat.parallel's ExpertParallelMoE (same submodule names)
        if isinstance(layer, MoELayer) or getattr(layer, "shards_moe_layer", False):
            for name, p in layer.named_parameters():
                moe_group[id(p)] = "experts" if name.split(".")[0] in EXPERT_MODULES else "router"
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in PARAM_GROUPS}
    for p in model.parameters():
        groups[moe_group.get(id(p), "non_moe")].append(p)
    return groups


def apply_freeze(train: TrainSpec, model: nn.Module) -> None:
    """requires_grad=False on the groups `train.freeze` names (idempotent)."""
    groups = partition(model)
    for group in train.freeze:
        for p in groups[group]:
            p.requires_grad_(False)


def build_optimizer(train: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (and stacked expert weights) only; norms and
    1-D parameters are not decayed (common practice since GPT-2/nanoGPT).

    Freezes the groups `train.freeze` names first; only trainable parameters enter the optimizer.
    With router_lr_multiplier != 1 the routers get their own two groups at lr * multiplier (the
    schedule multiplies every group's initial lr, so the ratio holds at every step). Groups are
    named ("decay", "no_decay", "router_decay", "router_no_decay"); empty ones are left out.
    """
    opt = train.optimizer
    apply_freeze(train, model)
    groups = partition(model)
    split_router = train.router_lr_multiplier != 1.0
    router_ids = {id(p) for p in groups["router"]} if split_router else set()
    params = [p for p in model.parameters() if p.requires_grad]
    main = [p for p in params if id(p) not in router_ids]
    router = [p for p in params if id(p) in router_ids]
    router_lr = opt.lr * train.router_lr_multiplier
    param_groups = [
        {"name": "decay", "params": [p for p in main if p.ndim >= 2], "weight_decay": opt.weight_decay},
        {"name": "no_decay", "params": [p for p in main if p.ndim < 2], "weight_decay": 0.0},
        {
            "name": "router_decay",
            "params": [p for p in router if p.ndim >= 2],
            "weight_decay": opt.weight_decay,
            "lr": router_lr,
        },
        {
            "name": "router_no_decay",
            "params": [p for p in router if p.ndim < 2],
            "weight_decay": 0.0,
            "lr": router_lr,
        },
    ]
    param_groups = [g for g in param_groups if g["params"]]
    return torch.optim.AdamW(param_groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)


def lr_multiplier(train: TrainSpec, step: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    sched = train.schedule
    if sched.warmup_steps and step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    if isinstance(sched, Constant):
        return 1.0
    assert isinstance(sched, WarmupCosine)
    span = max(1, train.max_steps - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(train: TrainSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(train, step))


@dataclass(frozen=True)
class UpdateSchedule:
    """Which groups an optimizer step holds still: router warm-up and alternating updates.

    Every step holds the `frozen` groups (train.freeze; they have no gradients anyway, but the
    router's online state, the aux-loss-free bias, must not move either). Step s (0-based
    optimizer step) also holds the router while s < router_frozen_steps. With
    alternate_every = n, phase (s // n) % 2 alternates between updating only the router and
    updating everything but the router, starting with `alternate_start` ("router" or "rest"); the
    warm-up wins over a router phase (nothing is then updated). `groups` are the model's parameters
    by group (see `partition`). The step counter is Lightning's global_step, saved in checkpoints,
    so a resumed run continues the same schedule.
    """

    groups: dict[str, list[nn.Parameter]] = field(repr=False)
    frozen: frozenset[str] = frozenset()
    router_frozen_steps: int = 0
    alternate_every: int | None = None
    alternate_start: str = "router"

    def held(self, step: int) -> frozenset[str]:
        """The groups step `step` does not update: the frozen ones and the step-dependent holds."""
        held = set(self.frozen)
        if step < self.router_frozen_steps:
            held.add("router")
        if self.alternate_every:
            router_phase = ((step // self.alternate_every) % 2 == 0) == (self.alternate_start == "router")
            held |= {"experts", "non_moe"} if router_phase else {"router"}
        return frozenset(held)

    def hold(self, step: int) -> frozenset[str]:
        """Drop the gradients of the groups held at `step` (call after backward, before the step)."""
        held = self.held(step)
        for group in held:
            for p in self.groups[group]:
                p.grad = None
        return held


def build_update_schedule(train: TrainSpec, model: nn.Module) -> UpdateSchedule | None:
    """The holds of `train` (freeze, router_frozen_steps, alternate); None when there are none."""
    if not train.freeze and not train.router_frozen_steps and train.alternate is None:
        return None
    alt = train.alternate
    return UpdateSchedule(
        partition(model),
        frozen=frozenset(train.freeze),
        router_frozen_steps=train.router_frozen_steps,
        alternate_every=alt.every if alt else None,
        alternate_start=alt.start if alt else "router",
    )


def count_trainable(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])
