"""Spec -> optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moeplat.spec.sections import Constant, TrainSpec, WarmupCosine


def build_optimizer(train: TrainSpec, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (and stacked expert weights) only; norms and
    1-D parameters are not decayed (common practice since GPT-2/nanoGPT)."""
    opt = train.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)


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
