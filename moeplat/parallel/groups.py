"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups.

Layout (Megatron-LM convention, no tensor or pipeline parallelism): the W ranks of the
data-parallel world form W / ep_size **EP groups of contiguous ranks**; EP group g is ranks
[g * ep_size, (g + 1) * ep_size). The rank with EP rank j inside its group owns experts
[j * E / ep_size, (j + 1) * E / ep_size). The **EDP group** of a rank is every rank with the same
EP rank (ranks r, r + ep_size, r + 2 ep_size, ...): they hold the same experts, so expert
gradients are reduced over it and over nothing else. Example, W = 4, ep_size = 2:

    EP groups  [0, 1] [2, 3]      (tokens travel by all-to-all inside these)
    EDP groups [0, 2] [1, 3]      (expert gradients are all-reduced inside these)

Contiguous EP groups keep the all-to-all within a node when ep_size <= GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


def expert_parallel_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(EP groups, EDP groups) as lists of global ranks, for a world of `world_size` ranks."""
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must be >= 1 and divide the world size ({world_size})")
    ep_groups = [list(range(g * ep_size, (g + 1) * ep_size)) for g in range(world_size // ep_size)]
    edp_groups = [list(range(j, world_size, ep_size)) for j in range(ep_size)]
    return ep_groups, edp_groups


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The process groups one rank takes part in. `dp_group` is the whole data-parallel world
    (None = the default group): replicated parameters (router, shared experts) and the balance
    statistics are reduced over it."""

    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    ep_size: int
    ep_rank: int  # this rank's position in its EP group = which slice of the experts it owns
    edp_size: int
    world_size: int

    def __deepcopy__(self, memo: dict) -> ExpertParallelGroups:
        return self  # process-group handles are shared by copies of a model, never copied

    def local_experts(self, num_experts: int) -> range:
        """The global ids of the experts this rank owns."""
        if num_experts % self.ep_size:
            raise ValueError(f"ep_size ({self.ep_size}) must divide num_experts ({num_experts})")
        n = num_experts // self.ep_size
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)


def init_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create the EP and EDP groups of this rank. Every rank must call it (dist.new_group is
    collective) after torch.distributed.init_process_group; ranks are laid out as above."""
    if not dist.is_initialized():
        raise RuntimeError("init_expert_parallel_groups needs torch.distributed to be initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_groups, edp_groups = expert_parallel_layout(world, ep_size)
    mine: dict[str, dist.ProcessGroup | None] = {}
    for kind, layout in (("ep", ep_groups), ("edp", edp_groups)):
        for ranks in layout:  # every rank creates every group, in the same order
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return ExpertParallelGroups(
        ep_group=mine["ep"],
        edp_group=mine["edp"],
        dp_group=None,
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        edp_size=world // ep_size,
        world_size=world,
    )
