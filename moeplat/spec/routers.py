"""`model.moe.router`: one `kind` per published routing method (moeplat.nn.routers computes them)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from moeplat.spec.base import Seed, Strict


class _Router(Strict):
    kind: str  # narrowed to one tag by every variant; declared here so `kind` comes first


class _Learned(_Router):
    """Options of every router with learned linear scores (all kinds except hash and random)."""

    jitter_eps: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Training only: multiply the router input by U(1-eps, 1+eps) (Switch input jitter)."
    )
    logit_softcap: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Router logits -> c * tanh(logits / c); null = no cap."
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="Dropout on the router input.")
    logits_precision: Literal["float32", "input"] = Field(
        "float32",
        description="float32: x W computed in float32 (ST-MoE selective precision); input: x W in the "
        "activations' dtype, only the softmax/sigmoid in float32 (transformers' Mixtral, Qwen2-MoE, OLMoE).",
    )


class TopKRouter(_Learned):
    """Softmax over experts, then the top-k (Shazeer et al. 2017 without noise; Mixtral, OLMoE).

    `normalize: true` renormalises the k chosen weights to sum to 1 (Mixtral); `false` keeps the raw
    softmax probabilities (Switch, Qwen1.5-MoE).

    `null_experts: N` adds N zero experts (MoE++, Jin et al. 2024, eq. 3: output 0): the softmax and
    the top-k run over num_experts + N, and a slot that picks a null expert is not computed (zero
    FLOPs), so easy tokens can use fewer real experts. The load-balancing loss becomes MoE++'s
    heterogeneous one (eq. 7), whose null terms weigh `null_balance_weight` (tau; smaller sends more
    tokens to null experts; null = 0.75, MoE++'s 7B model's). Adds N x d_model router weights.
    """

    kind: Literal["topk"]
    normalize: bool = True
    null_experts: Annotated[int, Field(ge=0)] = Field(
        0, description="Zero-computation experts (MoE++): slots routed to one cost nothing."
    )
    null_balance_weight: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description="MoE++ tau: the null experts' weight in losses.load_balancing; null = 0.75 "
        "(MoE++ 7B). Needs null_experts.",
    )


class TopPRouter(_Learned):
    """Top-p dynamic routing (Huang et al. 2024, "Harder Tasks Need More Experts"): experts in
    decreasing softmax probability until their cumulative probability reaches `p` (the expert that
    crosses p included: at least one); `top_k` caps the count, so buffers, capacity and plan's
    maximum follow top_k (top_k = num_experts: no cap). Weights are the chosen probabilities, raw
    as in the paper; `normalize: true` rescales them to sum to 1. Pair it with losses.dynamic (the
    paper's entropy loss), else the router can flatten its distributions and use many experts.
    p defaults to 0.4, the threshold of the authors' released configuration.
    """

    kind: Literal["top_p"]
    p: Annotated[float, Field(gt=0, le=1)] = 0.4
    normalize: bool = False


class SwitchRouter(_Learned):
    """Switch Transformer (Fedus et al. 2021, eq. 1-2): top-1 softmax, weight p_i(x), input jitter 1e-2."""

    kind: Literal["switch"]
    jitter_eps: Annotated[float, Field(ge=0, lt=1)] = 0.01


class NoisyTopKRouter(_Learned):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5): learned, softplus-scaled Gaussian noise
    on the logits in training; softmax over the k kept logits. Adds num_experts x d_model noise weights."""

    kind: Literal["noisy_topk"]


class GShardRouter(_Learned):
    """GShard top-2 (Lepikhin et al. 2020, Algorithm 1): in training the second expert is used with
    probability 2 * g2 (its renormalised gate). Needs top_k: 2."""

    kind: Literal["gshard"]


class HashRouter(_Router):
    """Hash Layers (Roller et al. 2021): a fixed random table token id -> expert, drawn from `seed`.
    Top-1, weight 1, no router weights (so no router losses)."""

    kind: Literal["hash"]
    seed: Seed = 0


class RandomRouter(_Router):
    """Uniformly random experts in training (THOR-style ablation); the mean of all experts in
    evaluation. No router weights (so no router losses)."""

    kind: Literal["random"]


class SigmoidBiasRouter(_Learned):
    """DeepSeek-V3: sigmoid scores; a per-expert bias, updated after each optimizer step by
    gamma * sign(mean load - load), decides the top-k only; weights renormalised unbiased scores
    (`normalize`) times `scaling_factor` (V3's routed_scaling_factor, 2.5 in its config).
    n_groups > 1 adds V3's node-limited routing (top topk_groups groups by their top-2 sum)."""

    kind: Literal["sigmoid_bias"]
    gamma: Annotated[float, Field(ge=0)] = 0.001
    n_groups: PositiveInt = 1
    topk_groups: PositiveInt = 1
    normalize: bool = True
    scaling_factor: Annotated[float, Field(gt=0)] = 1.0


class GroupLimitedRouter(_Learned):
    """DeepSeek-V2 device-limited routing: experts in n_groups groups, keep the topk_groups best
    groups by their best score (`max`, V2) or top-2 sum (`top2_sum`, V3), then top-k within them."""

    kind: Literal["group_limited"]
    n_groups: PositiveInt
    topk_groups: PositiveInt
    group_score: Literal["max", "top2_sum"] = "max"
    normalize: bool = False


class SinkhornRouter(_Learned):
    """S-BASE (Clark et al. 2022): in training, top-k of the Sinkhorn-balanced assignment after
    `iterations` row/column normalisations; plain top-k in evaluation."""

    kind: Literal["sinkhorn"]
    iterations: Annotated[int, Field(ge=0)] = 10
    normalize: bool = True


class ExpertChoiceRouter(_Learned):
    """Expert choice (Zhou et al. 2022): each expert takes its top C = capacity_factor * T * top_k /
    num_experts tokens of the batch; a token gets 0..num_experts experts. Needs capacity: dropless."""

    kind: Literal["expert_choice"]
    capacity_factor: Annotated[float, Field(gt=0)] = 1.0


class ReinforceRouter(_Learned):
    """Policy-gradient router (REINFORCE, Williams 1992; Clark et al. 2022 RL-R): experts sampled
    from the softmax in training, reward = -token loss, moving-average baseline; coef weights the
    policy loss in the aux loss."""

    kind: Literal["reinforce"]
    coef: Annotated[float, Field(ge=0)] = 1.0
    baseline_decay: Annotated[float, Field(ge=0, lt=1)] = 0.99
    normalize: bool = True


Router = Annotated[
    TopKRouter
    | TopPRouter
    | SwitchRouter
    | NoisyTopKRouter
    | GShardRouter
    | HashRouter
    | RandomRouter
    | SigmoidBiasRouter
    | GroupLimitedRouter
    | SinkhornRouter
    | ExpertChoiceRouter
    | ReinforceRouter,
    Field(discriminator="kind"),
]

FIXED_TOP_K = {"switch": 1, "gshard": 2, "hash": 1}
NULL_BALANCE_WEIGHT = (
    0.75  # MoE++ tau when null_balance_weight is null: its 7B model's (Jin et al. 2024, Table 3)
)
UNLEARNED = ("hash", "random")


def router_params(router: Router, num_experts: int, d_model: int) -> int:
    """Parameters of one layer's router: E x D scores, plus E x D noise weights for noisy_topk."""
    if router.kind in UNLEARNED:
        return 0
    scored = num_experts + getattr(router, "null_experts", 0)  # MoE++ null experts are scored too
    return (2 if router.kind == "noisy_topk" else 1) * scored * d_model


def expected_experts(router: Router, num_experts: int, top_k: int) -> tuple[float, str]:
    """(real experts computed per token, on what assumption) for plan's expected counts; top_k, ""
    for the routers that always fill top_k slots. At uniform router probabilities (the state at
    initialisation): top_p takes ceil(p * E) experts (capped by top_k), and null experts take
    N / (E + N) of the slots (MoE++'s loss aims at tau E / (tau E + N) of them for real experts)."""
    if isinstance(router, TopPRouter):
        k = min(top_k, math.ceil(Fraction(repr(router.p)) * num_experts))
        return float(k), f"top_p at uniform router probabilities: ceil(p * E) = {k} of top_k {top_k}"
    nulls = getattr(router, "null_experts", 0)
    if nulls:
        k = top_k * num_experts / (num_experts + nulls)
        return k, f"null experts at uniform router probabilities: top_k * E / (E + N) = {k:.3g}"
    return float(top_k), ""


def router_problems(
    router: Router, num_experts: int, top_k: int, dropless: bool, has_losses: bool
) -> list[tuple[str, str]]:
    """Cross-field problems of a router with the rest of `model.moe`, as (path under moe, message)."""
    kind, problems = router.kind, []
    if kind in FIXED_TOP_K and top_k != FIXED_TOP_K[kind]:
        problems.append(
            (
                "top_k",
                f"router kind '{kind}' routes to {FIXED_TOP_K[kind]} expert(s): set top_k: {FIXED_TOP_K[kind]}",
            )
        )
    if kind in UNLEARNED and has_losses:
        problems.append(
            (
                "losses",
                f"router kind '{kind}' has no learned weights, so router losses do nothing: set losses: {{}}",
            )
        )
    if kind == "expert_choice" and not dropless:
        problems.append(
            (
                "capacity",
                "expert_choice sets each expert's capacity itself (router.capacity_factor): use {kind: dropless}",
            )
        )
    if isinstance(router, GroupLimitedRouter | SigmoidBiasRouter):
        problems += _group_problems(router, num_experts, top_k)
    return problems


def _group_problems(router, num_experts: int, top_k: int) -> list[tuple[str, str]]:
    n, m = router.n_groups, router.topk_groups
    if num_experts % n:
        return [("router.n_groups", f"num_experts ({num_experts}) must be divisible by n_groups ({n})")]
    if m > n:
        return [("router.topk_groups", f"topk_groups ({m}) must be <= n_groups ({n})")]
    per_group, problems = num_experts // n, []
    if top_k > m * per_group:
        problems.append(
            ("top_k", f"top_k ({top_k}) exceeds the {m * per_group} experts of the {m} kept group(s)")
        )
    top2 = (isinstance(router, SigmoidBiasRouter) and n > 1) or getattr(
        router, "group_score", ""
    ) == "top2_sum"
    if top2 and per_group < 2:
        problems.append(
            ("router.n_groups", f"the top-2 group score needs >= 2 experts per group (got {per_group})")
        )
    return problems
