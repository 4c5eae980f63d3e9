"""A policy-gradient router: experts sampled from the softmax, trained by REINFORCE on the task loss."""

from __future__ import annotations

import torch

from moeplat.nn.routers.base import LinearRouter, RouterOutput, chosen_weights


def sampled_logprob(probs_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """log-probability [T] of drawing the ordered experts idx_TK without replacement from probs_TE:

        log p(e_1..e_K) = sum_k log( p_{e_k} / (1 - sum_{j<k} p_{e_j}) )     (Plackett-Luce)

    which is what torch.multinomial(probs, K, replacement=False) samples from. K = 1: log p_{e_1}.
    """
    p_TK = probs_TE.gather(1, idx_TK)
    before_TK = p_TK.cumsum(dim=1) - p_TK  # mass already drawn before slot k
    return (p_TK.log() - (1 - before_TK).clamp_min(1e-12).log()).sum(dim=1)


class ReinforceRouter(LinearRouter):
    """Routing as a policy trained by REINFORCE (Williams 1992) with a moving-average baseline;
    the RL-R router of Clark et al. 2022 ("Unified Scaling Laws for Routed Language Models").

    Training: K distinct experts are sampled from pi(. | x_t) = softmax(x_t W) with the global RNG
    (torch.multinomial without replacement). Evaluation: the greedy policy, the top-K.
    The combine weights are the softmax probabilities of the chosen experts (renormalised if
    `normalize`), as in top-k routing.

    Reward: r_t = -(the next-token cross-entropy at token t's position); each layer's choice for
    token t is credited with that token's own loss only (its effect on later positions through
    attention is ignored). TransformerLM computes it after the forward pass and calls
    `policy_loss`, which returns

        L_pg = -mean_t (r_t - b) * log pi(a_t | x_t)

    with r and the baseline b treated as constants, and then moves b <- decay * b + (1 - decay) *
    mean_t r_t (b starts at the first batch's mean reward; it is a buffer, saved in checkpoints).
    MoELayer adds coef * L_pg to its aux loss. Gradients, exactly:

    - experts: from the task loss through their outputs, as with every router;
    - router weight W and the router's input (the residual stream below it): (a) from the task
      loss through the combine weights, as in top-k; (b) -(r_t - b) * grad log pi(a_t | x_t) from
      L_pg, the REINFORCE estimate of the gradient of the expected reward w.r.t. the sampling;
      (c) from any balancing / z-loss that is switched on. Nothing flows through the reward.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        normalize: bool = True,
        coef: float = 1.0,
        baseline_decay: float = 0.99,
        **options,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **options)
        if coef < 0 or not 0 <= baseline_decay < 1:
            raise ValueError("need coef >= 0 and 0 <= baseline_decay < 1")
        self.normalize, self.coef, self.baseline_decay = normalize, coef, baseline_decay
        self.register_buffer("baseline", torch.tensor(float("nan")))  # NaN: no reward seen yet

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        logprob_T = None
        if self.training:
            topk_idx_TK = torch.multinomial(probs_TE.detach(), self.top_k, replacement=False)
            logprob_T = sampled_logprob(probs_TE, topk_idx_TK)
        else:
            topk_idx_TK = probs_TE.topk(self.top_k, dim=-1).indices
        weight_TK = chosen_weights(probs_TE, topk_idx_TK, self.normalize)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, weight_TK, logprob_T=logprob_T)

    def policy_loss(self, logprob_T: torch.Tensor, reward_T: torch.Tensor) -> torch.Tensor:
        """L_pg = -mean_t (r_t - b) log pi(a_t | x_t), then the baseline update (see the class doc)."""
        reward_T = reward_T.detach().float()
        mean_reward = reward_T.mean()
        baseline = torch.where(torch.isnan(self.baseline), mean_reward, self.baseline)
        loss = -((reward_T - baseline) * logprob_T).mean()
        with torch.no_grad():
            self.baseline.copy_(self.baseline_decay * baseline + (1 - self.baseline_decay) * mean_reward)
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, normalize={self.normalize}, coef={self.coef}, "
            f"baseline_decay={self.baseline_decay}"
        )
