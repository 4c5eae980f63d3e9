"""Causal self-attention with rotary position embedding and grouped-query attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeplat.nn.kv_cache import LayerKV, causal_mask


def rope_cos_sin(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [S, hd] for RoPE (Su et al. 2021, RoFormer eq. 15), float32.

    Frequency i is theta^(-2i/hd); each appears twice ([f_0..f_{hd/2-1}, f_0..f_{hd/2-1}]) to
    match the rotate-half layout used by Llama / HF transformers.
    """
    assert head_dim % 2 == 0, f"RoPE needs an even head_dim, got {head_dim}"
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles_SH = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles_Sd = torch.cat([angles_SH, angles_SH], dim=-1)
    return angles_Sd.cos().float(), angles_Sd.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+hd/2}) pair by angle pos * f_i, so q.k depends only on pos_q - pos_k."""
    S = x_BHSd.shape[-2]
    x = x_BHSd.to(torch.promote_types(x_BHSd.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
    out = x * cos_Sd[:S] + _rotate_half(x) * sin_Sd[:S]
    return out.to(x_BHSd.dtype)


# qk_norm values: off, the whole projection (True or "whole"), or per head ("head")
QK_NORMS = (False, True, "whole", "head")


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; n_kv_heads < n_heads gives GQA (Ainslie et al. 2023).

    Parameters: wq [H*hd, D], wk and wv [KV*hd, D], wo [D, H*hd]; hd = head_dim or D // H.
    Query head h reads key/value head h // (H // KV), as in Llama's repeat_kv.
    qkv_bias adds biases to wq, wk, wv (Qwen1.5 / Qwen2); qk_norm applies RMSNorm before RoPE:
    True (or "whole") to the whole projected queries [H*hd] and keys [KV*hd] (OLMoE, Muennighoff
    et al. 2024, sec. 2, as transformers' modeling_olmoe does); "head" to each head's hd values,
    one hd-wide weight shared by all heads (Qwen3, as transformers' modeling_qwen3_moe does).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        rope_theta: float = 10000.0,
        dropout: float = 0.0,
        max_seq_len: int = 2048,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool | str = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if (head_dim is None and d_model % n_heads) or n_heads % n_kv_heads:
            raise ValueError(
                "need d_model % n_heads == 0 (or an explicit head_dim) and n_heads % n_kv_heads == 0, "
                f"got {d_model=}, {n_heads=}, {n_kv_heads=}"
            )
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.dropout, self.max_seq_len, self.rope_theta = dropout, max_seq_len, rope_theta
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        self.qk_norm = {False: None, True: "whole"}.get(qk_norm, qk_norm)  # None | "whole" | "head"
        q_dim, kv_dim = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.wq = nn.Linear(d_model, q_dim, bias=qkv_bias)
        self.wk = nn.Linear(d_model, kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(d_model, kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(q_dim, d_model, bias=False)
        q_n, k_n = (self.head_dim, self.head_dim) if self.qk_norm == "head" else (q_dim, kv_dim)
        self.q_norm = nn.RMSNorm(q_n, eps=norm_eps) if self.qk_norm else None
        self.k_norm = nn.RMSNorm(k_n, eps=norm_eps) if self.qk_norm else None
        self.out_drop = nn.Dropout(dropout)
        cos_Sd, sin_Sd = rope_cos_sin(max_seq_len, self.head_dim, rope_theta)
        # Non-persistent: derived from the config, so not in state_dict and not a parameter.
        self.register_buffer("rope_cos", cos_Sd, persistent=False)
        self.register_buffer("rope_sin", sin_Sd, persistent=False)

    def forward(self, x_BSD: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        """`cache` (decoding, moeplat.nn.kv_cache): x_BSD are the tokens after the cached ones; their
        RoPE positions start at cache.length, and their k, v (after RoPE, n_kv_heads) are appended."""
        B, S, _ = x_BSD.shape
        start = 0 if cache is None else cache.length
        if self.max_seq_len < start + S:
            raise ValueError(f"sequence length {start + S} > max_seq_len {self.max_seq_len}")
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.qk_norm == "whole":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":  # over the last dim, hd, of [B, H, S, hd]
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope_cos[start:], self.rope_sin[start:]  # absolute positions start ..
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k=k, v=v)
        if self.n_kv_heads != self.n_heads:
            groups = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        p = self.dropout if self.training else 0.0
        if cache is None or start == 0:
            o_BHSd = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            mask = causal_mask(S, start + S, x_BSD.device)
            o_BHSd = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        o_BSD = o_BHSd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
        return self.out_drop(self.wo(o_BSD))
