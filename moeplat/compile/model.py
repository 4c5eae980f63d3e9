"""Spec -> nn modules. The only place that reads `model` spec objects and builds torch modules."""

from __future__ import annotations

import torch
from torch import nn

from moeplat import nn as mnn
from moeplat.nn import DenseFFN, MoELayer, TransformerLM
from moeplat.spec import routers as rs
from moeplat.spec.attention import MLA
from moeplat.spec.model import ModelSpec
from moeplat.spec.moe import CapacityFactor, LayerShape, MoESpec, resolve_dispatch
from moeplat.spec.root import Spec


def build_router(moe: MoESpec, shape: LayerShape, d_model: int, vocab_size: int | None = None) -> mnn.Router:
    """The nn router of `moe.router` for a layer of this shape (one branch per kind; the spec has
    checked every combination)."""
    r, E, K = moe.router, shape.routed_experts, shape.routed_top_k  # granularity m: E*m experts, K*m chosen
    if isinstance(r, rs.HashRouter):
        if vocab_size is None:
            raise ValueError("hash routing needs the vocabulary size")
        return mnn.HashRouter(E, vocab_size, seed=r.seed)
    if isinstance(r, rs.RandomRouter):
        return mnn.RandomRouter(E, K)
    opts = {"jitter_eps": r.jitter_eps, "logit_softcap": r.logit_softcap, "dropout": r.dropout}
    opts["logits_precision"] = r.logits_precision
    if isinstance(r, rs.TopKRouter):
        return mnn.TopKRouter(d_model, E, K, normalize=r.normalize, null_experts=r.null_experts, **opts)
    if isinstance(r, rs.TopPRouter):
        return mnn.TopPRouter(d_model, E, K, p=r.p, normalize=r.normalize, **opts)
    if isinstance(r, rs.SwitchRouter):
        return mnn.SwitchRouter(d_model, E, **opts)
    if isinstance(r, rs.NoisyTopKRouter):
        return mnn.NoisyTopKRouter(d_model, E, K, **opts)
    if isinstance(r, rs.GShardRouter):
        return mnn.GShardRouter(d_model, E, **opts)
    if isinstance(r, rs.SigmoidBiasRouter):
        groups = {"n_groups": r.n_groups, "topk_groups": r.topk_groups}
        scale = {"normalize": r.normalize, "scaling_factor": r.scaling_factor}
        return mnn.SigmoidBiasRouter(d_model, E, K, gamma=r.gamma, **groups, **scale, **opts)
    if isinstance(r, rs.GroupLimitedRouter):
        groups = {"n_groups": r.n_groups, "topk_groups": r.topk_groups, "group_score": r.group_score}
        return mnn.GroupLimitedRouter(d_model, E, K, normalize=r.normalize, **groups, **opts)
    if isinstance(r, rs.SinkhornRouter):
        return mnn.SinkhornRouter(d_model, E, K, iterations=r.iterations, normalize=r.normalize, **opts)
    if isinstance(r, rs.ExpertChoiceRouter):
        return mnn.ExpertChoiceRouter(d_model, E, K, capacity_factor=r.capacity_factor, **opts)
    assert isinstance(r, rs.ReinforceRouter), r
    return mnn.ReinforceRouter(
        d_model, E, K, normalize=r.normalize, coef=r.coef, baseline_decay=r.baseline_decay, **opts
    )


def build_moe_layer(
    moe: MoESpec, d_model: int, vocab_size: int | None = None, j: int = 0, compiled: bool = False
) -> MoELayer:
    """The j-th MoE layer (j counts MoE layers; pyramid layouts give each its own shape).
    `compiled` (train.compile) is what dispatch kind auto decides on (resolve_dispatch)."""
    shape, cap = moe.shape(j), moe.capacity
    num_devices, max_devices = moe.devices(shape) if moe.losses.per_device else (0, 1)
    factors = (cap.train, cap.eval) if isinstance(cap, CapacityFactor) else (None, None)
    drops = (cap.min_capacity, cap.drop_policy) if isinstance(cap, CapacityFactor) else (1, "position")
    return MoELayer(
        d_model,
        shape.routed_experts,  # DeepSeekMoE fine-grained segmentation: num_experts * granularity
        shape.routed_top_k,  # top_k * granularity
        moe.routed_d_ff,  # experts.d_ff / granularity
        router=build_router(moe, shape, d_model, vocab_size),
        n_shared_experts=moe.shared_experts.count,
        shared_d_ff=moe.shared_experts.d_ff or moe.experts.d_ff,
        shared_gate=moe.shared_experts.gate,
        residual_coef=moe.shared_experts.residual_coefficient,
        capacity_factor_train=factors[0],
        capacity_factor_eval=factors[1],
        min_capacity=drops[0],
        drop_policy=drops[1],
        balance_coef=_coef(moe.losses.load_balancing),
        balance_loss_scope=balance_loss_scope(moe),
        z_loss_coef=_coef(moe.losses.z_loss),
        importance_coef=_coef(moe.losses.importance),
        load_coef=_coef(moe.losses.load),
        sequence_balance_coef=_coef(moe.losses.sequence_balance),
        variance_coef=_coef(moe.losses.variance),
        device_balance_coef=_coef(moe.losses.device_balance),
        communication_balance_coef=_coef(moe.losses.communication_balance),
        dynamic_coef=_coef(moe.losses.dynamic),
        null_balance_weight=getattr(moe.router, "null_balance_weight", None) or rs.NULL_BALANCE_WEIGHT,
        num_devices=num_devices,
        max_devices=max_devices,
        dispatch=resolve_dispatch(moe, compiled),
        activation=moe.experts.kind,
        expert_dropout=moe.experts.dropout,
    )


def _coef(loss) -> float:
    return loss.coef if loss is not None else 0.0


def balance_loss_scope(moe: MoESpec | None) -> str:
    """losses.load_balancing.scope (micro_batch when the loss is off)."""
    lb = moe.losses.load_balancing if moe is not None else None
    return lb.scope if lb is not None else "micro_batch"


def build_attention(m: ModelSpec) -> nn.Module:
    """One layer's attention: `model.attention` (gqa or mla) with the model's heads and RoPE."""
    a, common = m.attention, {"rope_theta": m.rope_theta, "dropout": m.dropout, "max_seq_len": m.max_seq_len}
    if isinstance(a, MLA):
        return mnn.MultiHeadLatentAttention(
            m.d_model,
            m.n_heads,
            kv_lora_rank=a.kv_lora_rank,
            q_lora_rank=a.q_lora_rank,
            qk_nope_head_dim=a.qk_nope_head_dim,
            qk_rope_head_dim=a.qk_rope_head_dim,
            v_head_dim=a.v_head_dim,
            norm_eps=m.norm_eps,
            **common,
        )
    return mnn.CausalSelfAttention(
        m.d_model,
        m.n_heads,
        m.kv_heads,
        head_dim=a.head_dim,
        qkv_bias=a.qkv_bias,
        qk_norm=a.qk_norm,
        norm_eps=m.norm_eps,
        **common,
    )


def build_model(spec: Spec) -> TransformerLM:
    """The initial weights are a function of the spec alone (train.seed), whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        return _build_model(spec)


def compile_model(spec: Spec, model: nn.Module) -> nn.Module:
    """train.compile: torch.compile the model in place (nn.Module.compile keeps parameter names,
    so checkpoints and upcycling are unchanged). The training forward traces to one graph with
    either dispatcher (capacity; sorted with its static shapes, moeplat.nn.dispatch.dispatch_sorted)."""
    if spec.train.compile:
        model.compile()
    return model


def _build_model(spec: Spec) -> TransformerLM:
    m = spec.model
    moe_pos = {layer: j for j, layer in enumerate(m.moe_layers)}  # layer index -> j-th MoE layer
    ffns: list[nn.Module] = [
        build_moe_layer(m.moe, m.d_model, m.vocab_size, moe_pos[i], spec.train.compile)
        if i in moe_pos
        else DenseFFN(m.d_model, m.dense_ffn.d_ff, m.dense_ffn.kind)
        for i in range(m.n_layers)
    ]
    return TransformerLM(
        m.vocab_size,
        m.d_model,
        m.n_heads,
        m.kv_heads,
        m.max_seq_len,
        ffns,
        rope_theta=m.rope_theta,
        norm_eps=m.norm_eps,
        dropout=m.dropout,
        tie_embeddings=m.tie_embeddings,
        init_std=m.init_std,
        attns=[build_attention(m) for _ in range(m.n_layers)],
        activation_checkpointing=spec.parallel.activation_checkpointing,
    )
