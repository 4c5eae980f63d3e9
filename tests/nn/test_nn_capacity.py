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
