"""Checkpoints that reload on a different ep_size.

A checkpoint always holds the *full* (unsharded) state_dict, laid out exactly as the
single-process model's: every ExpertParallelMoE's expert weights gathered over its EP group into
[E, D, F] / [E, F, D] (rank j's slice at rows [j E/ep, (j+1) E/ep)). Such a state_dict loads into
the plain model (ep_size = 1) with load_state_dict, and into a model of any ep_size dividing E
through `load_full_state_dict`, which keeps each rank's slice. With an FSDP2 dense part
(`dense: fsdp`) the other parameters are DTensors sharded over the world: they are gathered too
(`full_tensor`) and redistributed on load, so the file is the same whatever the dense layout.
The optimizer state (Adam's moments, one per parameter) is gathered and sliced the same way
(`full_optimizer_state` / `shard_optimizer_state`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from moeplat.parallel.grads import expert_parameters


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every sharded expert weight gathered (collective: every rank of
    each EP group must call it; every rank receives the full state_dict)."""
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    for name, p, layer in expert_parameters(model):
        group, n = layer.groups.ep_group, layer.groups.ep_size
        shards = [torch.empty_like(p) for _ in range(n)]
        if n == 1:
            shards = [p.detach().clone()]
        else:
            dist.all_gather(shards, p.detach().contiguous(), group=group)
        state[name] = torch.cat(shards, dim=0)
    return state


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict for this rank of `model` from a full one: expert weights sliced to the
    experts this rank owns, everything else as is. Not collective."""
    state = dict(full)
    for name, _, layer in expert_parameters(model):
        if name not in full:
            raise KeyError(f"the checkpoint has no expert weight {name!r}")
        if full[name].shape[0] != layer.num_experts:
            raise ValueError(
                f"{name}: the checkpoint holds {full[name].shape[0]} experts, the layer {layer.num_experts}"
            )
        mine = layer.groups.local_experts(layer.num_experts)
        state[name] = full[name][mine.start : mine.stop].clone()
    for name, v in model.state_dict().items():  # FSDP2's dense shards (collective)
        if isinstance(v, DTensor) and name in full:
            state[name] = distribute_tensor(full[name].to(v.device, v.dtype), v.device_mesh, v.placements)
    return state


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], strict: bool = True):
    """Load a full (single-process layout) state_dict into a model of any ep_size."""
    return model.load_state_dict(shard_state_dict(full, model), strict=strict)


def _expert_indices(optimizer, model: nn.Module) -> dict[int, tuple[nn.Parameter, object]]:
    """optimizer.state_dict() index -> (expert parameter, its layer) for the sharded weights
    (state_dict numbers the parameters in param_groups order)."""
    experts = {id(p): (p, layer) for _, p, layer in expert_parameters(model)}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {i: experts[id(p)] for i, p in enumerate(params) if id(p) in experts}


def full_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """optimizer.state_dict() as the single-process optimizer would hold it: the expert
    parameters' state (Adam's moments) gathered over the EP group, DTensor (FSDP2) state gathered
    over its mesh. Collective.

    The returned dict is the caller's: torch's `state_dict()` hands out the optimizer's own
    per-parameter dicts (`state["state"][i] is optimizer.state[p]`), so the gathered tensors go
    into copies of them -- writing into those dicts would swap a rank's [E/ep, ...] moments for
    the gathered [E, ...] ones (and FSDP2's DTensor moments for plain tensors) in the live
    optimizer, and the next step would fail or train on the wrong state (issue 14)."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {key: t.full_tensor() if isinstance(t, DTensor) else t for key, t in per_param.items()}
        for index, per_param in state["state"].items()
    }
    for index, (p, layer) in _expert_indices(optimizer, model).items():
        group, n = layer.groups.ep_group, layer.groups.ep_size
        for key, t in state["state"].get(index, {}).items():
            if torch.is_tensor(t) and t.shape == p.shape and n > 1:
                shards = [torch.empty_like(t) for _ in range(n)]
                dist.all_gather(shards, t.contiguous(), group=group)
                state["state"][index][key] = torch.cat(shards, dim=0)
    return state


def shard_optimizer_state(opt_state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """In place: a full optimizer state_dict (`full_optimizer_state`) cut to this rank -- expert
    state sliced to the rank's experts, the state of DTensor parameters distributed like them
    (collective when there are any); then `optimizer.load_state_dict(opt_state)` loads it."""
    for index, (p, layer) in _expert_indices(optimizer, model).items():
        mine = layer.groups.local_experts(layer.num_experts)
        for key, t in opt_state["state"].get(index, {}).items():
            if torch.is_tensor(t) and t.dim() and t.shape[0] == layer.num_experts:
                if t.shape[1:] != p.shape[1:]:
                    raise ValueError(f"optimizer state {key} of an expert weight: {tuple(t.shape)}")
                opt_state["state"][index][key] = t[mine.start : mine.stop].clone()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, p in enumerate(params):
        if isinstance(p, DTensor):
            for key, t in opt_state["state"].get(index, {}).items():
                if torch.is_tensor(t) and not isinstance(t, DTensor) and t.shape == p.shape:
                    opt_state["state"][index][key] = distribute_tensor(
                        t.to(p.device, t.dtype), p.device_mesh, p.placements
                    )
