"""What every router returns, the router base classes, and the options of learned linear routers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOGITS_PRECISIONS = ("float32", "input")


@dataclass(frozen=True)
class RouterOutput:
    """The routing decision, returned rather than stashed (house principle 6).

    Slot (t, k) sends token t to expert topk_idx_TK[t, k] with weight topk_weight_TK[t, k]. Most
    routers fill every slot; `valid_TK` marks the slots a router really assigned where that varies
    per token (expert choice: 0..E experts per token; GShard: a skipped second expert).
    """

    logits_TE: torch.Tensor | None  # float32 pre-activation scores (z-loss); None: the router has none
    probs_TE: torch.Tensor  # float32 routing distribution, rows sum to 1: balancing loss, entropy
    topk_idx_TK: torch.Tensor  # int64 expert ids
    topk_weight_TK: torch.Tensor  # float32 combine weights
    valid_TK: torch.Tensor | None = None  # bool; None = every slot is assigned
    logprob_T: torch.Tensor | None = None  # policy routers in training: log-prob of the sampled choice
    load_prob_TE: torch.Tensor | None = None  # noisy top-k in training: P(expert in top-k), Shazeer eq. 9
    bias_E: torch.Tensor | None = None  # aux-loss-free selection bias (detached copy)
    null: NullRoute | None = None  # routers with zero-computation experts: the choice over all

    def null_slots(self, num_experts: int) -> torch.Tensor | None:
        """bool [T, K]: the slots sent to a null expert; None for a router without null experts."""
        return None if self.null is None else self.null.topk_idx_TK >= num_experts


@dataclass(frozen=True)
class NullRoute:
    """The routing decision over the E real and N zero-computation ("null") experts (MoE++, Jin
    et al. 2024), of which RouterOutput keeps the real part: slots that went to a null expert are
    invalid there (never computed, weight 0) and probs_TE is renormalised over the real experts.
    The heterogeneous balancing loss (moeplat.nn.losses.null_balancing_loss) reads this."""

    probs_TX: torch.Tensor  # float32 softmax over the X = E + N experts, real ones first
    topk_idx_TK: torch.Tensor  # int64 ids in [0, X): >= E is a null expert


class Router(nn.Module):
    """Base of every router: forward(x_TD, token_ids_T=None) -> RouterOutput.

    Two hooks with defaults for stateless routers: `init_weights(std)` (called by
    TransformerLM.reset_parameters) and `after_optimizer_step(load_E)` (called by the training loop
    once per optimizer step; only routers with online state, such as the aux-loss-free bias, act).
    """

    num_experts: int
    top_k: int

    def init_weights(self, std: float) -> None:
        """Re-initialise learned weights with N(0, std). Routers without weights do nothing."""

    @torch.no_grad()
    def after_optimizer_step(self, load_E: torch.Tensor) -> None:
        """Update online routing state from the load of the step just taken. Default: none."""


class LinearRouter(Router):
    """A router whose scores are a learned linear map of the token, logits_TE = x_TD W^T (W: [E, D]).

    Options shared by every learned router, applied in this order:

    - `dropout`: dropout on the router's input, training only.
    - `jitter_eps`: multiply the router's input by U(1 - eps, 1 + eps) noise, training only
      (the input jitter of the Switch Transformer, Fedus et al. 2021; compared in ST-MoE sec. 3).
    - `logit_softcap`: logits -> c * tanh(logits / c), bounding them to (-c, c) (the tanh
      soft-capping Gemma 2 applies to attention and output logits, here on the router's logits).

    `logits_precision` says where the float32 starts:

    - "float32" (default): the input and W are cast to float32 and x W^T is computed in float32
      (ST-MoE, Zoph et al. 2022, sec. 3.2 "selective precision": the router is sensitive to
      round-off), even under bf16 autocast or with bf16 / float64 inputs and weights. This is what
      Switch Transformer and DeepSeek-V3 (transformers' modeling files) do.
    - "input": x W^T is computed in the activations' dtype (the autocast dtype under autocast)
      and only its result is cast to float32 for the softmax / sigmoid, as transformers' Mixtral,
      Qwen2-MoE and OLMoE blocks do. In bf16 the logits are then rounded to bf16 before the softmax;
      in float64 they are exact before the cast. Used by moeplat.interop.hf for exact parity.

    Either way `logits()` returns float32 logits.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        jitter_eps: float = 0.0,
        logit_softcap: float | None = None,
        dropout: float = 0.0,
        logits_precision: str = "float32",
    ) -> None:
        super().__init__()
        if logits_precision not in LOGITS_PRECISIONS:
            raise ValueError(f"logits_precision must be one of {LOGITS_PRECISIONS}, got {logits_precision!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if not (0 <= jitter_eps < 1 and 0 <= dropout < 1) or (
            logit_softcap is not None and logit_softcap <= 0
        ):
            raise ValueError("need 0 <= jitter_eps < 1, 0 <= dropout < 1 and logit_softcap > 0 or None")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.jitter_eps, self.logit_softcap, self.dropout = jitter_eps, logit_softcap, dropout
        self.logits_precision = logits_precision
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # as Linear(D, E, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d_model)  # nn.Linear's default distribution
        nn.init.uniform_(self.weight, -bound, bound)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, 0.0, std)

    def router_input(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The input (a float32 copy unless logits_precision is "input") with dropout and jitter
        applied (training only)."""
        if self.logits_precision == "float32":
            x_TD = x_TD.float()
        if self.training and self.dropout > 0:
            x_TD = F.dropout(x_TD, self.dropout, training=True)
        if self.training and self.jitter_eps > 0:
            eps = self.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD

    def project(self, x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
        """float32 x W^T (computed as logits_precision says), soft-capped if logit_softcap is set."""
        if self.logits_precision == "float32":
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                logits_TE = F.linear(x_TD.float(), weight_ED.float())
        else:
            logits_TE = F.linear(x_TD, weight_ED.to(x_TD.dtype)).float()
        if self.logit_softcap is not None:
            c = self.logit_softcap
            logits_TE = c * torch.tanh(logits_TE / c)
        return logits_TE

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.project(self.router_input(x_TD), self.weight)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"jitter_eps={self.jitter_eps}, logit_softcap={self.logit_softcap}, dropout={self.dropout}, "
            f"logits_precision={self.logits_precision!r}"
        )


def chosen_weights(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Scores of the chosen experts, optionally rescaled to sum to 1 per token (Mixtral)."""
    weight_TK = scores_TE.gather(1, topk_idx_TK)
    return weight_TK / weight_TK.sum(dim=-1, keepdim=True) if normalize else weight_TK


def without_null_experts(
    logits_TX: torch.Tensor,
    probs_TX: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    num_experts: int,
) -> RouterOutput:
    """The real-expert part of a choice over E real + N null experts (ids >= E are null).

    A null slot is invalid (so no dispatcher, capacity queue or load count sees it) with weight 0
    (a zero expert's output is 0 whatever its weight, MoE++ eq. 3). probs_TE is the real columns
    renormalised, so the losses and statistics that read it balance the real experts among
    themselves; the logits keep all X columns (the z-loss bounds the whole softmax's normaliser).
    """
    null_TK = topk_idx_TK >= num_experts
    probs_TE = probs_TX[:, :num_experts]
    probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs_TE.dtype).tiny)
    return RouterOutput(
        logits_TX,
        probs_TE,
        topk_idx_TK.masked_fill(null_TK, 0),
        weight_TK.masked_fill(null_TK, 0.0),
        valid_TK=~null_TK,
        null=NullRoute(probs_TX, topk_idx_TK),
    )
