"""Expert capacity and the keep mask (GShard / Switch priority)."""

import torch

from moeplat.nn import capacity_keep_mask, expert_capacity


def test_expert_capacity_formula():
    assert expert_capacity(num_tokens=8, num_experts=4, top_k=2, capacity_factor=1.0) == 4
    assert expert_capacity(8, 4, 2, 1.25) == 5  # ceil(5.0)
    assert expert_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(1, 64, 1, 0.01) == 1  # never below 1


def test_keep_mask_first_choices_before_second_choices():
    # E=3, capacity 2. Hand-worked, rank-major:
    #   1st choices: t0->0 (#1), t1->0 (#2), t2->0 (#3, drop), t3->1 (#1)
    #   2nd choices: t0->1 (#2), t1->2 (#1), t2->1 (#3, drop), t3->0 (#4, drop)
    # (token-major order would instead keep t2's 2nd choice and drop t3's 1st.)
    topk_idx_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    expected = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    assert torch.equal(capacity_keep_mask(topk_idx_TK, num_experts=3, capacity=2), expected)


def test_keep_mask_respects_capacity_and_keeps_earliest_tokens():
    torch.manual_seed(0)
    T, E, K, C = 50, 4, 2, 9
    topk_idx_TK = torch.rand(T, E).argsort(dim=-1)[:, :K]
    keep_TK = capacity_keep_mask(topk_idx_TK, E, C)
    kept_per_expert = torch.bincount(topk_idx_TK[keep_TK], minlength=E)
    assert (kept_per_expert <= C).all()
    # Work-conserving: an expert that dropped anything is exactly full.
    total_per_expert = torch.bincount(topk_idx_TK.reshape(-1), minlength=E)
    assert torch.equal(kept_per_expert, torch.minimum(total_per_expert, torch.tensor(C)))
    # Within the first-choice rank, an expert's kept tokens are a prefix of the tokens choosing it.
    for e in range(E):
        chose = topk_idx_TK[:, 0] == e
        kept = keep_TK[:, 0][chose]
        assert not (kept[1:] & ~kept[:-1]).any()


def test_keep_mask_large_capacity_keeps_everything():
    topk_idx_TK = torch.randint(0, 4, (16, 1))
    assert capacity_keep_mask(topk_idx_TK, 4, capacity=16).all()


def test_slots_not_routed_take_no_place_in_the_queue():
    # The same routing as above, but t1's first choice is not routed (e.g. a skipped GShard slot):
    # t2's first choice moves up to #2 on expert 0 and is kept; t3's second choice (#3) still drops.
    topk_idx_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    valid_TK = torch.tensor([[True, True], [False, True], [True, True], [True, True]])
    keep = capacity_keep_mask(topk_idx_TK, num_experts=3, capacity=2, valid_TK=valid_TK)
    assert keep.tolist() == [[True, True], [False, True], [True, False], [True, False]]


def test_min_capacity_is_a_floor_on_the_capacity():
    assert expert_capacity(8, 4, 2, 1.0, min_capacity=3) == 4  # ceil(4.0) wins
    assert expert_capacity(8, 4, 2, 1.0, min_capacity=6) == 6  # the floor wins
    assert expert_capacity(1, 64, 1, 0.01, min_capacity=1) == 1


def test_probability_policy_keeps_the_heaviest_slots_of_each_expert():
    # E=2, capacity 1. Hand-worked:
    #   expert 0 gets (t0,k0,.6) (t1,k0,.7) (t2,k1,.1): probability keeps t1's; position keeps t0's
    #   expert 1 gets (t0,k1,.4) (t1,k1,.3) (t2,k0,.9): both keep t2's first choice
    topk_idx_TK = torch.tensor([[0, 1], [0, 1], [1, 0]])
    topk_weight_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    prob = capacity_keep_mask(topk_idx_TK, 2, 1, policy="probability", topk_weight_TK=topk_weight_TK)
    pos = capacity_keep_mask(topk_idx_TK, 2, 1, policy="position", topk_weight_TK=topk_weight_TK)
    assert prob.tolist() == [[False, False], [True, False], [True, False]]
    assert pos.tolist() == [[True, False], [False, False], [True, False]]


def test_probability_policy_ties_fall_back_to_position_and_skips_unrouted_slots():
    topk_idx_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    ones = torch.ones(4, 2)
    valid_TK = torch.tensor([[True, True], [False, True], [True, True], [True, True]])
    for valid in (None, valid_TK):
        prob = capacity_keep_mask(topk_idx_TK, 3, 2, valid, policy="probability", topk_weight_TK=ones)
        assert torch.equal(prob, capacity_keep_mask(topk_idx_TK, 3, 2, valid))


def test_probability_policy_never_drops_a_heavier_slot_than_it_keeps():
    torch.manual_seed(0)
    T, E, K, C = 60, 4, 2, 11
    topk_idx_TK = torch.rand(T, E).argsort(dim=-1)[:, :K]
    w_TK = torch.rand(T, K)
    keep_TK = capacity_keep_mask(topk_idx_TK, E, C, policy="probability", topk_weight_TK=w_TK)
    total_per_expert = torch.bincount(topk_idx_TK.reshape(-1), minlength=E)
    kept_per_expert = torch.bincount(topk_idx_TK[keep_TK], minlength=E)
    assert torch.equal(kept_per_expert, torch.minimum(total_per_expert, torch.tensor(C)))
    for e in range(E):
        mine = topk_idx_TK == e
        kept, dropped = w_TK[mine & keep_TK], w_TK[mine & ~keep_TK]
        if dropped.numel():
            assert kept.min() > dropped.max()
    assert (~keep_TK).any()
