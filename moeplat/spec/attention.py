"""`model.attention`: grouped-query attention or DeepSeek's multi-head latent attention.

The head counts stay where they always were: `model.n_heads` (query heads, both kinds) and
`model.n_kv_heads` (key/value heads, gqa only). This module also counts the attention's
parameters and forward FLOPs per token for moeplat.spec.plan (its stored activations:
moeplat.spec.plan_memory, which follows the attention kernel that runs).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from moeplat.spec.base import Strict


class GQA(Strict):
    """Multi-head attention with n_kv_heads key/value heads (grouped-query attention, Ainslie et al.
    2023; n_kv_heads = n_heads is plain multi-head attention), RoPE on the whole head.

    head_dim: per-head width; null = d_model / n_heads (GLaM and T5-style models decouple the two).
    qkv_bias: biases on the q, k, v projections (Qwen1.5 / Qwen2). qk_norm: RMSNorm over the
    projected queries and keys before RoPE: `true` over the whole projection, H * head_dim and
    n_kv_heads * head_dim wide (OLMoE, Muennighoff et al. 2024); `head` over each head's head_dim
    values with one head_dim-wide weight for all query heads and one for all key heads (Qwen3).
    """

    kind: Literal["gqa"]
    head_dim: PositiveInt | None = None
    qkv_bias: bool = False
    qk_norm: bool | Literal["head"] = Field(
        False,
        description="RMSNorm on q and k before RoPE: false; true = over the whole projection (OLMoE); "
        "head = over each head's head_dim (Qwen3).",
    )


class MLA(Strict):
    """Multi-head latent attention (DeepSeek-V2, DeepSeek-AI 2024, sec. 2.1, eq. 9-19).

    Keys and values come from one RMSNorm'd latent of kv_lora_rank per token; a RoPE key of
    qk_rope_head_dim is shared by all heads; each head's query/key is qk_nope_head_dim +
    qk_rope_head_dim wide and its value v_head_dim. q_lora_rank compresses the queries the same way
    (null = a full-rank query projection, as in DeepSeek-V2-Lite).
    """

    kind: Literal["mla"]
    kv_lora_rank: PositiveInt
    q_lora_rank: PositiveInt | None = None
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt


Attention = Annotated[GQA | MLA, Field(discriminator="kind")]


def gqa_head_dim(attn: GQA, d_model: int, n_heads: int) -> int:
    return attn.head_dim or d_model // n_heads


def attention_problems(attn: Attention, d_model: int, n_heads: int, n_kv_heads: int | None) -> list:
    """Cross-field problems of `model.attention` with the head counts, as (path under model, message)."""
    problems = []
    if isinstance(attn, MLA):
        if n_kv_heads is not None:
            problems.append(
                ("n_kv_heads", "MLA derives every head's key and value from one latent: set n_kv_heads: null")
            )
        if attn.qk_rope_head_dim % 2:
            problems.append(
                (
                    "attention.qk_rope_head_dim",
                    f"must be even for rotary embeddings (got {attn.qk_rope_head_dim})",
                )
            )
        return problems
    kv_heads = n_kv_heads or n_heads
    if attn.head_dim is None and d_model % n_heads:
        problems.append(
            (
                "n_heads",
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), or set attention.head_dim",
            )
        )
    elif gqa_head_dim(attn, d_model, n_heads) % 2:
        where = "attention.head_dim" if attn.head_dim else "n_heads"
        problems.append(
            (where, f"head dim {gqa_head_dim(attn, d_model, n_heads)} must be even for rotary embeddings")
        )
    if n_heads % kv_heads:
        problems.append(("n_kv_heads", f"n_heads ({n_heads}) must be divisible by n_kv_heads ({kv_heads})"))
    return problems


def _mla_matrices(a: MLA, d: int, h: int) -> int:
    """Weights of MLA's projections (the matmul weights: FLOPs per token are twice this)."""
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = d * h * qk if a.q_lora_rank is None else d * a.q_lora_rank + a.q_lora_rank * h * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + h * a.v_head_dim * d


def attention_params(attn: Attention, d: int, h: int, kv_heads: int) -> int:
    """Parameters of one attention layer (its input norm is counted with the block)."""
    if isinstance(attn, MLA):
        norms = attn.kv_lora_rank + (attn.q_lora_rank or 0)  # RMSNorm on c_kv (and c_q)
        return _mla_matrices(attn, d, h) + norms
    hd = gqa_head_dim(attn, d, h)
    q_o, kv = 2 * d * h * hd, 2 * d * kv_heads * hd
    extra = (h + 2 * kv_heads) * hd if attn.qkv_bias else 0
    if attn.qk_norm:  # q and k norm weights: whole projections, or one head_dim vector each
        extra += 2 * hd if attn.qk_norm == "head" else (h + kv_heads) * hd
    return q_o + kv + extra


def attention_flops(attn: Attention, d: int, h: int, kv_heads: int, seq_len: int) -> int:
    """Forward matmul FLOPs per token: projections, and QK^T plus AV over the full S x S (plan.py)."""
    if isinstance(attn, MLA):
        qk = attn.qk_nope_head_dim + attn.qk_rope_head_dim
        return 2 * _mla_matrices(attn, d, h) + 2 * seq_len * h * (qk + attn.v_head_dim)
    hd = gqa_head_dim(attn, d, h)
    return 2 * (2 * d * h * hd + 2 * d * kv_heads * hd) + 2 * 2 * seq_len * h * hd
