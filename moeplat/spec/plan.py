"""Count before you build: parameters, FLOPs and memory from the spec alone (no torch).

tests/compile/test_counting.py checks every count here against the built torch module
(parameter numel, and matmul FLOPs measured by torch's FlopCounterMode).

FLOPs convention: 2 FLOPs per multiply-accumulate of every matmul in the forward pass, per token,
at sequence length data.seq_len. Attention scores count the full S x S product (QK^T and AV),
as the dense SDPA kernel computes it; the causal half is not subtracted. Embedding lookup, norms,
softmax and activations are not counted. Training = 3 x forward (backward = 2 x forward).
The forward counted is the training-mode one: noisy_topk's noise projection (training only) is in.

Routers with a varying number of experts per token (top_p, null experts) are counted at their
maximum, every top_k slot computed (active_params, flops_per_token_*); `expected_*` counts them at
the assumption `expected_assumption` states (moeplat.spec.routers.expected_experts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moeplat.spec.attention import attention_flops, attention_params
from moeplat.spec.ffn import ffn_matrices
from moeplat.spec.plan_memory import activation_bytes
from moeplat.spec.root import Spec
from moeplat.spec.routers import expected_experts, router_params


@dataclass(frozen=True)
class LayerCount:
    index: int
    kind: str  # "moe" | "dense"
    params: int
    active_params: int
    flops_per_token: int


@dataclass(frozen=True)
class Plan:
    total_params: int
    active_params: int  # used per token: all non-expert params + top_k routed experts per MoE layer
    embedding_params: int
    expert_params: int  # routed experts only
    flops_per_token_fwd: int
    flops_per_token_train: int
    tokens_per_step: int
    flops_per_step_train: int
    memory_bytes: dict  # estimate, see memory_estimate()
    layers: list[LayerCount]
    moe_layers: list[int]
    # per token at the routers' expected number of experts (= the maximum for fixed top-k routers)
    expected_active_params: int = 0
    expected_flops_per_token_fwd: int = 0
    expected_assumption: str = ""  # "" when every token always uses top_k experts

    def to_dict(self) -> dict:
        return asdict(self)


def _attention(spec: Spec) -> tuple[int, int]:
    """(params, forward FLOPs per token) of one layer's attention, gqa or mla (spec/attention.py)."""
    m = spec.model
    shape = (m.attention, m.d_model, m.n_heads, m.kv_heads)
    return attention_params(*shape), attention_flops(*shape, spec.data.seq_len)


def _ffn(spec: Spec, moe_j: int | None) -> tuple[int, int, int, int, float]:
    """(params, active params, forward FLOPs per token, routed-expert params, expected active
    params) of one layer's FFN; moe_j is the layer's position among the MoE layers, None for a
    dense layer."""
    m, d = spec.model, spec.model.d_model
    if moe_j is None:
        p = ffn_matrices(m.dense_ffn.kind) * d * m.dense_ffn.d_ff
        return p, p, 2 * p, 0, p
    moe = m.moe
    mats = ffn_matrices(moe.experts.kind)  # 3 for swiglu/geglu (gate, up, down), 2 for gelu/relu
    # Fine-grained segmentation (granularity m): E*m experts of width d_ff/m, K*m chosen.
    shape = moe.shape(moe_j)
    E, K = shape.routed_experts, shape.routed_top_k
    expert = mats * d * moe.routed_d_ff
    shared = mats * d * moe.shared_experts.count * (moe.shared_experts.d_ff or moe.experts.d_ff)
    shared += d if moe.shared_experts.gate else 0  # Qwen2-MoE shared-expert gate: a D -> 1 projection
    mix = 2 * d + 2 if moe.shared_experts.residual_coefficient else 0  # DeepSpeed-MoE: Linear(D, 2)
    router = router_params(moe.router, E, d)  # noisy_topk: + noise weights; hash/random: 0
    total = router + E * expert + shared + mix
    active = router + K * expert + shared + mix
    # Dropless: every token runs K experts; with a capacity factor this is the upper bound.
    expected = active - (K - expected_experts(moe.router, E, K)[0]) * expert
    return total, active, 2 * (active - (2 if mix else 0)), E * expert, expected


def plan(spec: Spec) -> Plan:
    m = spec.model
    attn_p, attn_f = _attention(spec)
    moe_pos = {layer: j for j, layer in enumerate(m.moe_layers)}
    moe_idx = set(moe_pos)
    layers, expert_params, unused = [], 0, 0.0  # unused: active params the expected routing skips
    for i in range(m.n_layers):
        p, a, f, e, x = _ffn(spec, moe_pos.get(i))
        unused += a - x
        norms = 2 * m.d_model
        layers.append(
            LayerCount(
                i, "moe" if i in moe_idx else "dense", attn_p + p + norms, attn_p + a + norms, attn_f + f
            )
        )
        expert_params += e
    emb = m.vocab_size * m.d_model
    head = 0 if m.tie_embeddings else emb
    other = emb + head + m.d_model  # embeddings, untied head, final norm
    total = other + sum(layer.params for layer in layers)
    active = other + sum(layer.active_params for layer in layers)
    fwd = sum(layer.flops_per_token for layer in layers) + 2 * m.d_model * m.vocab_size
    tokens = spec.train.batch_size * spec.train.grad_accum * spec.data.seq_len * spec.parallel.world_size
    return Plan(
        total_params=total,
        active_params=active,
        embedding_params=emb,
        expert_params=expert_params,
        flops_per_token_fwd=fwd,
        flops_per_token_train=3 * fwd,
        tokens_per_step=tokens,
        flops_per_step_train=3 * fwd * tokens,
        memory_bytes=memory_estimate(spec, total),
        layers=layers,
        moe_layers=sorted(moe_idx),
        expected_active_params=round(active - unused),
        expected_flops_per_token_fwd=round(fwd - 2 * unused),
        expected_assumption=_assumption(spec),
    )


def _assumption(spec: Spec) -> str:
    m = spec.model
    if not m.moe_layers:
        return ""
    notes = {
        expected_experts(m.moe.router, s.routed_experts, s.routed_top_k)[1]
        for s in m.moe.shapes(len(m.moe_layers))
    }
    return "; ".join(sorted(n for n in notes if n))


def memory_estimate(spec: Spec, total_params: int) -> dict:
    """Training memory per device, in bytes. An estimate for planning, checked against a measured
    step peak by `moeplat bench --memory` (tests/bench/test_memory.py: within 25% for the
    quick-start and the reference minis on CPU).

    weights, grads: 4 bytes/param (fp32 master weights, also under mixed precision);
    optimizer: AdamW keeps two fp32 moments (8 bytes/param);
    activations: what autograd keeps for backward in one micro-batch, block by block, with the
    attention kernel that runs (a fused SDPA kernel keeps no S x S scores), plus the LM head's
    logits and loss gradients at the start of backward (moeplat.spec.plan_memory).
    The total adds them all: every gradient and every activation at once is the upper bound of the
    step's peak (in backward, gradients appear while activations are freed).
    """
    blocks, head = activation_bytes(spec)
    mem = {
        "weights": 4 * total_params,
        "grads": 4 * total_params,
        "optimizer": 8 * total_params,
        "activations": sum(blocks) + head,
    }
    mem["total"] = sum(mem.values())
    return mem
