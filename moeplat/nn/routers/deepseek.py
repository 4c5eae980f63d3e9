"""DeepSeek routers: group-limited top-k (DeepSeek-V2/V3) and sigmoid scores with aux-loss-free bias (V3)."""

from __future__ import annotations

import torch

from moeplat.nn.routers.base import LinearRouter, RouterOutput, chosen_weights

GROUP_SCORES = ("max", "top2_sum")


def group_limit(scores_TE: torch.Tensor, n_groups: int, topk_groups: int, group_score: str) -> torch.Tensor:
    """Keep only the experts of each token's `topk_groups` best groups; the others become -inf.

    Experts are split into n_groups contiguous groups of E / n_groups (a device in DeepSeek-V2,
    a node in V3). A group's score is its best expert's score ("max": DeepSeek-V2 sec. 2.2.2,
    device-limited routing) or the sum of its two best ("top2_sum": DeepSeek-V3 node-limited
    routing, as in its released inference code). The top-k that follows picks within kept groups.
    """
    T, E = scores_TE.shape
    per_group = E // n_groups
    assert per_group * n_groups == E and group_score in GROUP_SCORES, (E, n_groups, group_score)
    grouped_TGM = scores_TE.view(T, n_groups, per_group)
    if group_score == "max":
        group_TG = grouped_TGM.max(dim=-1).values
    else:
        group_TG = grouped_TGM.topk(2, dim=-1).values.sum(dim=-1)
    kept_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    kept_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
    kept_TE = kept_TG.repeat_interleave(per_group, dim=1)
    return scores_TE.masked_fill(~kept_TE, float("-inf"))


class GroupLimitedRouter(LinearRouter):
    """Softmax top-k restricted to the `topk_groups` best of `n_groups` expert groups (DeepSeek-V2).

    DeepSeek-V2 (sec. 2.2.2): s = softmax(x W); select the M groups (devices) holding the highest
    affinities, then the top-K experts among the experts of those groups. The combine weights are
    the softmax scores of the chosen experts, renormalised if `normalize` (V2 does not).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        n_groups: int,
        topk_groups: int,
        group_score: str = "max",
        normalize: bool = False,
        **options,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        _check_groups(num_experts, top_k, n_groups, topk_groups, group_score)
        self.n_groups, self.topk_groups, self.group_score = n_groups, topk_groups, group_score
        self.normalize = normalize

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        limited_TE = group_limit(probs_TE.detach(), self.n_groups, self.topk_groups, self.group_score)
        topk_idx_TK = limited_TE.topk(self.top_k, dim=-1).indices
        weight_TK = chosen_weights(probs_TE, topk_idx_TK, self.normalize)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, weight_TK)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_groups={self.n_groups}, topk_groups={self.topk_groups}, "
            f"group_score={self.group_score!r}, normalize={self.normalize}"
        )


class SigmoidBiasRouter(LinearRouter):
    """DeepSeek-V3 gating (DeepSeek-AI 2024, eq. 12-16) with auxiliary-loss-free balancing
    (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for MoE", eq. 3 and Alg. 1).

        s_i  = Sigmoid(x e_i)                                        (V3 eq. 15)
        g'_i = s_i if s_i + b_i in TopK({s_j + b_j}, K) else 0       (V3 eq. 16)
        g_i  = g'_i / sum_j g'_j                                     (V3 eq. 13)
        weight_i = scaling_factor * g_i

    The bias b (a buffer, saved in checkpoints) only decides *which* experts are chosen; the
    combine weights come from the unbiased s. It is not trained by gradients: after each optimizer
    step the training loop calls `after_optimizer_step(load_E)` with the expert loads of that step
    and b_i <- b_i + gamma * sign(mean_j load_j - load_i) (Wang et al. Alg. 1; V3 sec. 2.1.2).
    With n_groups > 1, selection is first limited to the topk_groups groups with the largest sum of
    their two best biased scores (V3's node-limited routing). probs_TE is s / sum(s) (V3 eq. 19).

    `normalize=False` keeps g'_i (V3 renormalises; transformers' `norm_topk_prob`). `scaling_factor`
    is DeepSeek's `routed_scaling_factor` (2.5 in V3's released config, 16 in V2's): a constant
    factor on the routed experts' combine weights, applied after the renormalisation (as in
    DeepSeek's inference code and transformers' DeepseekV3TopkRouter).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        gamma: float = 1e-3,
        n_groups: int = 1,
        topk_groups: int = 1,
        normalize: bool = True,
        scaling_factor: float = 1.0,
        **options,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        if gamma < 0 or scaling_factor <= 0:
            raise ValueError(f"need gamma >= 0 and scaling_factor > 0, got {gamma}, {scaling_factor}")
        _check_groups(num_experts, top_k, n_groups, topk_groups, "top2_sum" if n_groups > 1 else "max")
        self.gamma, self.n_groups, self.topk_groups = gamma, n_groups, topk_groups
        self.normalize, self.scaling_factor = normalize, scaling_factor
        self.register_buffer("bias_E", torch.zeros(num_experts))  # float32, persistent

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        # At least float32 (a float64 bias, as after .double(), stays float64).
        choice_TE = scores_TE.detach() + self.bias_E.to(torch.promote_types(self.bias_E.dtype, torch.float32))
        if self.n_groups > 1:
            choice_TE = group_limit(choice_TE, self.n_groups, self.topk_groups, "top2_sum")
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        return RouterOutput(
            logits_TE=logits_TE,
            probs_TE=scores_TE / scores_TE.sum(dim=-1, keepdim=True),
            topk_idx_TK=topk_idx_TK,
            topk_weight_TK=chosen_weights(scores_TE, topk_idx_TK, self.normalize) * self.scaling_factor,
            bias_E=self.bias_E.detach().clone(),
        )

    @torch.no_grad()
    def after_optimizer_step(self, load_E: torch.Tensor) -> None:
        """b_i += gamma * sign(mean load - load_i): underloaded experts become more likely to be picked.

        `load_E` is the step's routed load per expert, in counts or fractions (only signs matter).
        """
        load_E = load_E.to(self.bias_E.device, torch.float32)
        self.bias_E.add_(self.gamma * torch.sign(load_E.mean() - load_E))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, gamma={self.gamma}, n_groups={self.n_groups}, "
            f"topk_groups={self.topk_groups}, normalize={self.normalize}, scaling_factor={self.scaling_factor}"
        )


def _check_groups(num_experts: int, top_k: int, n_groups: int, topk_groups: int, group_score: str) -> None:
    if n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"n_groups ({n_groups}) must divide num_experts ({num_experts})")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_groups must be in [1, n_groups={n_groups}], got {topk_groups}")
    if top_k > topk_groups * (num_experts // n_groups):
        raise ValueError(f"top_k ({top_k}) exceeds the experts of the kept groups")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    if group_score == "top2_sum" and num_experts // n_groups < 2:
        raise ValueError("group_score 'top2_sum' needs at least 2 experts per group")
