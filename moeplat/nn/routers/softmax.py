"""Token-choice softmax routers: top-k (Mixtral), Switch top-1, noisy top-k (Shazeer), GShard top-2."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeplat.nn.routers.base import LinearRouter, RouterOutput, chosen_weights, without_null_experts


class TopKRouter(LinearRouter):
    """Linear scores -> softmax over E experts -> the K largest.

    `normalize=True` rescales the K chosen probabilities to sum to 1 (Mixtral, Jiang et al. 2024);
    `normalize=False` keeps the raw softmax probabilities (Switch, Fedus et al. 2021 eq. 1-2;
    Qwen1.5-MoE), so a token's routed output is damped when the router is unsure.

    `null_experts` N > 0 adds N zero experts (MoE++, Jin et al. 2024, eq. 3: E_zero(x) = 0): the
    router scores X = E + N experts (an [X, D] weight), and the softmax, the top-k and the weights
    are those of this router over X experts (MoE++ eq. 1 is normalize=False). A slot that goes to a
    null expert adds zero, so it is returned invalid (moeplat.nn.routers.base.without_null_experts):
    never dispatched, no FLOPs, no capacity; a token with all K slots null gets the residual only.
    MoE++'s copy (E(x) = x) and constant (a1 x + a2 v) experts, its gating residuals (eq. 6) and
    per-kind capacity (eq. 8) are not implemented; its balancing loss is losses.null_balancing_loss.
    `num_experts` stays E, the real experts the layer computes.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        normalize: bool = True,
        null_experts: int = 0,
        **options,
    ) -> None:
        if null_experts < 0:
            raise ValueError(f"null_experts must be >= 0, got {null_experts}")
        super().__init__(d_model, num_experts + null_experts, top_k, **options)
        self.num_experts, self.null_experts = num_experts, null_experts
        self.normalize = normalize

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TX = self.logits(x_TD)  # X = E + null_experts columns (X = E without null experts)
        probs_TX = logits_TX.softmax(dim=-1)
        topk_idx_TK = probs_TX.topk(self.top_k, dim=-1).indices
        weight_TK = chosen_weights(probs_TX, topk_idx_TK, self.normalize)
        if self.null_experts:
            return without_null_experts(logits_TX, probs_TX, topk_idx_TK, weight_TK, self.num_experts)
        return RouterOutput(logits_TX, probs_TX, topk_idx_TK, weight_TK)

    def extra_repr(self) -> str:
        nulls = f", null_experts={self.null_experts}" if self.null_experts else ""
        return f"{super().extra_repr()}, normalize={self.normalize}{nulls}"


class SwitchRouter(TopKRouter):
    """Switch Transformer routing (Fedus et al. 2021, eq. 1-2): top-1 of the softmax, weighted by p_i(x).

    The chosen expert's raw probability is the combine weight (normalising would make it 1 and
    cut the router's gradient). Input jitter U(1 - eps, 1 + eps), eps = 1e-2 by default, is applied
    in training only (see LinearRouter).
    """

    def __init__(self, d_model: int, num_experts: int, *, jitter_eps: float = 1e-2, **options) -> None:
        super().__init__(d_model, num_experts, 1, normalize=False, jitter_eps=jitter_eps, **options)


class NoisyTopKRouter(LinearRouter):
    """Noisily gated top-k (Shazeer et al. 2017, sec. 2.1, eq. 3-5), noise in training only.

        H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)          (eq. 4)
        G(x)   = Softmax(KeepTopK(H(x), k))                                      (eq. 3, 5)

    so the combine weights are the softmax of the k kept noisy logits (they sum to 1). probs_TE is
    the softmax of H over all E experts (for the balancing loss and the entropy). In training the
    output also carries Shazeer's smooth load estimate (App. A, eq. 8-9)

        P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i))

    the probability that expert i stays in the top k when only its own noise is redrawn; the
    `load` loss (CV^2 of sum_x P(x, .)) is built on it. W_noise is initialised to zero (App. A),
    so the initial noise std is softplus(0) = ln 2.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, **options) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))

    def init_weights(self, std: float) -> None:
        super().init_weights(std)
        nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        x_TD = self.router_input(x_TD)
        clean_TE = self.project(x_TD, self.weight)
        noisy_TE, load_prob_TE = clean_TE, None
        if self.training:
            noise_std_TE = F.softplus(self.project_noise(x_TD))
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            load_prob_TE = self.load_probability(clean_TE, noisy_TE, noise_std_TE)
        kept_TK, topk_idx_TK = noisy_TE.topk(self.top_k, dim=-1)
        return RouterOutput(
            logits_TE=noisy_TE,
            probs_TE=noisy_TE.softmax(dim=-1),
            topk_idx_TK=topk_idx_TK,
            topk_weight_TK=kept_TK.softmax(dim=-1),  # eq. 3: softmax over the kept logits only
            load_prob_TE=load_prob_TE,
        )

    def project_noise(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.noise_weight.float())

    def load_probability(
        self, clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor
    ) -> torch.Tensor:
        """Shazeer et al. 2017 eq. 9. kth_excluding(H, k, i) is the k-th largest of H without i:
        the (k+1)-th largest for an expert in the top k, the k-th largest for one outside it."""
        k = self.top_k
        if k == self.num_experts:
            return torch.ones_like(clean_TE)
        top_TK1 = noisy_TE.topk(k + 1, dim=-1).values
        threshold_if_in_T1, threshold_if_out_T1 = top_TK1[:, k : k + 1], top_TK1[:, k - 1 : k]
        is_in_TE = noisy_TE > threshold_if_in_T1
        threshold_TE = torch.where(is_in_TE, threshold_if_in_T1, threshold_if_out_T1)
        z_TE = (clean_TE - threshold_TE) / noise_std_TE
        return 0.5 * (1 + torch.erf(z_TE / math.sqrt(2)))  # standard normal CDF


class GShardRouter(LinearRouter):
    """GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1).

    g = softmax(x W); (g1, e1), (g2, e2) = top-2; both renormalised, g_i / (g1 + g2) (lines 6, 16).
    The first expert always gets the token. In training the second expert gets it only with
    probability 2 * g2 (line 17-19: dispatch when 2 * g2 > rnd, rnd ~ U(0, 1)); a skipped second
    slot is marked invalid, so it is neither computed nor counted against capacity (as in the
    Mesh-TensorFlow implementation), and the first expert keeps weight g1 / (g1 + g2).
    In evaluation both experts are used, so evaluation is deterministic.
    """

    def __init__(self, d_model: int, num_experts: int, **options) -> None:
        super().__init__(d_model, num_experts, 2, **options)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        topk_idx_TK = probs_TE.topk(2, dim=-1).indices
        weight_TK = chosen_weights(probs_TE, topk_idx_TK, normalize=True)
        valid_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)
        if self.training:
            rnd_T = torch.rand(weight_TK.shape[0], device=weight_TK.device)
            valid_TK[:, 1] = 2 * weight_TK[:, 1].detach() > rnd_T
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, weight_TK, valid_TK=valid_TK)
