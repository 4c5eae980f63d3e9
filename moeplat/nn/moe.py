"""The MoE layer: router -> (capacity) -> dispatch to experts -> combine, plus shared experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from moeplat.nn.capacity import DROP_POLICIES, capacity_keep_mask, expert_capacity
from moeplat.nn.dispatch import DISPATCHERS, dispatch_few
from moeplat.nn.experts import DenseFFN, MLPExperts
from moeplat.nn.losses import (
    communication_balance_loss,
    device_balance_loss,
    dynamic_loss,
    importance_loss,
    load_balancing_loss,
    load_loss,
    null_balancing_loss,
    probability_variance_loss,
    routed_counts,
    router_z_loss,
    sequence_balance_loss,
)
from moeplat.nn.profiling import AUX_LOSSES, DISPATCH, EXPERTS, ROUTER, STATS, phase
from moeplat.nn.routers import ReinforceRouter, Router, RouterOutput, TopKRouter
from moeplat.nn.stats import RoutingStats, routing_stats

# Over which tokens the Switch loss's expert frequencies f_i are counted (MoELayer balance_loss_scope)
BALANCE_LOSS_SCOPES = ("micro_batch", "global_batch", "sequence")
# What forward's step_load may be: the step's f_E itself, or routed counts [E] -> the step's f_E
StepLoadArg = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


@dataclass(frozen=True)
class MoEOutput:
    """What one MoE layer computed and how it routed (house principle 6: return, don't hide)."""

    y: torch.Tensor  # same shape and dtype as the input
    aux_loss: (
        torch.Tensor
    )  # float32 scalar: the weighted sum of the switched-on losses (add it to the LM loss)
    losses: dict[str, torch.Tensor]  # unweighted, detached: "load_balancing", "importance",
    #   "sequence_balance", "variance"; "device_balance", "communication_balance" (num_devices
    #   set); "z_loss" (routers with logits); "load" (noisy_topk in training); "reinforce"
    #   (policy routers, once rewarded); "dynamic" (its coefficient set). A forward with
    #   stats=False holds only the switched-on ones (the others are telemetry, not computed)
    stats: RoutingStats | None  # detached routing statistics (moeplat.nn.stats); None: telemetry
    #   off, or statistics not asked for (forward's stats=False: a training step that logs none)
    policy_logprob_T: torch.Tensor | None = None  # policy routers in training: awaits the reward
    # float32 [E] routed slots per expert before capacity drops, of the tokens the losses saw
    # (global-batch balancing sums them over micro-batches and ranks: moeplat.nn.balance)
    routed_E: torch.Tensor | None = None

    @property
    def load_E(self) -> torch.Tensor:
        """Fraction of routed slots per expert, before capacity drops: the statistics' load_E, or
        the same value from routed_E when no statistics were computed (the aux-loss-free bias
        update reads it every step, moeplat.train.system)."""
        if self.stats is not None or self.routed_E is None:
            return self.stats.load_E
        return self.routed_E / self.routed_E.sum().clamp_min(1)  # = moeplat.nn.losses.expert_load

    @property
    def dropped_frac(self) -> torch.Tensor:
        return self.stats.dropped_frac

    @property
    def tokens_per_expert_E(self) -> torch.Tensor:
        return self.stats.tokens_per_expert_E


class MoELayer(nn.Module):
    """A sparse FFN: each token goes to the experts its router picks (+ optional shared experts).

    `router` is any moeplat.nn.routers.Router; by default a TopKRouter(d_model, E, top_k,
    normalize_topk). Shared experts (DeepSeekMoE, Dai et al. 2024) see every token; `n_shared_experts`
    of them with hidden size `shared_d_ff` are fused into one DenseFFN of hidden size
    n_shared * shared_d_ff, which computes exactly the sum of the separate experts; `shared_gate`
    scales their output per token by sigmoid(x w_g), w_g a bias-free Linear(D, 1) (Qwen2-MoE's
    shared_expert_gate, Qwen Team 2024; transformers modeling_qwen2_moe). A capacity
    factor of None is dropless; `min_capacity` and `drop_policy` ("position" | "probability")
    shape the capacity (moeplat.nn.capacity). Each loss coefficient weights one loss of moeplat.nn.losses in the
    aux loss (0 = off; the unweighted value is reported either way). `activation` (swiglu, geglu,
    gelu, relu; moeplat.nn.experts) is that of the routed and the shared experts; `expert_dropout`
    is the routed experts' (MLPExperts) hidden-activation dropout, training only.

    `num_devices` D (> 0) splits the experts into D contiguous groups for DeepSeek-V2's device and
    communication balance losses; `max_devices` is their M (the most devices a token reaches).
    `residual_coef` mixes routed and shared output by learned per-token softmax coefficients
    instead of adding them (DeepSpeed-MoE's Residual MoE, Rajbhandari et al. 2022, sec. 4.1.1:
    y = c_0 * routed + c_1 * shared, c = softmax(x W_c + b_c), W_c a D x 2 projection with bias).

    `dynamic_coef` weights the dynamic loss of top-p routing, the router entropy (Huang et al.
    2024; moeplat.nn.losses.dynamic_loss). With a router that has null experts (TopKRouter
    null_experts, MoE++) the load-balancing loss is MoE++'s heterogeneous one over the real and null
    experts, the null ones weighted by `null_balance_weight` (tau, MoE++ eq. 7), micro-batch scope.

    `balance_loss_scope` says over which tokens the load-balancing loss counts f_i:
    "micro_batch" (this forward's tokens), "sequence" (per sequence, averaged: the same function
    as sequence_balance, DeepSeek-V3 eq. 17-20) or "global_batch" (the optimizer step's tokens on
    every rank, Qiu et al. 2025: passed to forward as `step_load`, see moeplat.nn.balance;
    without it, this forward is the whole batch).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        d_ff: int,
        *,
        router: Router | None = None,
        normalize_topk: bool = True,
        n_shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_gate: bool = False,
        capacity_factor_train: float | None = None,
        capacity_factor_eval: float | None = None,
        min_capacity: int = 1,
        drop_policy: str = "position",
        balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        importance_coef: float = 0.0,
        load_coef: float = 0.0,
        sequence_balance_coef: float = 0.0,
        variance_coef: float = 0.0,
        device_balance_coef: float = 0.0,
        communication_balance_coef: float = 0.0,
        num_devices: int = 0,
        max_devices: int = 1,
        residual_coef: bool = False,
        balance_loss_scope: str = "micro_batch",
        dispatch: str = "sorted",
        activation: str = "swiglu",
        expert_dropout: float = 0.0,
        dynamic_coef: float = 0.0,
        null_balance_weight: float = 1.0,
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
        if dispatch == "capacity" and (capacity_factor_train is None or capacity_factor_eval is None):
            raise ValueError("dispatch 'capacity' needs capacity_factor_train and capacity_factor_eval")
        if min_capacity < 1 or drop_policy not in DROP_POLICIES:
            raise ValueError(f"need min_capacity >= 1 and drop_policy in {DROP_POLICIES}")
        if balance_loss_scope not in BALANCE_LOSS_SCOPES:
            raise ValueError(
                f"balance_loss_scope must be one of {BALANCE_LOSS_SCOPES}, got {balance_loss_scope!r}"
            )
        self.balance_loss_scope = balance_loss_scope
        self.loss_coefs = {
            "load_balancing": balance_coef,
            "z_loss": z_loss_coef,
            "importance": importance_coef,
            "load": load_coef,
            "sequence_balance": sequence_balance_coef,
            "variance": variance_coef,
            "device_balance": device_balance_coef,
            "communication_balance": communication_balance_coef,
            "dynamic": dynamic_coef,
        }
        if n_shared_experts < 0 or min(self.loss_coefs.values()) < 0:
            raise ValueError("n_shared_experts and the loss coefficients must be >= 0")
        if num_devices < 0 or (
            num_devices and (num_experts % num_devices or not 1 <= max_devices <= num_devices)
        ):
            raise ValueError(
                f"num_devices ({num_devices}) must divide num_experts ({num_experts}), 1 <= max_devices <= num_devices"
            )
        if (device_balance_coef or communication_balance_coef) and not num_devices:
            raise ValueError("the device and communication balance losses need num_devices >= 1")
        self.num_devices, self.max_devices = num_devices, max_devices
        if router is None:
            router = TopKRouter(d_model, num_experts, top_k, normalize=normalize_topk)
        if router.num_experts != num_experts:
            raise ValueError(f"router has {router.num_experts} experts, the layer {num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        if getattr(router, "null_experts", 0) and balance_loss_scope != "micro_batch":
            raise ValueError(
                "a router with null experts balances per micro-batch: balance_loss_scope micro_batch"
            )
        if null_balance_weight <= 0:
            raise ValueError(f"null_balance_weight must be > 0, got {null_balance_weight}")
        self.null_balance_weight = null_balance_weight
        self.capacity_factor_train, self.capacity_factor_eval = capacity_factor_train, capacity_factor_eval
        self.min_capacity, self.drop_policy = min_capacity, drop_policy
        self.balance_coef, self.z_loss_coef = balance_coef, z_loss_coef
        self.dispatch = dispatch
        self.router = router
        self.experts = MLPExperts(num_experts, d_model, d_ff, activation, expert_dropout)
        self.shared = (
            DenseFFN(d_model, n_shared_experts * (shared_d_ff or d_ff), activation)
            if n_shared_experts > 0
            else None
        )
        if (shared_gate or residual_coef) and self.shared is None:
            raise ValueError("shared_gate and residual_coef need n_shared_experts >= 1")
        if shared_gate and residual_coef:
            raise ValueError("choose one of shared_gate and residual_coef")
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        self.residual_coef = nn.Linear(d_model, 2) if residual_coef else None

    def capacity(self, num_tokens: int, top_k: int) -> int | None:
        """Each expert's capacity C in the current mode (train/eval factor), None when dropless."""
        cf = self.capacity_factor_train if self.training else self.capacity_factor_eval
        if cf is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, top_k, cf, self.min_capacity)

    def keep_mask(
        self,
        topk_idx_TK: torch.Tensor,
        valid_TK: torch.Tensor | None = None,
        topk_weight_TK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """bool [T, K]: which routed slots are computed, by the capacity factor of the current mode
        and the drop policy (see moeplat.nn.capacity.capacity_keep_mask)."""
        capacity = self.capacity(*topk_idx_TK.shape)
        if capacity is None:
            return torch.ones_like(topk_idx_TK, dtype=torch.bool) if valid_TK is None else valid_TK
        return capacity_keep_mask(
            topk_idx_TK,
            self.num_experts,
            capacity,
            valid_TK,
            policy=self.drop_policy,
            topk_weight_TK=topk_weight_TK,
        )

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        step_load: StepLoadArg = None,
        telemetry: bool = True,
        stats: bool = True,
    ) -> MoEOutput:
        """x: [..., D]; token_ids: the token ids of x's positions, [...] (needed by hash routing);
        step_load: the optimizer step's expert frequencies for balance_loss_scope "global_batch"
        (f_E, or a function of this forward's routed counts [E], moeplat.nn.balance.StepLoad).
        telemetry False (inference, e.g. decoding): no auxiliary losses (aux_loss 0, losses {})
        and no routing statistics (stats None), which are most of a one-token step's work.
        stats False: the losses and routed_E (what a loss or the bias update needs every step) but
        no RoutingStats (stats None): training computes them only on the steps that log them.

        Outside autograd with no more slots than experts (a decoding step), the experts run slot by
        slot (dispatch_few) whatever the dispatcher: the same function, without
        a loop over mostly empty experts."""
        x_TD = x.reshape(-1, x.shape[-1])
        with phase(ROUTER):  # named ranges: moeplat bench's per-phase breakdown
            route = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1))
            keep_TK = self.keep_mask(route.topk_idx_TK, route.valid_TK, route.topk_weight_TK)
        sized = {"capacity": self.capacity(*keep_TK.shape)} if self.dispatch == "capacity" else {}
        few = not torch.is_grad_enabled() and keep_TK.numel() <= self.num_experts
        dispatch = dispatch_few if few else DISPATCHERS[self.dispatch]
        with phase(DISPATCH):
            y_TD = dispatch(
                self.experts, x_TD, route.topk_idx_TK, route.topk_weight_TK, keep_TK, **({} if few else sized)
            )
        if self.shared is not None:
            with phase(EXPERTS):  # shared experts are expert GEMMs too
                shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:  # Qwen2-MoE: sigmoid(x w_g) * shared(x), [T, 1] gate
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            if self.residual_coef is not None:  # DeepSpeed-MoE residual MoE: softmax mix, [T, 2]
                c_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
                y_TD = y_TD * c_T2[:, :1] + shared_TD * c_T2[:, 1:]
            else:
                y_TD = y_TD + shared_TD
        if not telemetry:
            aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
            return MoEOutput(y_TD.reshape(x.shape), aux_loss, {}, None, route.logprob_T)
        S = x.shape[-2] if x.dim() > 2 else x.shape[0]  # a [T, D] input is one sequence
        with phase(AUX_LOSSES):
            aux_loss, losses = self._losses(route, (x_TD.shape[0] // S, S), step_load, logged=stats)
            # every step: the bias update (load_E) and global-batch balancing read it
            routed_E = routed_counts(route.topk_idx_TK, self.num_experts, route.valid_TK)
        with phase(STATS):
            routing = self.statistics(route, keep_TK) if stats else None
        return MoEOutput(y_TD.reshape(x.shape), aux_loss, losses, routing, route.logprob_T, routed_E)

    def statistics(self, route: RouterOutput, keep_TK: torch.Tensor) -> RoutingStats:
        """The routing statistics of a routing decision (detached; moeplat.nn.stats)."""
        E = self.num_experts
        return routing_stats(
            route.probs_TE, route.topk_idx_TK, keep_TK, E, route.valid_TK, route.bias_E, route.null_slots(E)
        )

    def _losses(
        self,
        route: RouterOutput,
        batch_seq: tuple[int, int],
        step_load: StepLoadArg = None,
        logged: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(aux loss = sum of coef * loss over the switched-on losses, unweighted detached losses).

        `logged` False (a training step that logs no statistics): only the switched-on losses,
        which the aux loss needs, are computed and returned; the others are telemetry only."""
        E, (B, S) = self.num_experts, batch_seq
        idx_TK, valid_TK = route.topk_idx_TK, route.valid_TK
        coefs = self.loss_coefs

        def wanted(name: str) -> bool:
            return logged or bool(coefs[name])

        sequence_balance = None
        if wanted("sequence_balance") or (wanted("load_balancing") and self.balance_loss_scope == "sequence"):
            sequence_balance = sequence_balance_loss(
                route.probs_TE.reshape(B, S, E),
                idx_TK.reshape(B, S, -1),
                E,
                None if valid_TK is None else valid_TK.reshape(B, S, -1),
            )
        losses = {
            "load_balancing": lambda: self._balance_loss(route, sequence_balance, step_load),
            "importance": lambda: importance_loss(route.topk_weight_TK, idx_TK, E, valid_TK),
            "sequence_balance": lambda: sequence_balance,
            "variance": lambda: probability_variance_loss(route.probs_TE),
        }
        if coefs["dynamic"]:
            losses["dynamic"] = lambda: dynamic_loss(route.probs_TE)
        if self.num_devices:
            D, M = self.num_devices, self.max_devices
            losses["device_balance"] = lambda: device_balance_loss(route.probs_TE, idx_TK, D, valid_TK)
            losses["communication_balance"] = lambda: communication_balance_loss(
                route.probs_TE, idx_TK, D, M, valid_TK
            )
        if route.logits_TE is not None:
            losses["z_loss"] = lambda: router_z_loss(route.logits_TE)
        if route.load_prob_TE is not None:
            losses["load"] = lambda: load_loss(route.load_prob_TE)
        values = {name: loss() for name, loss in losses.items() if wanted(name)}
        aux_loss = torch.zeros((), dtype=torch.float32, device=route.probs_TE.device)
        for name, value in values.items():
            if coefs[name]:
                aux_loss = aux_loss + coefs[name] * value
        return aux_loss, {name: value.detach() for name, value in values.items()}

    def _balance_loss(
        self, route: RouterOutput, sequence_balance: torch.Tensor, step_load: StepLoadArg
    ) -> torch.Tensor:
        """The Switch loss E * sum_i f_i P_i with f counted over balance_loss_scope's tokens."""
        E, idx_TK, valid_TK = self.num_experts, route.topk_idx_TK, route.valid_TK
        if self.balance_loss_scope == "sequence":  # f_i and P_i per sequence, averaged
            return sequence_balance
        if route.null is not None:  # MoE++ eq. 7 over the real and the null experts
            return null_balancing_loss(
                route.null.probs_TX, route.null.topk_idx_TK, E, self.null_balance_weight
            )
        load_E = None
        if self.balance_loss_scope == "global_batch" and step_load is not None:
            load_E = (
                step_load
                if isinstance(step_load, torch.Tensor)
                else step_load(routed_counts(idx_TK, E, valid_TK))
            )
        return load_balancing_loss(route.probs_TE, idx_TK, E, valid_TK, load_E)

    def add_policy_loss(self, out: MoEOutput, token_loss_T: torch.Tensor) -> MoEOutput:
        """Reward a policy router with the per-token task loss (reward = -loss); see ReinforceRouter.

        Returns `out` with coef * L_pg added to its aux loss and L_pg logged as losses["reinforce"];
        `out` itself when the router is not a policy or nothing was sampled (evaluation).
        """
        if out.policy_logprob_T is None or not isinstance(self.router, ReinforceRouter):
            return out
        pg = self.router.policy_loss(out.policy_logprob_T, -token_loss_T.detach())
        return replace(
            out,
            aux_loss=out.aux_loss + self.router.coef * pg,
            losses={**out.losses, "reinforce": pg.detach()},
            policy_logprob_T=None,
        )

    @torch.no_grad()
    def after_optimizer_step(self, load_E: torch.Tensor) -> None:
        """Call once after each optimizer step with this layer's routed load over that step
        (the sum of MoEOutput.load_E over its micro-batches). Only stateful routers act on it
        (SigmoidBiasRouter's aux-loss-free bias update); for the others it does nothing."""
        self.router.after_optimizer_step(load_E)

    def extra_repr(self) -> str:
        coefs = ", ".join(f"{name}={coef}" for name, coef in self.loss_coefs.items() if coef)
        return (
            f"capacity_factor_train={self.capacity_factor_train}, "
            f"capacity_factor_eval={self.capacity_factor_eval}, min_capacity={self.min_capacity}, "
            f"drop_policy={self.drop_policy!r}, loss_coefs=({coefs}), "
            f"balance_loss_scope={self.balance_loss_scope!r}, "
            f"dispatch={self.dispatch!r}"
        )
