"""Dynamic routing: a varying number of experts per token (top-p, Huang et al. 2024)."""

from __future__ import annotations

import torch

from moeplat.nn.routers.base import LinearRouter, RouterOutput


def top_p_choice(
    probs_TE: torch.Tensor, p: float, max_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(topk_idx_TK, weight_TK, valid_TK), K = max_k: each token's experts in decreasing
    probability, taken while the probability of those before is below p (Huang et al. 2024: the
    smallest prefix of the sorted experts whose cumulative probability reaches p, the expert
    that crosses p included, so at least one), at most max_k of them. Slots past that are invalid
    with weight 0. p >= 1 takes all max_k (float rounding of a cumulative sum must not stop it short).

    Hand check: probs [.5, .3, .2], p = .6 -> before = [0, .5, .8] -> experts 0 and 1, weights .5, .3.
    """
    weight_TK, topk_idx_TK = probs_TE.topk(max_k, dim=-1)  # sorted, largest first
    before_TK = torch.cat([torch.zeros_like(weight_TK[:, :1]), weight_TK[:, :-1].cumsum(dim=-1)], dim=-1)
    valid_TK = before_TK < p if p < 1 else torch.ones_like(weight_TK, dtype=torch.bool)
    return topk_idx_TK, weight_TK.masked_fill(~valid_TK, 0.0), valid_TK


def top_p_reference(probs_TE: torch.Tensor, p: float, max_k: int) -> list[list[tuple[int, float]]]:
    """Plain reference of top_p_choice, one token at a time: [(expert, probability), ...] per token."""
    chosen = []
    for row in probs_TE.tolist():
        order = sorted(range(len(row)), key=lambda e: -row[e])
        picked, total = [], 0.0
        for e in order[:max_k]:
            if total >= p and p < 1:
                break
            picked.append((e, row[e]))
            total += row[e]
        chosen.append(picked)
    return chosen


class TopPRouter(LinearRouter):
    """Top-p ("dynamic") routing (Huang et al. 2024, "Harder Tasks Need More Experts"):
    softmax over the E experts, then each token takes experts in decreasing probability until
    their cumulative probability reaches `p` (top_p_choice), so a confident token uses one expert
    and an unsure one several. `top_k` caps the count (top_k = E: no cap): the slots are [T, top_k],
    and those a token does not use are invalid, so they are never dispatched, cost no FLOPs and take
    no capacity. Weights are the chosen probabilities, unnormalised as in the paper (and the authors'
    released inference code); `normalize=True` rescales them to sum to 1 per token.

    Huang et al. pair it with the dynamic loss, the router entropy (moeplat.nn.losses.dynamic_loss):
    without it a router can make every distribution flat and use many experts.
    """

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, p: float, normalize: bool = False, **options
    ) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        super().__init__(d_model, num_experts, top_k, **options)
        self.p, self.normalize = p, normalize

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        topk_idx_TK, weight_TK, valid_TK = top_p_choice(probs_TE, self.p, self.top_k)
        if self.normalize:  # invalid slots are 0 already; the first slot is always valid
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, weight_TK, valid_TK=valid_TK)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, normalize={self.normalize}"
