"""The MoE layer: router -> (capacity) -> dispatch to experts -> combine, plus shared experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeplat.nn.capacity import capacity_keep_mask, expert_capacity
from moeplat.nn.dispatch import DISPATCHERS
from moeplat.nn.experts import DenseFFN, SwiGLUExperts
from moeplat.nn.losses import expert_load, load_balancing_loss, router_z_loss
from moeplat.nn.router import TopKRouter


@dataclass(frozen=True)
class MoEOutput:
    """What one MoE layer computed and how it routed (house principle 6: return, don't hide)."""

    y: torch.Tensor  # same shape and dtype as the input
    aux_loss: torch.Tensor  # float32 scalar: balance_coef * lb + z_loss_coef * z (add it to the LM loss)
    losses: dict[str, torch.Tensor]  # unweighted, detached: "load_balancing", "z_loss"
    load_E: torch.Tensor  # detached fraction of slots routed to each expert, before capacity drops
    dropped_frac: torch.Tensor  # detached scalar: dropped slots / (T * K); 0 when dropless
    tokens_per_expert_E: torch.Tensor  # detached count of slots each expert actually computed


class MoELayer(nn.Module):
    """A sparse SwiGLU FFN: each token goes to its top-k of E routed experts (+ optional shared experts).

    Shared experts (DeepSeekMoE, Dai et al. 2024) see every token; `n_shared_experts` of them with
    hidden size `shared_d_ff` are fused into one DenseFFN of hidden size n_shared * shared_d_ff,
    which computes exactly the sum of the separate experts. A capacity factor of None is dropless.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        d_ff: int,
        *,
        normalize_topk: bool = True,
        n_shared_experts: int = 0,
        shared_d_ff: int | None = None,
        capacity_factor_train: float | None = None,
        capacity_factor_eval: float | None = None,
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        dispatch: str = "sorted",
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCHERS:
            raise ValueError(f"dispatch must be one of {sorted(DISPATCHERS)}, got {dispatch!r}")
        for name, cf in (
            ("capacity_factor_train", capacity_factor_train),
            ("capacity_factor_eval", capacity_factor_eval),
        ):
            if cf is not None and cf <= 0:
                raise ValueError(f"{name} must be > 0 or None (dropless), got {cf}")
        if n_shared_experts < 0 or balance_coef < 0 or z_loss_coef < 0:
            raise ValueError("n_shared_experts, balance_coef and z_loss_coef must be >= 0")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor_train, self.capacity_factor_eval = capacity_factor_train, capacity_factor_eval
        self.balance_coef, self.z_loss_coef = balance_coef, z_loss_coef
        self.dispatch = dispatch
        self.router = TopKRouter(d_model, num_experts, top_k, normalize=normalize_topk)
        self.experts = SwiGLUExperts(num_experts, d_model, d_ff)
        self.shared = (
            DenseFFN(d_model, n_shared_experts * (shared_d_ff or d_ff)) if n_shared_experts > 0 else None
        )

    def keep_mask(self, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """bool [T, K]: which slots are computed, by the capacity factor of the current mode."""
        cf = self.capacity_factor_train if self.training else self.capacity_factor_eval
        if cf is None:
            return torch.ones_like(topk_idx_TK, dtype=torch.bool)
        T, K = topk_idx_TK.shape
        capacity = expert_capacity(T, self.num_experts, K, cf)
        return capacity_keep_mask(topk_idx_TK, self.num_experts, capacity)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        x_TD = x.reshape(-1, x.shape[-1])
        route = self.router(x_TD)
        keep_TK = self.keep_mask(route.topk_idx_TK)
        y_TD = DISPATCHERS[self.dispatch](
            self.experts, x_TD, route.topk_idx_TK, route.topk_weight_TK, keep_TK
        )
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        lb = load_balancing_loss(route.probs_TE, route.topk_idx_TK, self.num_experts)
        z = router_z_loss(route.logits_TE)
        if self.balance_coef == 0 and self.z_loss_coef == 0:
            aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
        else:
            aux_loss = self.balance_coef * lb + self.z_loss_coef * z
        kept_idx = route.topk_idx_TK[keep_TK]
        return MoEOutput(
            y=y_TD.reshape(x.shape),
            aux_loss=aux_loss,
            losses={"load_balancing": lb.detach(), "z_loss": z.detach()},
            load_E=expert_load(route.topk_idx_TK, self.num_experts),
            dropped_frac=(~keep_TK).float().mean(),
            tokens_per_expert_E=torch.bincount(kept_idx, minlength=self.num_experts),
        )

    def extra_repr(self) -> str:
        return (
            f"capacity_factor_train={self.capacity_factor_train}, "
            f"capacity_factor_eval={self.capacity_factor_eval}, balance_coef={self.balance_coef}, "
            f"z_loss_coef={self.z_loss_coef}, dispatch={self.dispatch!r}"
        )
