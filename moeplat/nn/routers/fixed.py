"""Routers without learned weights: hash layers and uniform random routing (ablations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeplat.nn.routers.base import Router, RouterOutput


class HashRouter(Router):
    """Hash Layers (Roller et al. 2021, the "Random Hash" variant): expert = hash(token id), fixed forever.

    The hash is a lookup table drawn once from `seed` (not from the global RNG, so the same seed
    gives the same table whatever else was built): a random permutation of the vocabulary taken
    modulo E, so every expert owns floor(V/E) or ceil(V/E) token ids. The table is a buffer and
    travels with checkpoints. One expert per token with weight 1; there are no router weights, so
    no gradient reaches the routing. probs_TE is the one-hot assignment (entropy 0).
    The layer must be given the token ids (TransformerLM passes them through Block to MoELayer).
    """

    def __init__(self, num_experts: int, vocab_size: int, *, seed: int = 0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.vocab_size, self.seed = num_experts, 1, vocab_size, seed
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table_V", torch.randperm(vocab_size, generator=g) % num_experts)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        if token_ids_T is None:
            raise ValueError("hash routing needs the token ids: call MoELayer(x, token_ids=...)")
        topk_idx_TK = self.table_V[token_ids_T.reshape(-1)].unsqueeze(-1)
        return RouterOutput(
            logits_TE=None,
            probs_TE=F.one_hot(topk_idx_TK[:, 0], self.num_experts).float(),
            topk_idx_TK=topk_idx_TK,
            topk_weight_TK=torch.ones(topk_idx_TK.shape, dtype=torch.float32, device=x_TD.device),
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, vocab_size={self.vocab_size}, seed={self.seed}"


class RandomRouter(Router):
    """Uniformly random routing, the ablation of THOR (Zuo et al. 2022, "Taming Sparsely Activated
    Transformer with Stochastic Experts", sec. 3: experts picked at random, no learned gate).

    Training: each token gets K distinct experts drawn uniformly (the top K of E U(0,1) draws from
    the global RNG), each with weight 1/K. Evaluation must be deterministic, so it uses the
    expectation of the training-time output: all E experts with weight 1/E (for any K, a uniform
    K-subset averaged over all subsets weights every expert 1/E). probs_TE is uniform (entropy ln E).
    """

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        T, E, dev = x_TD.shape[0], self.num_experts, x_TD.device
        if self.training:
            topk_idx_TK = torch.rand(T, E, device=dev).topk(self.top_k, dim=-1).indices
        else:
            topk_idx_TK = torch.arange(E, device=dev).expand(T, E)
        K = topk_idx_TK.shape[1]
        return RouterOutput(
            logits_TE=None,
            probs_TE=torch.full((T, E), 1.0 / E, device=dev),
            topk_idx_TK=topk_idx_TK,
            topk_weight_TK=torch.full((T, K), 1.0 / K, device=dev),
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"
