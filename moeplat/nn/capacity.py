"""Fixed expert capacity and which token-slots fit (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DROP_POLICIES = ("position", "probability")


def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 1
) -> int:
    """C = max(min_capacity, ceil(capacity_factor * T * K / E)) (Switch sec. 2.2, counting all K slots).

    min_capacity (at least 1) keeps small batches, e.g. short evaluation batches, from starving
    every expert (DeepSpeed-MoE's `min_capacity`).
    """
    assert capacity_factor > 0, capacity_factor
    assert min_capacity >= 1, min_capacity
    return max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    valid_TK: torch.Tensor | None = None,
    *,
    policy: str = "position",
    topk_weight_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool [T, K]: True where a token-slot fits within its expert's capacity.

    policy "position" (GShard Algorithm 1, Switch): every token's 1st choice is placed before any
    token's 2nd choice; within one choice rank, earlier tokens first.
    policy "probability": within each expert, the slots with the highest router weight
    `topk_weight_TK` are kept (the per-slot form of V-MoE's Batch Prioritized Routing, Riquelme et
    al. 2021 sec. 4.1); equal weights fall back to the position order.
    A dropped slot contributes nothing; the token still passes through the residual connection.
    Slots not in `valid_TK` (not routed) take no place in any queue and are never kept.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"policy must be one of {DROP_POLICIES}, got {policy!r}")
    T, K = topk_idx_TK.shape
    # Rank-major order: slot (k, t) comes before (k, t+1) and before (k+1, anything).
    idx_M = topk_idx_TK.t().reshape(-1)  # M = K*T slots in position-priority order
    order_M = torch.arange(idx_M.numel(), device=idx_M.device)
    if policy == "probability":
        if topk_weight_TK is None:
            raise ValueError("the probability drop policy needs topk_weight_TK")
        # Stable sort by descending weight: ties keep the rank-major (position) order.
        order_M = torch.sort(topk_weight_TK.detach().t().reshape(-1), descending=True, stable=True).indices
    onehot_ME = F.one_hot(idx_M[order_M], num_experts)  # slots in priority order
    if valid_TK is not None:
        onehot_ME = onehot_ME * valid_TK.t().reshape(-1, 1)[order_M]
    # 1-based position of each slot in its expert's queue (0 for slots not routed).
    position_sorted = (onehot_ME.cumsum(dim=0) * onehot_ME).sum(dim=-1)
    keep_sorted = (position_sorted <= capacity) & (position_sorted > 0)
    keep_M = torch.empty_like(keep_sorted).scatter_(0, order_M, keep_sorted)
    return keep_M.reshape(K, T).t().contiguous()
