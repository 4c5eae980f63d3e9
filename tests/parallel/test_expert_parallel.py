"""Expert parallelism on CPU (gloo): equal to the single-process MoELayer on the concatenated batch.

The multi-process cases live in ep_helpers.py (spawned workers import them by module name).
"""

from __future__ import annotations

import copy

import ep_helpers as h
import pytest
import torch

from moeplat.parallel.groups import ExpertParallelGroups, expert_parallel_layout

DROPLESS_AND_DROPS = [
    {"E": 4, "K": 1, "cf": None},
    {"E": 4, "K": 2, "cf": None},
    {"E": 4, "K": 1, "cf": 0.75},  # capacity_scope "global" (default): the single-process drops
    {"E": 8, "K": 2, "cf": 0.5},
    {"E": 4, "K": 2, "cf": None, "dispatcher": "all_gather"},
    {"E": 8, "K": 2, "cf": 0.5, "dispatcher": "all_gather"},
    {"E": 4, "K": 2, "cf": None, "null_experts": 2},  # MoE++ null slots: invalid, never sent
    {"E": 4, "K": 2, "cf": 0.75, "null_experts": 2},
]


def test_layout_megatron_convention() -> None:
    assert expert_parallel_layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert expert_parallel_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert expert_parallel_layout(2, 1) == ([[0], [1]], [[0, 1]])
    with pytest.raises(ValueError, match="divide the world size"):
        expert_parallel_layout(4, 3)


def test_local_experts_slice() -> None:
    g = ExpertParallelGroups(None, None, None, ep_size=2, ep_rank=1, edp_size=2, world_size=4)
    assert g.local_experts(8) == range(4, 8)
    with pytest.raises(ValueError, match="must divide num_experts"):
        g.local_experts(5)
    assert copy.deepcopy(g) is g  # a deep-copied model shares its process groups


def test_bad_options_name_the_field() -> None:
    g = ExpertParallelGroups(None, None, None, ep_size=1, ep_rank=0, edp_size=1, world_size=1)
    from moeplat.parallel.expert_parallel import ExpertParallelMoE

    with pytest.raises(ValueError, match="capacity_scope"):
        ExpertParallelMoE(h.build_layer(4, 1, None), g, capacity_scope="group")
    with pytest.raises(ValueError, match="dispatcher"):
        ExpertParallelMoE(h.build_layer(4, 1, None), g, dispatcher="ring")


# One set of processes per world size (spawning and importing torch costs seconds); each case's
# failure names it. See ep_helpers.py for what each case checks.
@pytest.mark.slow
def test_two_processes(tmp_path) -> None:
    h.spawn(
        h.run_plan,
        2,
        [
            ("case_collectives", ()),  # uneven all-to-all, all-gather, reduce-scatter and backward
            ("case_equal_single", (2, DROPLESS_AND_DROPS)),  # ep_size = world
            ("case_remote_only_and_drops", ()),  # tokens with only remote experts; rank vs global
            ("case_ddp", (2,)),  # torch DDP with the expert weights ignored
            ("case_transformer", (2, 1.0)),  # a whole TransformerLM through shard_moe_layers
            ("case_checkpoint", (2, [2], str(tmp_path / "ep2.pt"))),  # ep 2 -> plain MoELayer, ep 2
        ],
    )


@pytest.mark.slow
def test_four_processes(tmp_path) -> None:
    # capacity "global" counts over the EP group: with ep_size 2 < world 4 only dropless runs
    # equal the single-process layer on the world's batch
    dropless = [c for c in DROPLESS_AND_DROPS if c["cf"] is None]
    h.spawn(
        h.run_plan,
        4,
        [
            ("case_collectives", ()),
            ("case_equal_single", (4, DROPLESS_AND_DROPS)),  # ep_size = world, one EDP group each
            ("case_equal_single", (2, dropless)),  # two EP groups, two EDP groups
            ("case_dispatchers_agree", (2,)),
            ("case_transformer", (2, None)),
            ("case_ddp", (2,)),
            ("case_checkpoint", (2, [2, 4], str(tmp_path / "ep2.pt"))),  # -> plain, ep 2, ep 4
        ],
    )


def test_torch_version_has_gloo_all_to_all() -> None:
    assert torch.distributed.is_available() and torch.distributed.is_gloo_available()
