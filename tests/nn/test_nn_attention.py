"""Rotary embedding and grouped-query attention."""

import pytest
import torch

from moeplat.nn import CausalSelfAttention, apply_rope, rope_cos_sin


def _rope_at(v_d, positions, theta=10000.0):
    """The vector v placed at each of `positions` and rotated: [len(positions), hd]."""
    cos, sin = rope_cos_sin(max(positions) + 1, v_d.numel(), theta)
    x = v_d.expand(1, 1, max(positions) + 1, -1)
    return apply_rope(x, cos, sin)[0, 0, positions]


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    pos = [0, 3, 5, 10, 20, 23]
    rq, rk = _rope_at(q, pos), _rope_at(k, pos)
    score = {(m, n): (rq[i] @ rk[j]).item() for i, m in enumerate(pos) for j, n in enumerate(pos)}
    # offset 3: (3,0), (23,20); offset 5: (5,0), (10,5); offset -5: (0,5), (5,10)
    assert score[(3, 0)] == pytest.approx(score[(23, 20)], abs=1e-4)
    assert score[(5, 0)] == pytest.approx(score[(10, 5)], abs=1e-4)
    assert score[(0, 5)] == pytest.approx(score[(5, 10)], abs=1e-4)
    assert (
        score[(0, 0)] == pytest.approx(score[(20, 20)], abs=1e-4) == pytest.approx((q @ k).item(), abs=1e-4)
    )
    assert abs(score[(3, 0)] - score[(5, 0)]) > 1e-3  # and it does depend on the offset


def test_rope_matches_complex_rotation_in_rotate_half_layout():
    # RoFormer eq. 34 in complex form: pair (x_i, x_{i+hd/2}) as x_i + j x_{i+hd/2}, times e^{j m f_i}.
    torch.manual_seed(1)
    hd, S, theta = 8, 6, 500.0
    x = torch.randn(1, 2, S, hd, dtype=torch.float64)
    f = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :]) * torch.polar(
        torch.ones(S, hd // 2, dtype=torch.float64), torch.arange(S, dtype=torch.float64)[:, None] * f
    )
    expected = torch.cat([z.real, z.imag], dim=-1)
    cos, sin = rope_cos_sin(S, hd, theta)
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()), expected)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(2)
    D, H, KV, hd = 32, 4, 2, 8
    gqa = CausalSelfAttention(D, H, KV, max_seq_len=16)
    mha = CausalSelfAttention(D, H, H, max_seq_len=16)
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for h in range(H):  # query head h reads kv head h // (H // KV)
            g = h // (H // KV)
            mha.wk.weight[h * hd : (h + 1) * hd] = gqa.wk.weight[g * hd : (g + 1) * hd]
            mha.wv.weight[h * hd : (h + 1) * hd] = gqa.wv.weight[g * hd : (g + 1) * hd]
    x = torch.randn(2, 10, D)
    torch.testing.assert_close(gqa(x), mha(x))
    assert sum(p.numel() for p in gqa.parameters()) == 2 * D * H * hd + 2 * D * KV * hd
    assert not any("rope" in k for k in gqa.state_dict())  # cos/sin are non-persistent buffers


def test_attention_dropout_only_in_training():
    torch.manual_seed(3)
    attn = CausalSelfAttention(16, 2, 1, dropout=0.5, max_seq_len=8)
    x = torch.randn(1, 8, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError):
        CausalSelfAttention(32, 4, 3)
    with pytest.raises(ValueError):
        CausalSelfAttention(30, 4, 4)


def _qk_norm_reference(attn: CausalSelfAttention, x_BSD: torch.Tensor) -> torch.Tensor:
    """Attention with RMSNorm per head written out (Qwen3's q_norm / k_norm over head_dim)."""
    B, S, _ = x_BSD.shape
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim

    def norm(t, w):  # t: [B, S, heads, hd]
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps) * w

    q = norm(attn.wq(x_BSD).view(B, S, H, hd), attn.q_norm.weight).transpose(1, 2)
    k = norm(attn.wk(x_BSD).view(B, S, KV, hd), attn.k_norm.weight).transpose(1, 2)
    v = attn.wv(x_BSD).view(B, S, KV, hd).transpose(1, 2)
    q, k = apply_rope(q, attn.rope_cos, attn.rope_sin), apply_rope(k, attn.rope_cos, attn.rope_sin)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H * hd))


def test_per_head_qk_norm_equals_reference_and_differs_from_whole():
    torch.manual_seed(0)
    kw = {"head_dim": 8, "max_seq_len": 16, "qkv_bias": True}
    head = CausalSelfAttention(32, 4, 2, qk_norm="head", **kw).double()
    whole = CausalSelfAttention(32, 4, 2, qk_norm=True, **kw).double()
    assert head.q_norm.weight.shape == head.k_norm.weight.shape == (8,)
    assert whole.q_norm.weight.shape == (32,) and whole.k_norm.weight.shape == (16,)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    whole.load_state_dict(
        head.state_dict()
        | {"q_norm.weight": head.q_norm.weight.repeat(4), "k_norm.weight": head.k_norm.weight.repeat(2)}
    )
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    y = head(x)
    torch.testing.assert_close(y, _qk_norm_reference(head, x), rtol=0, atol=1e-10)
    # the same weights normalised over the whole projection give another function
    assert (whole(x) - y).abs().max() > 1e-3


def test_per_head_qk_norm_ignores_each_heads_scale():
    """RMSNorm per head makes attention blind to a rescaled query head; the whole-projection norm is not."""
    torch.manual_seed(1)
    x = torch.randn(1, 6, 32)
    for mode, invariant in (("head", True), (True, False)):
        attn = CausalSelfAttention(32, 4, 4, qk_norm=mode, max_seq_len=8)
        y = attn(x)
        with torch.no_grad():
            attn.wq.weight[:8] *= 5.0  # query head 0 only
        assert torch.allclose(attn(x), y, atol=1e-5) is invariant


def test_qk_norm_rejects_unknown_modes():
    with pytest.raises(ValueError, match="qk_norm"):
        CausalSelfAttention(32, 4, 4, qk_norm="heads")
