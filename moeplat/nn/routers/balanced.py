"""Routers that balance by construction: Sinkhorn balanced assignment (S-BASE) and expert choice."""

from __future__ import annotations

import math

import torch

from moeplat.nn.experts import MLPExperts
from moeplat.nn.routers.base import LinearRouter, RouterOutput, chosen_weights


def sinkhorn(logits_TE: torch.Tensor, n_iters: int) -> torch.Tensor:
    """log Q, where Q ~ exp(logits) is scaled so each expert's column sums to 1/E and each token's
    row to 1/T (Sinkhorn-Knopp matrix scaling, Cuturi 2013), in log space for stability.

    Each iteration normalises columns, then rows, so rows hold exactly after the last one and
    columns converge. n_iters = 0 returns the logits unchanged.
    """
    T, E = logits_TE.shape
    log_q_TE = logits_TE.float()
    for _ in range(n_iters):
        log_q_TE = log_q_TE - log_q_TE.logsumexp(dim=0, keepdim=True) - math.log(E)
        log_q_TE = log_q_TE - log_q_TE.logsumexp(dim=1, keepdim=True) - math.log(T)
    return log_q_TE


class SinkhornRouter(LinearRouter):
    """S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models"):
    BASE layers' balanced token-to-expert assignment (Lewis et al. 2021) approximated by Sinkhorn.

    Training: the experts are the top-k of the Sinkhorn-balanced matrix sinkhorn(logits) (no
    gradient through the assignment); the combine weights are the plain softmax probabilities of
    those experts, renormalised if `normalize`, so the router learns through them as in top-k.
    Evaluation: plain top-k of the softmax (deterministic and per token, as the papers evaluate).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        iterations: int = 10,
        normalize: bool = True,
        **options,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.iterations, self.normalize = iterations, normalize

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.training:
            balanced_TE = sinkhorn(logits_TE.detach(), self.iterations)
            topk_idx_TK = balanced_TE.topk(self.top_k, dim=-1).indices
        else:
            topk_idx_TK = probs_TE.topk(self.top_k, dim=-1).indices
        weight_TK = chosen_weights(probs_TE, topk_idx_TK, self.normalize)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, weight_TK)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iterations={self.iterations}, normalize={self.normalize}"


def expert_choice_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * k / E), between 1 and T (Zhou et al. 2022, sec. 3.2: k = n c / e)."""
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


class ExpertChoiceRouter(LinearRouter):
    """Expert choice routing (Zhou et al. 2022, sec. 3.2, eq. 1-2): each expert picks its top-C tokens.

        S = Softmax(X W_g)  [T, E];   G, I = TopK(S^T, C)  (per expert, over tokens)

    and token t's output is sum over the experts e that picked it of S[t, e] * FFN_e(x_t). A token
    may be picked by 0..E experts; every expert processes exactly C tokens, so load is balanced by
    construction. The decision is returned as E slots per token (slot e = expert e) with
    `valid_TK` marking the experts that picked the token. Note: an expert's choice depends on all
    tokens of the batch, future positions included, so in a causal LM it is not causal.
    """

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, *, capacity_factor: float = 1.0, **options
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.capacity_factor = capacity_factor

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        C = expert_choice_capacity(T, E, self.top_k, self.capacity_factor)
        token_EC = probs_TE.detach().t().topk(C, dim=-1).indices
        picked_ET = torch.zeros(E, T, dtype=torch.bool, device=probs_TE.device)
        picked_ET.scatter_(1, token_EC, True)
        return RouterOutput(
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            topk_idx_TK=torch.arange(E, device=probs_TE.device).expand(T, E),
            topk_weight_TK=probs_TE,
            valid_TK=picked_ET.t(),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"


def expert_choice_reference(
    experts: MLPExperts, x_TD: torch.Tensor, probs_TE: torch.Tensor, capacity: int
) -> torch.Tensor:
    """Slow, obviously-correct expert choice (Zhou et al. 2022 eq. 2), one expert at a time: kept forever
    to test ExpertChoiceRouter + the dispatchers against (house principle 5)."""
    y_TD = torch.zeros(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, torch.float32), device=x_TD.device)
    for e in range(experts.num_experts):
        token_C = probs_TE[:, e].topk(capacity).indices
        out_CD = experts(x_TD[token_C], e)
        y_TD = y_TD.index_add(0, token_C, probs_TE[token_C, e].unsqueeze(-1).to(y_TD.dtype) * out_CD)
    return y_TD.to(x_TD.dtype)
