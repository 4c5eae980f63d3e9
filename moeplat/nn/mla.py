"""Multi-head latent attention (MLA), DeepSeek-V2 (DeepSeek-AI 2024, sec. 2.1.2-2.1.3, eq. 9-19).

Keys and values of all heads are up-projected from one low-rank latent c_kv (kv_lora_rank wide,
the only per-token state an inference cache needs, with the shared RoPE key); the positional
part of the key is a separate, decoupled RoPE key k_rope shared by all heads. Queries are
optionally low-rank too (q_lora_rank; DeepSeek-V2-Lite has none). As in DeepSeek's released code
and transformers' modeling_deepseek_v2, RMSNorm is applied to the compressed latents c_q and c_kv.

Extra legend: L = kv_lora_rank, Q = q_lora_rank, n = qk_nope_head_dim, r = qk_rope_head_dim,
v = v_head_dim (per head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeplat.nn.attention import apply_rope, rope_cos_sin


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA. Parameters (no biases):

    q_lora_rank None: wq [H*(n+r), D]                            (eq. 12-13 without the latent)
    else:            wq_a [Q, D], q_norm [Q], wq_b [H*(n+r), Q]  (eq. 12-13: W^DQ, W^UQ | W^QR)
    wkv_a [L + r, D]       W^DKV (eq. 9) and the shared RoPE key projection W^KR (eq. 15), fused
    kv_norm [L]            RMSNorm on c_kv
    wkv_b [H*(n+v), L]     W^UK and W^UV (eq. 10-11), fused per head
    wo [D, H*v]            W^O (eq. 19)

    Head i attends with q_i = [q_nope_i; RoPE(q_rope_i)] and k_i = [k_nope_i; RoPE(k_rope)], a
    head dim of n + r, softmax scale 1/sqrt(n + r) (eq. 16-18). The keys and values are
    materialised from the latent for every head, the training-time form; absorbing W^UK into
    the query (the inference-time trick of sec. 2.1.2) computes the same function.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        rope_theta: float = 10000.0,
        dropout: float = 0.0,
        max_seq_len: int = 2048,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if qk_rope_head_dim % 2:
            raise ValueError(f"RoPE needs an even qk_rope_head_dim, got {qk_rope_head_dim}")
        self.n_heads, self.kv_lora_rank = n_heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.dropout, self.max_seq_len = dropout, max_seq_len
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.wq = nn.Linear(d_model, n_heads * qk_dim, bias=False)
            self.wq_a = self.q_norm = self.wq_b = None
        else:
            self.wq = None
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        self.out_drop = nn.Dropout(dropout)
        cos_Sr, sin_Sr = rope_cos_sin(max_seq_len, qk_rope_head_dim, rope_theta)
        self.register_buffer("rope_cos", cos_Sr, persistent=False)
        self.register_buffer("rope_sin", sin_Sr, persistent=False)

    def latents(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_kv [B, S, L] after RMSNorm, k_rope [B, 1, S, r] after RoPE): all an MLA KV cache holds."""
        B, S, _ = x_BSD.shape
        ckv_BSL, k_rope_BSr = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope_B1Sr = apply_rope(k_rope_BSr.view(B, 1, S, self.rope_dim), self.rope_cos, self.rope_sin)
        return self.kv_norm(ckv_BSL), k_rope_B1Sr

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        if self.max_seq_len < S:
            raise ValueError(f"sequence length {S} > max_seq_len {self.max_seq_len}")
        H, n, r, v = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        q = self.wq(x_BSD) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope, q_rope = q.view(B, S, H, n + r).transpose(1, 2).split([n, r], dim=-1)
        q_rope = apply_rope(q_rope, self.rope_cos, self.rope_sin)
        c_kv_BSL, k_rope_B1Sr = self.latents(x_BSD)
        k_nope, v_BHSv = self.wkv_b(c_kv_BSL).view(B, S, H, n + v).transpose(1, 2).split([n, v], dim=-1)
        q_BHSd = torch.cat([q_nope, q_rope], dim=-1)
        k_BHSd = torch.cat([k_nope, k_rope_B1Sr.expand(B, H, S, r)], dim=-1)
        p = self.dropout if self.training else 0.0
        o_BHSv = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSv, dropout_p=p, is_causal=True)
        return self.out_drop(self.wo(o_BHSv.transpose(1, 2).reshape(B, S, H * v)))
