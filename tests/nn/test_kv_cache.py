"""KV cache (moeplat.nn.kv_cache): a prefill, then one token at a time (and a chunk of several
after cached ones), gives the logits of one full forward position by position, in float64.
Attention kinds: GQA, MHA, qk_norm, MLA with and without q_lora_rank (absorbed decoding over the
compressed cache); FFNs dense and dropless MoE."""

from __future__ import annotations

import pytest
import torch

from moeplat.nn import (
    CausalSelfAttention,
    DenseFFN,
    KVCache,
    MoELayer,
    MultiHeadLatentAttention,
    TransformerLM,
)

V, D, H, MAX = 50, 24, 4, 40
LAYERS = 2


def _attn(kind: str) -> torch.nn.Module:
    if kind.startswith("mla"):
        q_lora = 12 if kind == "mla_qlora" else None
        mla = dict(kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
        return MultiHeadLatentAttention(D, H, q_lora_rank=q_lora, max_seq_len=MAX, **mla)
    kv = {"gqa": 2, "mha": 4, "qk_norm": 2}[kind]
    return CausalSelfAttention(D, H, kv, max_seq_len=MAX, qk_norm=kind == "qk_norm")


def _model(attn: str, ffn: str = "dense", seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    ffns = [
        MoELayer(D, 4, 2, 16) if ffn == "moe" else DenseFFN(D, 32) for _ in range(LAYERS)
    ]  # MoELayer: capacity None = dropless
    attns = [_attn(attn) for _ in range(LAYERS)]
    model = TransformerLM(V, D, H, 2, MAX, ffns, attns=attns).double().eval()
    with torch.no_grad():  # norms away from 1, so a norm applied at the wrong place shows
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    return model


CASES = [
    ("gqa", "dense"),
    ("mha", "dense"),
    ("qk_norm", "dense"),
    ("mla", "dense"),
    ("mla_qlora", "dense"),
    ("gqa", "moe"),
    ("mla", "moe"),
]


@pytest.mark.parametrize(("attn", "ffn"), CASES)
@torch.no_grad()
def test_cached_logits_equal_the_full_forward(attn, ffn):
    model = _model(attn, ffn)
    idx_BS = torch.randint(0, V, (2, 20))
    full_BSV = model(idx_BS).logits_BSV
    cache = KVCache(model.n_layers, max_len=MAX)
    pieces = [(0, 7), *[(s, s + 1) for s in range(7, 15)], (15, 20)]  # prefill, steps, a chunk
    for a, b in pieces:
        out = model(idx_BS[:, a:b], cache=cache)
        assert out.cache is cache and cache.length == b
        torch.testing.assert_close(out.logits_BSV, full_BSV[:, a:b], rtol=0, atol=1e-10)


@torch.no_grad()
def test_cached_float32_within_1e_5():
    model = _model("mla_qlora", "moe").float()
    idx_BS = torch.randint(0, V, (1, 16))
    full_BSV = model(idx_BS).logits_BSV
    cache = KVCache(model.n_layers, max_len=16)
    steps = [model(idx_BS[:, :4], cache=cache).logits_BSV]
    steps += [model(idx_BS[:, s : s + 1], cache=cache).logits_BSV for s in range(4, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full_BSV, rtol=0, atol=1e-5)


@torch.no_grad()
def test_what_each_attention_caches():
    """GQA: k and v at n_kv_heads after RoPE; MLA: one latent row of L + r per token, no heads."""
    gqa, mla = _model("gqa"), _model("mla")
    for model in (gqa, mla):
        cache = KVCache(model.n_layers, max_len=10)
        model(torch.randint(0, V, (3, 4)), cache=cache)
        assert all(layer.length == 4 for layer in cache.layers)
        if model is gqa:
            k = cache[0].buffers["k"]
            assert set(cache[0].buffers) == {"k", "v"} and k.shape == (3, 2, 10, D // H)
        else:
            assert set(cache[0].buffers) == {"latent"}
            assert cache[0].buffers["latent"].shape == (3, 1, 10, 8 + 4)


@torch.no_grad()
def test_a_full_cache_and_positions_past_the_model_are_errors():
    model = _model("gqa")
    cache = KVCache(model.n_layers, max_len=5)
    model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="KV cache full: 5 cached \\+ 1 new > max_len 5"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    long_cache = KVCache(model.n_layers, max_len=MAX + 5)
    model(torch.zeros(1, MAX, dtype=torch.long), cache=long_cache)
    with pytest.raises(ValueError, match=f"sequence length {MAX + 1} > max_seq_len {MAX}"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=long_cache)


def test_without_a_cache_the_output_has_none():
    model = _model("gqa")
    assert model(torch.zeros(1, 3, dtype=torch.long)).cache is None
