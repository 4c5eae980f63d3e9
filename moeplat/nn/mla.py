"""Multi-head latent attention (MLA), DeepSeek-V2 (DeepSeek-AI 2024, sec. 2.1.2-2.1.3, eq. 9-19).

Keys and values of all heads are up-projected from one low-rank latent c_kv (kv_lora_rank wide,
the only per-token state an inference cache needs, with the shared RoPE key); the positional
part of the key is a separate, decoupled RoPE key k_rope shared by all heads. Queries are
optionally low-rank too (q_lora_rank; DeepSeek-V2-Lite has none). As in DeepSeek's released code
and transformers' modeling_deepseek_v2, RMSNorm is applied to the compressed latents c_q and c_kv.

Extra legend: L = kv_lora_rank, Q = q_lora_rank, n = qk_nope_head_dim, r = qk_rope_head_dim,
v = v_head_dim (per head), P = L + r (one cached token: c_kv and k_rope side by side).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeplat.nn.attention import apply_rope, rope_cos_sin
from moeplat.nn.kv_cache import LayerKV, causal_mask


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
    materialised from the latent for every head, the training-time form; with a KV cache,
    W^UK is absorbed into the query (the inference-time trick of sec. 2.1.2, _forward_absorbed),
    the same function over the compressed cache.
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
        self.rope_theta = rope_theta  # the tables below are derived; whole-model export needs theta
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

    def latents(self, x_BSD: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_kv [B, S, L] after RMSNorm, k_rope [B, 1, S, r] after RoPE at positions start ..):
        all an MLA KV cache holds."""
        B, S, _ = x_BSD.shape
        ckv_BSL, k_rope_BSr = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        cos, sin = self.rope_cos[start:], self.rope_sin[start:]
        k_rope_B1Sr = apply_rope(k_rope_BSr.view(B, 1, S, self.rope_dim), cos, sin)
        return self.kv_norm(ckv_BSL), k_rope_B1Sr

    def _queries(self, x_BSD: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope [B, H, S, n], q_rope [B, H, S, r] after RoPE at positions start ..), eq. 12-14."""
        B, S, _ = x_BSD.shape
        H, n, r = self.n_heads, self.nope_dim, self.rope_dim
        q = self.wq(x_BSD) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope, q_rope = q.view(B, S, H, n + r).transpose(1, 2).split([n, r], dim=-1)
        return q_nope, apply_rope(q_rope, self.rope_cos[start:], self.rope_sin[start:])

    def forward(self, x_BSD: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        """`cache` (decoding, moeplat.nn.kv_cache): the compressed cache, c_kv and k_rope only;
        x_BSD are the tokens after the cached ones (positions cache.length ..)."""
        B, S, _ = x_BSD.shape
        start = 0 if cache is None else cache.length
        if self.max_seq_len < start + S:
            raise ValueError(f"sequence length {start + S} > max_seq_len {self.max_seq_len}")
        if cache is not None:
            return self._forward_absorbed(x_BSD, cache, start)
        H, n, r, v = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        q_nope, q_rope = self._queries(x_BSD, 0)
        c_kv_BSL, k_rope_B1Sr = self.latents(x_BSD)
        k_nope, v_BHSv = self.wkv_b(c_kv_BSL).view(B, S, H, n + v).transpose(1, 2).split([n, v], dim=-1)
        q_BHSd = torch.cat([q_nope, q_rope], dim=-1)
        k_BHSd = torch.cat([k_nope, k_rope_B1Sr.expand(B, H, S, r)], dim=-1)
        p = self.dropout if self.training else 0.0
        o_BHSv = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSv, dropout_p=p, is_causal=True)
        return self.out_drop(self.wo(o_BHSv.transpose(1, 2).reshape(B, S, H * v)))

    def _forward_absorbed(self, x_BSD: torch.Tensor, cache: LayerKV, start: int) -> torch.Tensor:
        """Attention over the cached latents with W^UK absorbed into the query and W^UV applied
        after the weighted sum (DeepSeek-V2 sec. 2.1.2; DeepSeek-V3's inference code, "absorb").

        q_nope_h . (W^UK_h c_kv) = (W^UK_h^T q_nope_h) . c_kv, so each head scores the latent
        directly: a step costs H * T * (L + r), where up-projecting the cache would cost
        T * L * H * (n + v) per step (or a per-head cache, which MLA exists to avoid). The same
        function as forward without a cache, up to float rounding (another order of sums).
        """
        B, S, _ = x_BSD.shape
        H, n, v, L = self.n_heads, self.nope_dim, self.v_dim, self.kv_lora_rank
        q_nope, q_rope = self._queries(x_BSD, start)
        c_kv_BSL, k_rope_B1Sr = self.latents(x_BSD, start)
        # c_kv and k_rope side by side in one buffer [B, 1, T, L + r]: the scores' keys without a
        # per-step concatenation; the values are its first L columns
        lat_B1SP = torch.cat([c_kv_BSL.unsqueeze(1), k_rope_B1Sr], dim=-1)
        (lat_B1TP,) = cache.append(latent=lat_B1SP)
        w_uk_HnL, w_uv_HvL = self.wkv_b.weight.view(H, n + v, L).split([n, v], dim=1)
        q_lat_BHSL = torch.einsum("bhsn,hnl->bhsl", q_nope, w_uk_HnL)
        q_BHSP = torch.cat([q_lat_BHSL, q_rope], dim=-1)
        T = start + S
        k_BHTP = lat_B1TP.expand(B, H, T, lat_B1TP.shape[-1])
        scale = 1.0 / math.sqrt(n + self.rope_dim)  # eq. 17: the head dim before absorption
        mask = causal_mask(S, T, x_BSD.device)
        o_BHSL = F.scaled_dot_product_attention(q_BHSP, k_BHTP, k_BHTP[..., :L], attn_mask=mask, scale=scale)
        o_BHSv = torch.einsum("bhsl,hvl->bhsv", o_BHSL, w_uv_HvL)
        return self.wo(o_BHSv.transpose(1, 2).reshape(B, S, H * v))
