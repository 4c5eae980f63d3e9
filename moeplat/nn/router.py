"""Top-k softmax router (Shazeer et al. 2017 without the noise term; Switch, Mixtral, OLMoE)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RouterOutput:
    """The routing decision, returned rather than stashed (house principle 6)."""

    logits_TE: torch.Tensor  # float32, pre-softmax; feeds the z-loss
    probs_TE: torch.Tensor  # float32 softmax over all E experts; feeds the balancing loss
    topk_idx_TK: torch.Tensor  # int64 expert ids, highest probability first
    topk_weight_TK: torch.Tensor  # float32 combine weights for the chosen experts


class TopKRouter(nn.Module):
    """Linear scores -> softmax over E experts -> the K largest.

    `normalize=True` rescales the K chosen probabilities to sum to 1 (Mixtral, Jiang et al. 2024);
    `normalize=False` keeps the raw softmax probabilities (Switch, Fedus et al. 2021 eq. 1-2;
    Qwen1.5-MoE), so a token's routed output is damped when the router is unsure.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, normalize: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.d_model, self.num_experts, self.top_k, self.normalize = d_model, num_experts, top_k, normalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # as Linear(D, E, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d_model)  # nn.Linear's default distribution
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # ST-MoE (Zoph et al. 2022, sec. 3.2): the router's softmax is sensitive to round-off, so
        # logits are computed in float32 even under bf16 autocast or with bf16 inputs/weights.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        topk_weight_TK, topk_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize={self.normalize}"
        )
