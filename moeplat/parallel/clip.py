"""Gradient clipping by the global norm when the gradient lives in pieces over ranks.

Under expert parallelism a rank holds (after moeplat.parallel.grads' reductions):

    expert grads: this rank's E / ep_size experts; the EP group holds all E, and every EP group
        (every EDP replica) the same values;
    dense grads: replicated (DDP: every rank the whole, equal values) or, with an FSDP2 dense
        part, DTensor shards (Shard(0) over the world mesh: each rank a disjoint slice).

torch.nn.utils.clip_grad_norm_ on a rank's own parameters sees only its experts (a different
norm on every rank, so different clip factors and replicas that drift apart), and refuses a mix
of DTensor and plain tensors. The single-process norm (Pascanu et al. 2013, "On the difficulty of
training recurrent neural networks", Algorithm 1: g <- g * max_norm / ||g|| when ||g|| > max_norm)
is ||g||^2 = ||dense||^2 + ||experts||^2 with

    ||dense||^2   = local sum of squares (replicated), or summed over the DTensor's mesh (sharded);
    ||experts||^2 = local sum of squares, all-reduced (sum) over the EP group -- once.

Every rank gets the same norm, hence the same factor, as one process would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moeplat.parallel.grads import expert_parameters


def _sum_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares in float64 (each norm at least float32, as clip_grad_norm_ computes it)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
    return torch.stack([n.double() ** 2 for n in norms]).sum()


def _summed(local: torch.Tensor, group) -> torch.Tensor:
    if dist.get_world_size(group) > 1:
        dist.all_reduce(local, group=group)
    return local


@torch.no_grad()
def global_grad_norm(params: list[nn.Parameter], model: nn.Module) -> torch.Tensor:
    """The 2-norm of the whole single-process gradient of `params` (None grads skipped). Collective
    over the EP group and the FSDP2 mesh: every rank must call it."""
    experts = {id(p): layer.groups.ep_group for _, p, layer in expert_parameters(model)}
    plain, sharded, by_group = [], {}, {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if id(p) in experts:
            by_group.setdefault(id(experts[id(p)]), (experts[id(p)], []))[1].append(g)
        elif isinstance(g, DTensor):
            sharded.setdefault(id(g.device_mesh), (g.device_mesh, []))[1].append(g)
        else:
            plain.append(g)
    total = _sum_squares(plain)
    for mesh, grads in sharded.values():
        if mesh.ndim == 1 and all(pl.is_shard() for g in grads for pl in g.placements):
            local = _sum_squares([g.to_local() for g in grads]).to(grads[0].to_local().device)
            total = total + _summed(local, mesh.get_group()).cpu()
        else:  # replicated or 2D (HSDP) layouts: DTensor's own reduction, one per tensor
            total = total + sum(torch.linalg.vector_norm(g).full_tensor().double().cpu() ** 2 for g in grads)
    for group, grads in by_group.values():
        local = _sum_squares(grads).to(grads[0].device)
        total = total + _summed(local, group).cpu()
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(optimizer, clip_val: float, *, model: nn.Module) -> torch.Tensor:
    """Lightning's Precision.clip_grad_by_norm for expert-parallel models: scale every gradient of
    the optimizer's parameters by min(1, clip_val / (||g|| + 1e-6)) with the global ||g||, as
    torch.nn.utils.clip_grad_norm_ does in one process. Returns ||g||."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = global_grad_norm(params, model)
    coef = torch.clamp(clip_val / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.device, g.dtype))
    return norm
