"""Auxiliary router losses and routing statistics. All results are float32."""

from __future__ import annotations

import torch


def expert_load(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of the T*K token-slots routed to each expert, shape [E], sums to 1. Not differentiable."""
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts)
    return counts_E.float() / topk_idx_TK.numel()


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4), generalised to top-k.

        loss = E * sum_i f_i * P_i
        f_i  = (token-slots routed to expert i) / (T * K)     -- counts, carries no gradient
        P_i  = (1/T) * sum_t probs_TE[t, i]                  -- differentiable

    Dividing f by T*K (as Megatron-LM's switch_load_balancing_loss does) makes the loss exactly
    1.0 at perfect balance (f_i = P_i = 1/E) for every K. Hand check: E=2, T=2, K=1, tokens to
    experts [0, 0], probs [[.75, .25], [.25, .75]] -> f=[1, 0], P=[.5, .5] -> 2 * (1*.5) = 1.0.
    """
    f_E = expert_load(topk_idx_TK, num_experts)
    P_E = probs_TE.float().mean(dim=0)
    return num_experts * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): (1/T) * sum_t (logsumexp_e logits_te)^2.

    Keeps router logits small so the float32 softmax stays well conditioned. Hand check: one token
    with logits [0, 0] -> logsumexp = ln 2 -> loss = (ln 2)^2 ~= 0.4805.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
