"""Expert parallelism for moeplat.nn.moe.MoELayer (GShard, Lepikhin et al. 2020, sec. 3;
Switch Transformer, Fedus et al. 2021, sec. 2.2 and Fig. 9; Megatron-LM's token dispatchers).

Each of the ep_size ranks of an EP group (moeplat.parallel.groups) owns E / ep_size experts, a
contiguous slice of MLPExperts' stacked [E, D, F] weights; the router and the shared experts are
replicated on every rank. One forward on rank r, with its own tokens x_TD:

    1. route locally (router replicated, so the decision is the single-process one);
    2. keep mask: capacity counted on this rank's tokens ("rank") or over the EP group ("global");
    3. dispatch ("all_to_all"): kept token-slots sorted by expert (so by owning rank), per-expert
       counts exchanged, rows sent by all-to-all, run by the local experts as one grouped GEMM
       (moeplat.nn.dispatch's sorted path), sent back by the reverse all-to-all, weighted by the
       router and summed per token. ("all_gather": every rank gathers the group's tokens, runs
       its local experts on the slots routed to them, and a reduce-scatter sums the partial
       outputs back to the tokens' ranks.) Autograd runs the same road backwards;
    4. shared experts on the local tokens, exactly as MoELayer;
    5. losses and statistics over the data-parallel world ("global") or on the local tokens ("rank").

Exactness (tested against MoELayer on the concatenation of the ranks' tokens, float64):
y, input and parameter gradients are equal whenever the keep masks are; capacity_scope "global"
gives the single-process keep mask of the EP group's concatenated batch (so with ep_size = world
it equals MoELayer on the whole batch); "rank" applies the capacity to each rank's own tokens, as
GShard does per group, and equals MoELayer run rank by rank. balance_scope "global" gathers the
router outputs ([T, E] probabilities, [T, K] choices) over the world and evaluates every MoELayer
loss and statistic on the concatenation: each rank's aux_loss *is* the single-process aux loss,
and since the gather's backward sums over ranks, DDP's gradient averaging yields exactly its
gradient. (Megatron-LM all-reduces only the per-expert counts f_i, exact for the Switch loss
alone; the gather costs T*E floats per rank and is exact for all of them, the CV^2 ones included.)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moeplat.nn.dispatch import _accumulate_dtype, _segmented_mlp, dispatch_sorted
from moeplat.nn.experts import MLPExperts
from moeplat.nn.losses import routed_counts
from moeplat.nn.moe import MoELayer, MoEOutput, StepLoadArg
from moeplat.nn.routers import NullRoute, RouterOutput
from moeplat.parallel.all_to_all import (
    all_gather_rows,
    all_to_all,
    exchange_counts,
    gather_sizes,
    reduce_scatter_rows,
)
from moeplat.parallel.groups import ExpertParallelGroups

EP_DISPATCHERS = ("all_to_all", "all_gather")
SCOPES = ("rank", "global")


class ExpertParallelMoE(nn.Module):
    """`layer`'s computation with its routed experts sharded over the EP group of `groups`.

    Consumes `layer`: its `experts` are replaced by this rank's shard (`local_experts`). The
    submodules keep MoELayer's names (router, experts, shared, shared_gate, residual_coef), so the
    state_dict has MoELayer's keys with the expert weights sliced to [E / ep_size, ...]
    (moeplat.parallel.checkpoint gathers and reshards them). Build `layer` identically (same
    seed) on every rank: the slicing takes rank ep_rank's experts from it.
    """

    # Read by code that may not import this package (moeplat.nn.model.Block passes token ids,
    # moeplat.compile.optim.partition splits router / experts): an MoE layer, sharded.
    shards_moe_layer = True

    def __init__(
        self,
        layer: MoELayer,
        groups: ExpertParallelGroups,
        *,
        dispatcher: str = "all_to_all",
        capacity_scope: str = "global",
        balance_scope: str = "global",
    ) -> None:
        super().__init__()
        if dispatcher not in EP_DISPATCHERS:
            raise ValueError(f"dispatcher must be one of {EP_DISPATCHERS}, got {dispatcher!r}")
        for name, scope in (("capacity_scope", capacity_scope), ("balance_scope", balance_scope)):
            if scope not in SCOPES:
                raise ValueError(f"{name} must be one of {SCOPES}, got {scope!r}")
        full = layer.experts
        mine = groups.local_experts(full.num_experts)  # raises unless ep_size divides E
        local = MLPExperts(len(mine), full.d_model, full.d_ff, full.activation, full.dropout)
        with torch.no_grad():
            for name, w in full.named_parameters():
                setattr(local, name, nn.Parameter(w[mine.start : mine.stop].detach().clone()))
        layer.experts = local
        self.groups, self.dispatcher = groups, dispatcher
        self.capacity_scope, self.balance_scope = capacity_scope, balance_scope
        self.num_experts, self.top_k, self.first_expert = layer.num_experts, layer.top_k, mine.start
        # Same objects as the layer's, registered under the same names (state_dict keys of MoELayer).
        self.router, self.experts, self.shared = layer.router, layer.experts, layer.shared
        self.shared_gate, self.residual_coef = layer.shared_gate, layer.residual_coef
        # The layer itself supplies the keep mask and the losses (not a registered child: its
        # parameters are ours already); train() below keeps its mode in step.
        object.__setattr__(self, "_moe", layer)
        self._moe.train(self.training)

    def train(self, mode: bool = True) -> ExpertParallelMoE:
        super().train(mode)
        self._moe.train(mode)
        return self

    @property
    def losses_over_world(self) -> bool:
        """Whether the losses and MoEOutput.routed_E are the data-parallel world's (balance_scope
        "global"): global-batch balancing then needs no further reduction of the counts."""
        return self.balance_scope == "global"

    def forward(
        self,
        x: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        step_load: StepLoadArg = None,
        stats: bool = True,
    ) -> MoEOutput:
        """x: [..., D], this rank's tokens; token_ids, step_load and stats as MoELayer.forward."""
        x_TD = x.reshape(-1, x.shape[-1])
        route = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1))
        keep_TK = self._keep_mask(route)
        if self.dispatcher == "all_to_all":
            y_TD = self._dispatch_all_to_all(x_TD, route.topk_idx_TK, route.topk_weight_TK, keep_TK)
        else:
            y_TD = self._dispatch_all_gather(x_TD, route.topk_idx_TK, route.topk_weight_TK, keep_TK)
        if self.shared is not None:  # as MoELayer.forward: replicated, on the local tokens
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            if self.residual_coef is not None:
                c_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
                y_TD = y_TD * c_T2[:, :1] + shared_TD * c_T2[:, 1:]
            else:
                y_TD = y_TD + shared_TD
        S = x.shape[-2] if x.dim() > 2 else x.shape[0]
        if self.balance_scope == "global":
            route, keep_TK = _gather_route(route, keep_TK, self.groups.dp_group)
        aux_loss, losses = self._moe._losses(route, (route.probs_TE.shape[0] // S, S), step_load, stats)
        routed_E = routed_counts(route.topk_idx_TK, self.num_experts, route.valid_TK)
        routing = self._moe.statistics(route, keep_TK) if stats else None  # no collective inside
        return MoEOutput(y_TD.reshape(x.shape), aux_loss, losses, routing, route.logprob_T, routed_E)

    def _keep_mask(self, route: RouterOutput) -> torch.Tensor:
        """Rank scope: MoELayer's mask of the local tokens. Global: MoELayer's mask of the EP
        group's concatenated slots (T*K indices gathered, not the tokens), this rank's rows."""
        idx_TK, valid_TK, weight_TK = route.topk_idx_TK, route.valid_TK, route.topk_weight_TK
        group = self.groups.ep_group
        if self.capacity_scope == "rank" or self.groups.ep_size == 1:
            return self._moe.keep_mask(idx_TK, valid_TK, weight_TK)
        sizes = gather_sizes(idx_TK.shape[0], group, idx_TK.device)
        start = sum(sizes[: self.groups.ep_rank])
        valid_all = None if valid_TK is None else all_gather_rows(valid_TK.byte(), sizes, group).bool()
        keep_all = self._moe.keep_mask(
            all_gather_rows(idx_TK, sizes, group),
            valid_all,
            all_gather_rows(weight_TK.detach(), sizes, group),
        )
        return keep_all[start : start + idx_TK.shape[0]]

    def _dispatch_all_to_all(
        self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor
    ) -> torch.Tensor:
        n, group = self.groups.ep_size, self.groups.ep_group
        E, K = self.num_experts, idx_TK.shape[1]
        slot_N = keep_TK.reshape(-1).nonzero().squeeze(-1)
        expert_N, order_N = torch.sort(idx_TK.reshape(-1)[slot_N], stable=True)  # by expert = by rank
        slot_N = slot_N[order_N]
        token_N = slot_N // K
        send_nL = torch.bincount(expert_N, minlength=E).view(n, E // n)  # to rank j, for its expert l
        recv_nL = exchange_counts(send_nL, group)  # from rank j, for my local expert l
        send, recv = send_nL.sum(1).tolist(), recv_nL.sum(1).tolist()
        x_RD = all_to_all(x_TD[token_N], recv, send, group)  # grouped by source rank, then expert
        # Regroup the received rows by local expert (stable: source-rank order within an expert).
        local_R = torch.repeat_interleave(
            torch.arange(E // n, device=x_TD.device).repeat(n), recv_nL.reshape(-1)
        )
        perm_R = torch.sort(local_R, stable=True).indices
        out_sorted_RD = _segmented_mlp(self.experts, x_RD[perm_R], recv_nL.sum(0))
        inverse_R = torch.empty_like(perm_R)
        inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
        out_ND = all_to_all(out_sorted_RD[inverse_R], send, recv, group)  # back in send order
        acc = _accumulate_dtype(x_TD)
        weight_N1 = weight_TK.reshape(-1)[slot_N].to(acc).unsqueeze(-1)
        y_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
        return y_TD.index_add(0, token_N, out_ND.to(acc) * weight_N1).to(x_TD.dtype)

    def _dispatch_all_gather(
        self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, keep_TK: torch.Tensor
    ) -> torch.Tensor:
        group = self.groups.ep_group
        sizes = gather_sizes(x_TD.shape[0], group, x_TD.device)
        idx_MK = all_gather_rows(idx_TK, sizes, group) - self.first_expert  # local ids where mine
        n_local = self.experts.num_experts
        mine_MK = all_gather_rows(keep_TK.byte(), sizes, group).bool() & (idx_MK >= 0) & (idx_MK < n_local)
        y_MD = dispatch_sorted(
            self.experts,
            all_gather_rows(x_TD, sizes, group),
            idx_MK.clamp(0, n_local - 1),
            all_gather_rows(weight_TK, sizes, group),
            mine_MK,
        )
        return reduce_scatter_rows(y_MD, sizes, group)

    def add_policy_loss(self, out: MoEOutput, token_loss_T: torch.Tensor) -> MoEOutput:
        """As MoELayer.add_policy_loss (policy routers are replicated; the reward is local)."""
        return MoELayer.add_policy_loss(self, out, token_loss_T)  # type: ignore[arg-type]

    @torch.no_grad()
    def after_optimizer_step(self, load_E: torch.Tensor) -> None:
        """As MoELayer.after_optimizer_step; pass the global load (balance_scope "global" gives it)."""
        self.router.after_optimizer_step(load_E)

    def extra_repr(self) -> str:
        g = self.groups
        return (
            f"ep_size={g.ep_size}, ep_rank={g.ep_rank}, experts={self.first_expert}.."
            f"{self.first_expert + self.experts.num_experts - 1} of {self.num_experts}, "
            f"dispatcher={self.dispatcher!r}, capacity_scope={self.capacity_scope!r}, "
            f"balance_scope={self.balance_scope!r}"
        )


def _gather_route(
    route: RouterOutput, keep_TK: torch.Tensor, group: torch.distributed.ProcessGroup | None
) -> tuple[RouterOutput, torch.Tensor]:
    """The routing decision of the whole group, rows in rank order (differentiable fields stay so)."""
    sizes = gather_sizes(keep_TK.shape[0], group, keep_TK.device)
    if len(sizes) == 1:
        return route, keep_TK

    def gather(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if t.dtype == torch.bool:  # gloo has no bool all-to-all
            return all_gather_rows(t.byte(), sizes, group).bool()
        return all_gather_rows(t, sizes, group)

    fields = ("logits_TE", "probs_TE", "topk_idx_TK", "topk_weight_TK", "valid_TK", "load_prob_TE")
    gathered = dataclasses.replace(route, **{f: gather(getattr(route, f)) for f in fields})
    if route.null is not None:  # null experts (MoE++): their balancing loss reads the full choice
        null = route.null
        gathered = dataclasses.replace(
            gathered, null=NullRoute(gather(null.probs_TX), gather(null.topk_idx_TK))
        )
    return gathered, gather(keep_TK)


def shard_moe_layers(model: nn.Module, groups: ExpertParallelGroups, **options) -> list[str]:
    """Replace every MoELayer inside `model` by an ExpertParallelMoE (options: dispatcher,
    capacity_scope, balance_scope); returns their qualified names. State_dict keys are unchanged.
    Build `model` identically on every rank first (same seed)."""
    names = [name for name, m in model.named_modules() if isinstance(m, MoELayer) and name]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ExpertParallelMoE(getattr(parent, child), groups, **options))
    return names
