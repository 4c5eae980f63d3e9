"""Multi-head latent attention (DeepSeek-V2 sec. 2.1) against a naive per-head loop, in float64."""

import math

import pytest
import torch

from moeplat.nn.attention import apply_rope
from moeplat.nn.mla import MultiHeadLatentAttention

D, H, L, Q, N, R, V = 24, 3, 8, 12, 6, 4, 5  # d_model, heads, kv/q lora ranks, nope/rope/v head dims


def _mla(q_lora_rank, seed=0, **kw):
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(
        D,
        H,
        kv_lora_rank=L,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=N,
        qk_rope_head_dim=R,
        v_head_dim=V,
        max_seq_len=16,
        **kw,
    ).double()
    with torch.no_grad():  # non-trivial norm weights, so a missing or misplaced norm shows
        for norm in (m.kv_norm, m.q_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    return m


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _naive_mla(m: MultiHeadLatentAttention, h_SD: torch.Tensor) -> torch.Tensor:
    """Eq. 9-19 token by token and head by head, with explicit weight slices and a causal loop."""
    S = h_SD.shape[0]
    cos, sin = m.rope_cos[:S], m.rope_sin[:S]
    eps = m.kv_norm.eps
    c_kv = _rms(h_SD @ m.wkv_a.weight[:L].T, m.kv_norm.weight, eps)  # eq. 9 (+ RMSNorm)
    k_rope = apply_rope((h_SD @ m.wkv_a.weight[L:].T)[None, None], cos, sin)[0, 0]  # eq. 15, shared
    if m.wq is None:
        c_q = _rms(h_SD @ m.wq_a.weight.T, m.q_norm.weight, eps)  # eq. 12 (+ RMSNorm)
        w_q = m.wq_b.weight
    else:
        c_q, w_q = h_SD, m.wq.weight
    outs = []
    for i in range(H):
        w_qi = w_q[i * (N + R) : (i + 1) * (N + R)]
        w_kvi = m.wkv_b.weight[i * (N + V) : (i + 1) * (N + V)]
        q_nope, q_rope = c_q @ w_qi[:N].T, c_q @ w_qi[N:].T  # eq. 13, 14
        q_rope = apply_rope(q_rope[None, None], cos, sin)[0, 0]
        k_nope, v = c_kv @ w_kvi[:N].T, c_kv @ w_kvi[N:].T  # eq. 10, 11
        q_i = torch.cat([q_nope, q_rope], -1)  # eq. 16
        k_i = torch.cat([k_nope, k_rope], -1)  # eq. 17
        o_i = torch.zeros(S, V, dtype=h_SD.dtype)
        for t in range(S):  # eq. 18: token t attends to tokens 0..t
            scores = torch.stack([q_i[t] @ k_i[j] for j in range(t + 1)]) / math.sqrt(N + R)
            o_i[t] = torch.softmax(scores, 0) @ v[: t + 1]
        outs.append(o_i)
    return torch.cat(outs, -1) @ m.wo.weight.T  # eq. 19


@pytest.mark.parametrize("q_lora_rank", [Q, None], ids=["q-lora", "no-q-lora"])
def test_mla_equals_naive_per_head_reference(q_lora_rank):
    m = _mla(q_lora_rank)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    got = m(x)
    for b in range(2):
        torch.testing.assert_close(got[b], _naive_mla(m, x[b]), rtol=1e-10, atol=1e-12)


def test_mla_is_causal():
    m = _mla(Q, seed=1)
    x = torch.randn(1, 9, D, dtype=torch.float64)
    y = x.clone()
    y[0, 5:] = torch.randn(4, D, dtype=torch.float64)
    out_x, out_y = m(x), m(y)
    torch.testing.assert_close(out_x[0, :5], out_y[0, :5], rtol=0, atol=1e-13)
    assert (out_x[0, 5:] - out_y[0, 5:]).abs().max() > 1e-3


def test_mla_parameter_count_and_latent_shapes():
    m, plain = _mla(Q), _mla(None)
    kv = D * (L + R) + L + L * H * (N + V) + H * V * D
    assert sum(p.numel() for p in m.parameters()) == D * Q + Q + Q * H * (N + R) + kv
    assert sum(p.numel() for p in plain.parameters()) == D * H * (N + R) + kv
    c_kv, k_rope = m.latents(torch.randn(2, 5, D, dtype=torch.float64))
    assert c_kv.shape == (2, 5, L) and k_rope.shape == (2, 1, 5, R)  # the cache: L + r per token
    assert not any("rope" in k for k in m.state_dict())


def test_mla_dropout_only_in_training_and_rejects_odd_rope_dim():
    m = _mla(Q, dropout=0.5)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))
    with pytest.raises(ValueError, match="even qk_rope_head_dim"):
        MultiHeadLatentAttention(D, H, kv_lora_rank=L, qk_nope_head_dim=N, qk_rope_head_dim=3, v_head_dim=V)
