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
