"""Spec -> nn modules. The only place that reads `model` spec objects and builds torch modules."""

from __future__ import annotations

import torch
from torch import nn

from moeplat.nn import DenseFFN, MoELayer, TransformerLM
from moeplat.spec.model import CapacityFactor, MoESpec
from moeplat.spec.root import Spec


def build_moe_layer(moe: MoESpec, d_model: int) -> MoELayer:
    cap = moe.capacity
    factors = (cap.train, cap.eval) if isinstance(cap, CapacityFactor) else (None, None)
    return MoELayer(
        d_model,
        moe.num_experts,
        moe.top_k,
        moe.experts.d_ff,
        normalize_topk=moe.router.normalize,
        n_shared_experts=moe.shared_experts.count,
        shared_d_ff=moe.shared_experts.d_ff or moe.experts.d_ff,
        capacity_factor_train=factors[0],
        capacity_factor_eval=factors[1],
        balance_coef=moe.losses.load_balancing.coef if moe.losses.load_balancing else 0.0,
        z_loss_coef=moe.losses.z_loss.coef if moe.losses.z_loss else 0.0,
        dispatch=moe.dispatch.kind,
    )


def build_model(spec: Spec) -> TransformerLM:
    """The initial weights are a function of the spec alone (train.seed), whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.train.seed)
        return _build_model(spec)


def _build_model(spec: Spec) -> TransformerLM:
    m = spec.model
    moe_idx = set(m.moe_layers)
    ffns: list[nn.Module] = [
        build_moe_layer(m.moe, m.d_model) if i in moe_idx else DenseFFN(m.d_model, m.dense_ffn.d_ff)
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
    )
