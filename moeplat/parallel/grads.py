"""Gradient reduction under expert parallelism, and how it fits DDP.

Each rank's backward leaves in its parameters' .grad the gradient of *the sum of every rank's
loss* with respect to its own copy (the all-to-all's backward brings back the other ranks'
contributions to the local experts). Under the data-parallel convention (global objective = the
mean over the W ranks of the per-rank losses, what DDP computes), the gradient of:

    a replicated parameter (router, shared experts, attention, ...) = mean over the world of the
        local grads -- what DDP's all-reduce does;
    an expert parameter = sum over its EDP group of the local grads / W -- the expert sees the
        tokens of its EP group only; the EDP group covers the rest of the world
        (Megatron-LM: expert_gradient_scaling_factor = edp_size / dp_size with averaging in the
        collective, i.e. the same sum / W).

Expert parameters must therefore not go through DDP (which would average them with ranks that
hold *other* experts): `ignore_expert_params_in_ddp(model)` before wrapping the model in DDP,
then `reduce_expert_grads(model)` after backward and before the optimizer step. Without DDP,
`reduce_replicated_grads(model)` does DDP's part by hand. `average=False` gives the gradient of
the sum of the ranks' losses instead of their mean.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from moeplat.parallel.expert_parallel import ExpertParallelMoE


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ExpertParallelMoE]]:
    """(qualified name, parameter, owning layer) of every sharded expert weight in `model`."""
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for name, p in module.experts.named_parameters():
                yield (f"{prefix}." if prefix else "") + f"experts.{name}", p, module


def ignore_expert_params_in_ddp(model: nn.Module) -> list[str]:
    """Mark the expert weights so torch DDP neither broadcasts nor all-reduces them. Call it on the
    very module you then wrap in DistributedDataParallel (DDP reads the names, relative to that
    module, from its `_ddp_params_and_buffers_to_ignore`). Returns the names marked."""
    names = [name for name, _, _ in expert_parameters(model)]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def _all_reduce_grads(params: list[nn.Parameter], group, scale: float) -> None:
    """One flattened all-reduce (sum) of these parameters' grads over `group`, times `scale`."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(chunk.view_as(g))


def reduce_expert_grads(model: nn.Module, *, average: bool = True) -> None:
    """All-reduce each expert weight's grad over its EDP group only (sum, divided by the world size
    when `average`). A rank whose experts got no token has zero grads, never None, so every EDP
    member takes part in the collective."""
    by_group: dict[int, tuple[object, int, list[nn.Parameter]]] = {}
    for _, p, layer in expert_parameters(model):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = layer.groups
        by_group.setdefault(id(g.edp_group), (g.edp_group, g.world_size, []))[2].append(p)
    for group, world, params in by_group.values():
        _all_reduce_grads(params, group, 1.0 / world if average else 1.0)


def reduce_replicated_grads(
    model: nn.Module, group: dist.ProcessGroup | None = None, *, average: bool = True
) -> None:
    """DDP's part by hand: all-reduce every non-expert grad over the world `group` (mean or sum)."""
    experts = {id(p) for _, p, _ in expert_parameters(model)}
    params = [p for p in model.parameters() if id(p) not in experts and p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_grads(params, group, 1.0 / dist.get_world_size(group) if average else 1.0)
