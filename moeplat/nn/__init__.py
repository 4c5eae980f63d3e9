"""Pure-PyTorch building blocks: routers, experts, dispatch, losses, MoE layer, attention, model.

This package imports only torch and the standard library; it knows nothing of specs, Lightning,
MLflow or Optuna. Modules take plain keyword arguments (as in nanoGPT / HF modeling files).

Shape-suffix legend (the one legend for the whole package)::

    B  batch                        S  sequence length
    T  tokens = B * S               D  d_model
    E  routed experts               K  top_k (experts chosen per token)
    C  expert capacity              F  ffn hidden size
    H  attention (query) heads      V  vocabulary size
    N  kept token-slots (<= T * K), in the order a dispatcher processes them
    G  expert groups (group-limited routing), M = E / G experts per group

e.g. ``x_TD`` is a [T, D] activation, ``topk_idx_TK`` a [T, K] index tensor.
"""

from moeplat.nn.attention import CausalSelfAttention, apply_rope, rope_cos_sin
from moeplat.nn.capacity import capacity_keep_mask, expert_capacity
from moeplat.nn.dispatch import DISPATCHERS, dispatch_capacity, dispatch_loop, dispatch_sorted
from moeplat.nn.experts import DenseFFN, MLPExperts, SwiGLUExperts
from moeplat.nn.kv_cache import KVCache
from moeplat.nn.losses import expert_load, load_balancing_loss, router_z_loss
from moeplat.nn.mla import MultiHeadLatentAttention
from moeplat.nn.model import Block, LMOutput, TransformerLM
from moeplat.nn.moe import MoELayer, MoEOutput
from moeplat.nn.routers import (
    ExpertChoiceRouter,
    GroupLimitedRouter,
    GShardRouter,
    HashRouter,
    NoisyTopKRouter,
    RandomRouter,
    ReinforceRouter,
    Router,
    RouterOutput,
    SigmoidBiasRouter,
    SinkhornRouter,
    SwitchRouter,
    TopKRouter,
    TopPRouter,
)
from moeplat.nn.stats import RoutingStats, moe_metrics, routing_stats

__all__ = [
    "DISPATCHERS",
    "Block",
    "CausalSelfAttention",
    "DenseFFN",
    "ExpertChoiceRouter",
    "GShardRouter",
    "GroupLimitedRouter",
    "HashRouter",
    "KVCache",
    "LMOutput",
    "MLPExperts",
    "MoELayer",
    "MoEOutput",
    "MultiHeadLatentAttention",
    "NoisyTopKRouter",
    "RandomRouter",
    "ReinforceRouter",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "SigmoidBiasRouter",
    "SinkhornRouter",
    "SwiGLUExperts",
    "SwitchRouter",
    "TopKRouter",
    "TopPRouter",
    "TransformerLM",
    "apply_rope",
    "capacity_keep_mask",
    "dispatch_capacity",
    "dispatch_loop",
    "dispatch_sorted",
    "expert_capacity",
    "expert_load",
    "load_balancing_loss",
    "moe_metrics",
    "rope_cos_sin",
    "router_z_loss",
    "routing_stats",
]
