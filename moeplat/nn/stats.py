"""Routing statistics of one MoE layer, and the flat metric names the training loop logs.

Every statistic is computed from one forward pass (one micro-batch) and detached.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from moeplat.nn.losses import expert_load

# Scalar statistics, in the order they are logged; each is also averaged over layers (moe/all/...).
SCALARS = (
    "maxvio",
    "load_cv",
    "router_entropy",
    "dead_frac",
    "dropped_frac",
    "unrouted_frac",
    "experts_per_token",
)


@dataclass(frozen=True)
class RoutingStats:
    load_E: torch.Tensor  # fraction of routed slots per expert, before capacity drops; sums to 1
    tokens_per_expert_E: torch.Tensor  # int64 count of slots each expert actually computed
    dropped_frac: torch.Tensor  # routed slots dropped by capacity / routed slots; 0 when dropless
    unrouted_frac: torch.Tensor  # tokens no expert computed (all slots dropped, or expert choice
    #                              picked them nowhere) / T; they pass through the residual only
    load_cv: torch.Tensor  # coefficient of variation std(load) / mean(load), population std
    maxvio: torch.Tensor  # max(load) / mean(load) - 1 (Wang et al. 2024, aux-loss-free balancing)
    router_entropy: torch.Tensor  # mean over tokens of -sum_e p log p of probs_TE, in nats
    dead_frac: torch.Tensor  # fraction of experts routed no token in this batch
    # mean over tokens of the (real) experts computed for it: top_k for a dropless top-k router,
    # fewer with top-p, null experts, expert choice, GShard's skipped slots or capacity drops
    experts_per_token: torch.Tensor
    bias_E: torch.Tensor | None = None  # aux-loss-free selection bias (sigmoid_bias), else None
    null_frac: torch.Tensor | None = None  # routed slots that went to a null expert / all; None
    #                                        for routers without null experts (MoE++)
    routed_per_token: torch.Tensor | None = None  # routed (valid) slots / T: weighs load_E and
    #                                               dropped_frac when ranks are pooled (world_stats)


def routing_stats(
    probs_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    keep_TK: torch.Tensor,
    num_experts: int,
    valid_TK: torch.Tensor | None = None,
    bias_E: torch.Tensor | None = None,
    null_TK: torch.Tensor | None = None,
) -> RoutingStats:
    """Statistics of one routing decision; `valid_TK` = routed slots (None: all), `keep_TK` =
    computed, `null_TK` = the slots a router with null experts sent to one (they are not valid)."""
    with torch.no_grad():
        valid_TK = torch.ones_like(keep_TK) if valid_TK is None else valid_TK
        load_E = expert_load(topk_idx_TK, num_experts, valid_TK)
        mean = load_E.mean().clamp_min(1e-12)  # 1/E unless nothing was routed
        n_routed = valid_TK.sum().clamp_min(1)
        return RoutingStats(
            load_E=load_E,
            tokens_per_expert_E=_kept_counts(topk_idx_TK, keep_TK, num_experts),
            dropped_frac=(valid_TK & ~keep_TK).sum() / n_routed,
            unrouted_frac=(~keep_TK.any(dim=1)).float().mean(),
            load_cv=load_E.std(correction=0) / mean,
            maxvio=load_E.max() / mean - 1,
            router_entropy=torch.special.entr(probs_TE.float()).sum(dim=-1).mean(),
            dead_frac=(load_E == 0).float().mean(),
            experts_per_token=keep_TK.sum(dim=1).float().mean(),
            bias_E=bias_E,
            null_frac=None if null_TK is None else null_TK.float().mean(),
            routed_per_token=valid_TK.sum() / valid_TK.shape[0],
        )


def _kept_counts(topk_idx_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E] kept slots per expert: bincount of the kept ids, in a static shape (torch.compile)."""
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=topk_idx_TK.device)
    return counts_E.index_add(0, topk_idx_TK.reshape(-1), keep_TK.reshape(-1).long())


class _HasStats(Protocol):
    stats: RoutingStats
    losses: dict[str, torch.Tensor]


@dataclass(frozen=True)
class WorldStats:
    """A layer's statistics and unweighted losses over the whole data-parallel batch (world_stats)."""

    stats: RoutingStats
    losses: dict[str, torch.Tensor]


def world_stats(
    outputs: Mapping[int, _HasStats], mean: Callable[[torch.Tensor], torch.Tensor]
) -> dict[int, WorldStats]:
    """Each layer's statistics over every data-parallel rank's tokens, from each rank's own, where
    `mean(t)` is the mean of `t` over the ranks (a collective: every rank calls it, once per call
    here). Ranks hold equal-sized shards, so the per-token and per-slot means (unrouted fraction,
    router entropy, experts per token, null fraction, losses) of the whole batch are the means of
    the ranks'; the load and drop fractions, whose denominator is the routed slots (which vary per
    rank with top-p, null experts, GShard or expert choice), are weighted by each rank's routed
    slots per token; load_cv, maxvio and dead_frac are recomputed from that load (a mean of the
    ranks' maxvio is not the batch's)."""
    layers = sorted(outputs)
    if not layers:
        return {}
    parts = [_packed(outputs[layer].stats, outputs[layer].losses) for layer in layers]
    flat = mean(torch.cat(parts))
    out, at = {}, 0
    for layer, part in zip(layers, parts, strict=True):
        s, names = outputs[layer].stats, sorted(outputs[layer].losses)
        E, values = s.load_E.numel(), flat[at : at + part.numel()]
        at += part.numel()
        routed, load_E, (dropped, unrouted, entropy, per_token, *rest) = (
            values[0],
            values[1 : E + 1],
            values[E + 1 :],
        )
        load_E, dropped = load_E / routed.clamp_min(1e-12), dropped / routed.clamp_min(1e-12)
        null_frac, loss_values = (None, rest) if s.null_frac is None else (rest[0], rest[1:])
        mean_load = load_E.mean().clamp_min(1e-12)
        stats = replace(
            s,
            load_E=load_E,
            dropped_frac=dropped,
            unrouted_frac=unrouted,
            router_entropy=entropy,
            experts_per_token=per_token,
            null_frac=null_frac,
            routed_per_token=routed,
            load_cv=load_E.std(correction=0) / mean_load,
            maxvio=load_E.max() / mean_load - 1,
            dead_frac=(load_E == 0).float().mean(),
        )
        out[layer] = WorldStats(stats, dict(zip(names, loss_values, strict=True)))
    return out


def _packed(s: RoutingStats, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """One rank's layer statistics as a flat float vector for world_stats: routed slots per token,
    the load and the drop fraction times it (so their means are the batch's counts per token),
    then the per-token means and the losses (sorted by name)."""
    routed = s.routed_per_token.float() if s.routed_per_token is not None else s.load_E.new_ones(())
    scalars = [s.dropped_frac * routed, s.unrouted_frac, s.router_entropy, s.experts_per_token]
    scalars += [*([] if s.null_frac is None else [s.null_frac]), *(losses[k] for k in sorted(losses))]
    return torch.cat([routed.view(1), s.load_E.float() * routed, torch.stack([v.float() for v in scalars])])


def moe_metrics(outputs: Mapping[int, _HasStats]) -> dict[str, float]:
    """Flat metrics of the MoE layers' outputs (layer index -> MoEOutput), as the training loop logs them:

    moe/layerNN/{load/eXX, bias/eXX, maxvio, load_cv, router_entropy, dead_frac, dropped_frac,
    unrouted_frac, experts_per_token, null_frac (null experts only), <each unweighted loss>} and
    moe/all/<each scalar and loss> = mean over layers.
    """
    metrics: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for layer, out in sorted(outputs.items()):
        p, s = f"moe/layer{layer:02d}", out.stats
        for e, frac in enumerate(s.load_E.tolist()):
            metrics[f"{p}/load/e{e:02d}"] = frac
        if s.bias_E is not None:
            for e, b in enumerate(s.bias_E.tolist()):
                metrics[f"{p}/bias/e{e:02d}"] = b
        scalars = {name: float(getattr(s, name)) for name in SCALARS}
        if s.null_frac is not None:
            scalars["null_frac"] = float(s.null_frac)
        scalars.update({name: float(value) for name, value in out.losses.items()})
        for name, value in scalars.items():
            metrics[f"{p}/{name}"] = value
            per_name.setdefault(name, []).append(value)
    for name, values in per_name.items():
        metrics[f"moe/all/{name}"] = sum(values) / len(values)
    return metrics
