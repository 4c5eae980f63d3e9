"""Counts from the spec alone, checked against hand-derived numbers for the quickstart specs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeplat.spec import load_spec
from moeplat.spec.plan import plan
from moeplat.spec.plan_text import _n, format_plan

SPECS = Path(__file__).resolve().parents[2] / "specs"
QUICKSTART = SPECS / "quickstart.yaml"
DENSE = SPECS / "quickstart-dense.yaml"

# quickstart.yaml: vocab 256, d_model 128, 4 layers, 4 heads (head dim 32), 2 kv heads, tied embeddings,
# every layer MoE: 16 SwiGLU experts of d_ff 128, top_k 4, no shared experts; seq_len 128, batch 16.
V, D, L, H, KV, HD, E, K, F, S, B = 256, 128, 4, 4, 2, 32, 16, 4, 128, 128, 16

ATTN = 2 * D * H * HD + 2 * D * KV * HD  # Wq, Wo: d x h*hd;  Wk, Wv: d x kv*hd;  no biases  = 49,152
EXPERT = 3 * D * F  # SwiGLU: gate, up (d x f) and down (f x d)  = 49,152
ROUTER = D * E  # one logit per expert  = 2,048
NORMS = 2 * D  # RMSNorm weights before attention and before the FFN  = 256
OTHER = V * D + D  # tied embedding/head + final norm  = 32,896

TOTAL = OTHER + L * (ATTN + ROUTER + E * EXPERT + NORMS)
ACTIVE = OTHER + L * (ATTN + ROUTER + K * EXPERT + NORMS)

# forward FLOPs per token: 2 per multiply-accumulate; attention scores QK^T and AV over the full S x S
ATTN_FLOPS = 2 * ATTN + 2 * 2 * S * H * HD
FWD = L * (ATTN_FLOPS + 2 * (ROUTER + K * EXPERT)) + 2 * D * V  # + the output head


def _plan(spec_file: Path = QUICKSTART, *overrides: str):
    return plan(load_spec(spec_file, list(overrides)).spec)


def test_the_hand_derivation_itself():
    assert (ATTN, EXPERT, ROUTER, OTHER) == (49_152, 49_152, 2_048, 32_896)
    assert (TOTAL, ACTIVE) == (3_384_448, 1_025_152)


def test_quickstart_counts():
    p = _plan()
    assert p.total_params == TOTAL
    assert p.active_params == ACTIVE
    assert p.embedding_params == V * D
    assert p.expert_params == L * E * EXPERT
    assert p.moe_layers == [0, 1, 2, 3]
    assert [layer.kind for layer in p.layers] == ["moe"] * L
    assert p.flops_per_token_fwd == FWD
    assert p.flops_per_token_train == 3 * FWD
    assert p.tokens_per_step == B * S
    assert p.flops_per_step_train == 3 * FWD * B * S


def test_memory_estimate_follows_the_parameter_count():
    mem = _plan().memory_bytes
    assert (mem["weights"], mem["grads"], mem["optimizer"]) == (4 * TOTAL, 4 * TOTAL, 8 * TOTAL)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert mem["activations"] > 0


def test_dense_counterpart_has_the_same_active_ffn_within_the_router():
    moe, dense = _plan(QUICKSTART), _plan(DENSE)
    assert dense.moe_layers == [] and dense.expert_params == 0
    assert dense.total_params == dense.active_params
    # dense d_ff 512 = top_k * expert d_ff: per layer the MoE model has only its router on top
    for m, d in zip(moe.layers, dense.layers, strict=True):
        assert (d.kind, m.kind) == ("dense", "moe")
        assert m.active_params - d.active_params == ROUTER
        assert m.flops_per_token - d.flops_per_token == 2 * ROUTER
    assert moe.active_params - dense.active_params == L * ROUTER
    assert (moe.active_params - dense.active_params) / moe.active_params < 0.01


def test_mixed_layers_are_the_mean_of_all_moe_and_all_dense():
    mixed = _plan(
        QUICKSTART,
        "model.moe.layers={kind: every, n: 2, offset: 1}",
        "model.dense_ffn={kind: swiglu, d_ff: 512}",
    )
    moe, dense = _plan(QUICKSTART), _plan(DENSE)
    assert [layer.kind for layer in mixed.layers] == ["dense", "moe", "dense", "moe"]
    assert mixed.moe_layers == [1, 3]
    assert 2 * mixed.total_params == moe.total_params + dense.total_params
    assert 2 * mixed.active_params == moe.active_params + dense.active_params
    assert mixed.expert_params == 2 * E * EXPERT


@pytest.mark.parametrize(
    ("override", "d_total", "d_active"),
    [
        ("model.moe.top_k=1", 0, -L * (K - 1) * EXPERT),
        ("model.moe.num_experts=32", L * 16 * (EXPERT + D), L * 16 * D),  # 16 more experts and router rows
        ("model.moe.shared_experts={count: 1}", L * EXPERT, L * EXPERT),
        ("model.moe.shared_experts={count: 2, d_ff: 32}", L * 3 * D * 64, L * 3 * D * 64),
        ("model.tie_embeddings=false", V * D, V * D),
        ("model.n_kv_heads=4", L * 2 * D * 2 * HD, L * 2 * D * 2 * HD),  # 2 more kv heads in Wk, Wv
    ],
)
def test_count_changes_with_one_knob(override, d_total, d_active):
    p = _plan(QUICKSTART, override)
    assert (p.total_params - TOTAL, p.active_params - ACTIVE) == (d_total, d_active)


def test_format_plan_mentions_total_and_active_params():
    loaded = load_spec(QUICKSTART)
    text = format_plan(loaded.spec, plan(loaded.spec))
    assert f"total params    3.38M ({TOTAL:,})" in text
    assert "active params   1.03M per token (30.3% of total)" in text
    assert "16 x swiglu(d_ff=128), top_k=4" in text
    assert "MoE: [0, 1, 2, 3]" in text


def test_format_plan_of_a_dense_model():
    loaded = load_spec(DENSE)
    text = format_plan(loaded.spec, plan(loaded.spec))
    assert "MoE: none" in text and "experts " not in text
    assert "(100.0% of total)" in text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (999, "999"),
        (1.5e3, "1.50k"),
        (2e6, "2.00M"),
        (3e9, "3.00G"),
        (4e12, "4.00T"),
        (7.37e16, "73.70P"),
        (5e18, "5.00E"),
        (6e21, "6000.00E"),
    ],
)
def test_counts_use_si_prefixes_up_to_exa(value, text):
    assert _n(value) == text


def test_deepseek_v3_plan_reads_in_si_prefixes():
    """The full DeepSeek-V3 spec: hundreds of billions of parameters and petaFLOPs per step."""
    loaded = load_spec(SPECS / "reference" / "deepseek-v3.yaml", ["train.batch_size=64"])
    text = format_plan(loaded.spec, plan(loaded.spec))
    assert "total params    671.03G" in text
    assert re.search(r"-> \d+\.\d\dP FLOP per optimizer step", text), text
    assert "TiB" in text and re.search(r"\d{5,}\.\d\d[kMGTPE ]", text) is None, text
