"""Auxiliary router losses and routing statistics. All results are float32."""

from __future__ import annotations

import torch


def expert_load(
    topk_idx_TK: torch.Tensor, num_experts: int, valid_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of the routed token-slots going to each expert, shape [E], sums to 1. Not differentiable.

    Routed slots are all T*K slots, or those marked in `valid_TK` (routers that assign a varying
    number of experts per token); 0 everywhere if none is routed.
    """
    counts_E = routed_counts(topk_idx_TK, num_experts, valid_TK)
    return counts_E / counts_E.sum().clamp_min(1)


def routed_counts(
    topk_idx_TK: torch.Tensor, num_experts: int, valid_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Routed token-slots per expert (all T*K, or those marked in `valid_TK`), float32 [E], before
    any capacity drop. Not differentiable. Counts, not fractions: counts of several micro-batches
    or ranks add up (global-batch balancing, moeplat.nn.balance)."""
    # index_add of 1s (0s for invalid slots) rather than bincount of the valid ids: the same exact
    # integer counts (below 2^24 per expert) in a static shape, which torch.compile traces
    idx_N = topk_idx_TK.reshape(-1)
    ones_N = torch.ones(idx_N.shape, dtype=torch.float32, device=idx_N.device)
    if valid_TK is not None:
        ones_N = valid_TK.reshape(-1).to(torch.float32)
    return torch.zeros(num_experts, dtype=torch.float32, device=idx_N.device).index_add(0, idx_N, ones_N)


def load_balancing_loss(
    probs_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    valid_TK: torch.Tensor | None = None,
    load_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer auxiliary loss (Fedus et al. 2021, eq. 4), generalised to top-k.

        loss = E * sum_i f_i * P_i
        f_i  = (token-slots routed to expert i) / (T * K)     -- counts, carries no gradient
                                                               (of the valid slots, if given)
        P_i  = (1/T) * sum_t probs_TE[t, i]                  -- differentiable

    Dividing f by T*K (as Megatron-LM's switch_load_balancing_loss does) makes the loss exactly
    1.0 at perfect balance (f_i = P_i = 1/E) for every K. Hand check: E=2, T=2, K=1, tokens to
    experts [0, 0], probs [[.75, .25], [.25, .75]] -> f=[1, 0], P=[.5, .5] -> 2 * (1*.5) = 1.0.

    `load_E`: f of a larger batch than these T tokens (global-batch balancing, Qiu et al. 2025,
    eq. 3: f over the whole optimizer step, P still over this micro-batch); None = f of this batch.
    Computed in float32, or float64 for float64 probabilities.
    """
    dtype = torch.promote_types(probs_TE.dtype, torch.float32)
    f_E = expert_load(topk_idx_TK, num_experts, valid_TK) if load_E is None else load_E
    P_E = probs_TE.to(dtype).mean(dim=0)
    return num_experts * (f_E.to(dtype) * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): (1/T) * sum_t (logsumexp_e logits_te)^2.

    Keeps router logits small so the float32 softmax stays well conditioned. Hand check: one token
    with logits [0, 0] -> logsumexp = ln 2 -> loss = (ln 2)^2 ~= 0.4805.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def cv_squared(v_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, population variance / mean^2 (Shazeer et al. 2017, as in
    tensor2tensor's cv_squared). Hand check: [3, 1] -> variance 1, mean 2 -> 0.25."""
    v_E = v_E.float()
    mean = v_E.mean()
    return ((v_E - mean).square().mean()) / (mean.square() + 1e-10)


def importance_loss(
    topk_weight_TK: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    valid_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shazeer et al. 2017, eq. 6-7: CV(Importance)^2, Importance_i = sum over tokens of the gate
    value G(x)_i (the combine weight; 0 where expert i is not chosen). 0 when every expert gets the
    same total gate. Differentiable through the gates."""
    w_TK = topk_weight_TK.float() if valid_TK is None else topk_weight_TK.float() * valid_TK
    importance_E = torch.zeros(num_experts, dtype=torch.float32, device=w_TK.device)
    importance_E = importance_E.index_add(0, topk_idx_TK.reshape(-1), w_TK.reshape(-1))
    return cv_squared(importance_E)


def load_loss(load_prob_TE: torch.Tensor) -> torch.Tensor:
    """Shazeer et al. 2017, App. A eq. 10-11: CV(Load)^2 with the smooth load estimate
    Load_i = sum over tokens of P(x, i) (eq. 8-9, from NoisyTopKRouter). Differentiable."""
    return cv_squared(load_prob_TE.float().sum(dim=0))


def sequence_balance_loss(
    probs_BSE: torch.Tensor,
    topk_idx_BSK: torch.Tensor,
    num_experts: int,
    valid_BSK: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (eq. 17-20), without its alpha:

        L = mean over sequences of sum_i f_i * P_i
        f_i = E / (K * S) * (tokens of the sequence choosing expert i)      -- no gradient
        P_i = (1/S) * sum_t s'_{i,t}, s' = the normalised affinities (probs) -- differentiable

    1.0 for a sequence whose own routing is balanced. Hand check: S=2, E=2, K=1, both tokens to
    expert 0, probs [[.75, .25], [.25, .75]] -> f = [2, 0], P = [.5, .5] -> 1.0.
    """
    _, S, K = topk_idx_BSK.shape
    one_BSKE = torch.nn.functional.one_hot(topk_idx_BSK, num_experts).float()
    if valid_BSK is not None:
        one_BSKE = one_BSKE * valid_BSK.unsqueeze(-1)
    f_BE = one_BSKE.sum(dim=(1, 2)) * num_experts / (K * S)
    P_BE = probs_BSE.float().mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


def probability_variance_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """Variance-based balance loss: the variance over experts of the mean router probability
    P_i = (1/T) sum_t probs_TE[t, i], scaled by E^2 (= CV^2 of P, since mean(P) = 1/E):

        loss = E^2 * (1/E) * sum_i (P_i - 1/E)^2

    0 at perfect balance, E - 1 when one expert takes all the probability. Unlike the importance
    loss (CV^2 of the summed *chosen* gates, Shazeer et al. 2017 eq. 6) it reads the full
    probability vector, so its gradient reaches experts that no token chose. Hand check: E=2, one
    token with probs [.75, .25] -> P = [.75, .25], variance .0625 -> 4 * .0625 = 0.25.
    """
    P_E = probs_TE.float().mean(dim=0)
    E = P_E.shape[0]
    return E**2 * (P_E - 1.0 / E).square().mean()


def _routed_onehot_TE(
    topk_idx_TK: torch.Tensor, num_experts: int, valid_TK: torch.Tensor | None
) -> torch.Tensor:
    """[T, E] float: how many of token t's routed slots went to expert e (0/1 for distinct experts)."""
    one_TKE = torch.nn.functional.one_hot(topk_idx_TK, num_experts).float()
    if valid_TK is not None:
        one_TKE = one_TKE * valid_TK.unsqueeze(-1)
    return one_TKE.sum(dim=1)


def device_balance_loss(
    probs_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_devices: int,
    valid_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V2 device-level balance loss (DeepSeek-AI 2024, sec. 2.2.3, eq. 26-27), without
    its alpha_2. The E routed experts are D contiguous groups of E/D ("devices"):

        loss  = sum_i f'_i * P'_i                       (i over the D devices)
        f'_i  = mean over experts j of device i of f_j,  f_j = E / (K T) * (slots routed to j)
        P'_i  = sum over experts j of device i of P_j,   P_j = (1/T) sum_t probs_TE[t, j]

    1.0 at perfect balance (f' = 1, P' = 1/D). With D = E it is the expert-level loss. Hand check:
    E=4, D=2, T=1, K=1, probs [.4, .3, .2, .1], routed to expert 0 -> f = [4, 0, 0, 0],
    f' = [2, 0], P' = [.7, .3] -> 1.4.
    """
    E = probs_TE.shape[1]
    counts_E = _routed_onehot_TE(topk_idx_TK, E, valid_TK).sum(dim=0)
    slots = counts_E.sum().clamp(min=1)  # T*K, or the valid slots
    f_E = E * counts_E / slots
    f_D = f_E.reshape(num_devices, -1).mean(dim=1)
    P_D = probs_TE.float().mean(dim=0).reshape(num_devices, -1).sum(dim=1)
    return (f_D * P_D).sum()


def communication_balance_loss(
    probs_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_devices: int,
    max_devices: int,
    valid_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V2 communication balance loss (DeepSeek-AI 2024, sec. 2.2.3, eq. 28-30), without
    its alpha_3: balances how many tokens each device *receives*, whatever the number of
    experts a token uses there:

        loss   = sum_i f''_i * P''_i
        f''_i  = D / (M T) * (tokens with at least one routed slot on device i)   -- no gradient
        P''_i  = sum over experts j of device i of P_j                              -- differentiable

    M is the most devices one token is sent to (DeepSeek-V2's device-limited routing: M = 3; the
    top groups of a group-limited router). 1.0 when every token reaches M devices and every
    device receives M T / D tokens. Hand check: E=4, D=2, M=1, T=2, K=2, both tokens to experts
    {0, 1}, probs all .25 -> tokens per device [2, 0], f'' = [2, 0], P'' = [.5, .5] -> 1.0.
    """
    T, E = probs_TE.shape
    on_device_TD = _routed_onehot_TE(topk_idx_TK, E, valid_TK).reshape(T, num_devices, -1).sum(-1) > 0
    f_D = num_devices / (max_devices * T) * on_device_TD.float().sum(dim=0)
    P_D = probs_TE.float().mean(dim=0).reshape(num_devices, -1).sum(dim=1)
    return (f_D * P_D).sum()


def dynamic_loss(probs_TE: torch.Tensor) -> torch.Tensor:
    """The dynamic loss of top-p routing (Huang et al. 2024): the mean over tokens of the entropy
    of the router distribution, L_d = -sum_i P_i log P_i (0 log 0 = 0). Minimising it sharpens the
    distributions, so top-p needs fewer experts to reach p. Differentiable. Hand check: one token
    with probs [.5, .5] -> ln 2 ~= 0.6931; a one-hot token -> 0."""
    return torch.special.entr(probs_TE.float()).sum(dim=-1).mean()


def null_balancing_loss(
    probs_TX: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int, null_weight: float
) -> torch.Tensor:
    """MoE++'s heterogeneous load balance loss (Jin et al. 2024, eq. 7) over E real experts and
    N = X - E zero-computation experts (ids >= E), scaled as the Switch loss here:

        loss  = X * sum_i eta_i * f_i * P_i,   eta_i = 1 (real expert) or tau = null_weight (null)
        f_i   = (slots routed to expert i) / (T * K)      -- counts, no gradient
        P_i   = (1/T) * sum_t probs_TX[t, i]             -- differentiable

    MoE++ writes f_i per token (sum_i f_i = K) without the factor X: this is eq. 7 times X / K, so
    at tau = 1 it is load_balancing_loss over all X experts (1.0 at balance). tau < 1 makes null
    slots cheaper, so more tokens go to null experts (MoE++ Table 1: a real-expert share of
    tau E / (tau E + N) at balance). Hand check: E=1, N=1, tau=.5, T=2, K=1, slots [0, 1],
    probs [[.75, .25], [.25, .75]] -> f = [.5, .5], P = [.5, .5] -> 2 * (.25 + .5 * .25) = 0.75.
    """
    dtype = torch.promote_types(probs_TX.dtype, torch.float32)
    X = probs_TX.shape[1]
    f_X = expert_load(topk_idx_TK, X).to(dtype)
    eta_X = torch.ones(X, dtype=dtype, device=probs_TX.device)
    eta_X[num_experts:] = null_weight
    return X * (eta_X * f_X * probs_TX.to(dtype).mean(dim=0)).sum()
