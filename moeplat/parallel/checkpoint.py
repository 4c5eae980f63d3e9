"""Checkpoints that reload on a different ep_size.

A checkpoint always holds the *full* (unsharded) state_dict, laid out exactly as the
single-process model's: every ExpertParallelMoE's expert weights gathered over its EP group into
[E, D, F] / [E, F, D] (rank j's slice at rows [j E/ep, (j+1) E/ep)). Such a state_dict loads into
the plain model (ep_size = 1) with load_state_dict, and into a model of any ep_size dividing E
through `load_full_state_dict`, which keeps each rank's slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeplat.parallel.grads import expert_parameters


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every sharded expert weight gathered (collective: every rank of
    each EP group must call it; every rank receives the full state_dict)."""
    state = model.state_dict()
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
    return state


def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], strict: bool = True):
    """Load a full (single-process layout) state_dict into a model of any ep_size."""
    return model.load_state_dict(shard_state_dict(full, model), strict=strict)
