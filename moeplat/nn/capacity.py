"""Fixed expert capacity and which token-slots fit (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * K / E), at least 1 (Switch sec. 2.2, counting all K slots)."""
    assert capacity_factor > 0, capacity_factor
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    topk_idx_TK: torch.Tensor, num_experts: int, capacity: int, valid_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """bool [T, K]: True where a token-slot fits within its expert's capacity.

    Priority (GShard Algorithm 1, Switch): every token's 1st choice is placed before any token's
    2nd choice; within one choice rank, earlier tokens first. A dropped slot contributes nothing;
    the token still passes through the residual connection. Slots not in `valid_TK` (not routed)
    take no place in any queue and are never kept.
    """
    T, K = topk_idx_TK.shape
    # Rank-major order: slot (k, t) comes before (k, t+1) and before (k+1, anything).
    idx_KT = topk_idx_TK.t().reshape(-1)
    onehot_ME = F.one_hot(idx_KT, num_experts)  # M = K*T slots in priority order
    if valid_TK is not None:
        onehot_ME = onehot_ME * valid_TK.t().reshape(-1, 1)
    # 1-based position of each slot in its expert's queue (0 for slots not routed).
    position_M = (onehot_ME.cumsum(dim=0) * onehot_ME).sum(dim=-1)
    keep_KT = ((position_M <= capacity) & (position_M > 0)).reshape(K, T)
    return keep_KT.t().contiguous()
