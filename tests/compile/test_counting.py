"""Count before you build: plan() from the spec alone equals the built torch model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moeplat.compile.model import build_model
from moeplat.nn import MoELayer
from moeplat.spec import load_spec
from moeplat.spec.plan import plan

REPO = Path(__file__).resolve().parents[2]
VARIANTS = {
    "quickstart": ("specs/quickstart.yaml", []),
    "dense": ("specs/quickstart-dense.yaml", []),
    "untied-shared-every2": (
        "specs/quickstart.yaml",
        [
            "model.tie_embeddings=false",
            "model.moe.shared_experts.count=2",
            "model.moe.shared_experts.d_ff=64",
            "model.moe.layers={kind: every, n: 2, offset: 1}",
            "model.dense_ffn={kind: swiglu, d_ff: 384}",
            "model.n_kv_heads=4",
        ],
    ),
    "first-dense-top1": (
        "specs/quickstart.yaml",
        [
            "model.moe.layers={kind: first_dense, k: 1}",
            "model.dense_ffn={kind: swiglu, d_ff: 200}",
            "model.moe.top_k=1",
            "model.moe.num_experts=4",
        ],
    ),
    # Shazeer et al. 2017: a second E x D projection (the learned noise std) per MoE layer.
    "noisy-topk": ("specs/quickstart.yaml", ["model.moe.router={kind: noisy_topk}"]),
    # Shazeer 2020 GLU variants: geglu keeps 3 matrices; gelu/relu MLPs have 2 (no gate).
    "geglu": ("specs/quickstart.yaml", ["model.moe.experts={kind: geglu, d_ff: 96}"]),
    "gelu-shared-relu-dense": (
        "specs/quickstart.yaml",
        [
            "model.moe.experts={kind: gelu, d_ff: 160}",
            "model.moe.shared_experts.count=1",
            "model.moe.layers={kind: every, n: 2, offset: 1}",
            "model.dense_ffn={kind: relu, d_ff: 320}",
        ],
    ),
    "relu-dense-model": ("specs/quickstart-dense.yaml", ["model.dense_ffn={kind: relu, d_ff: 300}"]),
    "geglu-dense-model": ("specs/quickstart-dense.yaml", ["model.dense_ffn={kind: geglu, d_ff: 200}"]),
    # Qwen2-MoE: a D -> 1 sigmoid gate on the shared experts' output, per MoE layer.
    "shared-gate": (
        "specs/quickstart.yaml",
        ["model.moe.shared_experts={count: 2, d_ff: 32, gate: true}"],
    ),
    # DeepSeekMoE fine-grained segmentation: 8*4 experts of width 256/4, top 2*4, a 32-way router.
    "fine-grained": ("specs/quickstart.yaml", ["model.moe.granularity=4"]),
    "fine-grained-gelu-shared": (
        "specs/quickstart.yaml",
        [
            "model.moe.granularity=2",
            "model.moe.experts={kind: gelu, d_ff: 160}",
            "model.moe.shared_experts={count: 1, gate: true}",
        ],
    ),
    # PR-MoE (DeepSpeed-MoE): pyramid expert counts / top-k per MoE layer, and the residual
    # MoE's D -> 2 softmax mixing coefficient (with bias) per MoE layer.
    "pyramid-residual": (
        "specs/quickstart.yaml",
        [
            "model.moe.num_experts=[4, 4, 8, 8]",
            "model.moe.top_k=[1, 1, 2, 2]",
            "model.moe.shared_experts={count: 1, d_ff: 64, residual_coefficient: true}",
        ],
    ),
    "pyramid-every2-fine-grained": (
        "specs/quickstart.yaml",
        [
            "model.moe.layers={kind: every, n: 2, offset: 1}",
            "model.dense_ffn={kind: swiglu, d_ff: 384}",
            "model.moe.num_experts=[4, 16]",
            "model.moe.granularity=2",
        ],
    ),
    # DeepSeek-V2 MLA: low-rank q and kv latents (RMSNorm'd), decoupled RoPE key, v_head_dim != qk.
    "mla": (
        "specs/quickstart.yaml",
        [
            "model.n_kv_heads=null",
            "model.attention={kind: mla, kv_lora_rank: 24, q_lora_rank: 40, qk_nope_head_dim: 16, "
            "qk_rope_head_dim: 8, v_head_dim: 12}",
        ],
    ),
    "mla-no-q-lora": (
        "specs/quickstart-dense.yaml",
        [
            "model.n_kv_heads=null",
            "model.attention={kind: mla, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4, "
            "v_head_dim: 20}",
        ],
    ),
    # GQA with a head dim other than d_model / n_heads (GLaM), q/k/v biases (Qwen1.5), QK-norm (OLMoE).
    "gqa-head-dim-bias-qk-norm": (
        "specs/quickstart.yaml",
        ["model.attention={kind: gqa, head_dim: 48, qkv_bias: true, qk_norm: true}"],
    ),
    # Qwen3's QK-norm per head: one head_dim-wide weight for q and one for k.
    "gqa-qk-norm-per-head": (
        "specs/quickstart.yaml",
        ["model.attention={kind: gqa, head_dim: 48, qk_norm: head}"],
    ),
    # Hash layers have no router weights at all.
    "hash": (
        "specs/quickstart.yaml",
        ["model.moe.router={kind: hash}", "model.moe.top_k=1", "model.moe.losses={}"],
    ),
    # Huang et al. 2024 top-p: 1..top_k experts per token; plan's counts are the maximum.
    "top-p": ("specs/quickstart-top-p.yaml", ["model.moe.router.p=0.3"]),
    # MoE++ null experts: the router scores 16 + 8 experts; null slots compute nothing.
    "null-experts": ("specs/quickstart-null-experts.yaml", []),
}


def _load(name, *extra):
    path, overrides = VARIANTS[name]
    return load_spec(REPO / path, [*overrides, *extra]).spec


def spec_has_moe(name: str) -> bool:
    return "dense" not in VARIANTS[name][0]


def _active_params(model) -> int:
    """Active parameters counted on the built module: each MoE layer's routed experts count
    top_k/E of their weights (the layer's own E and top_k: pyramid layouts differ per layer)."""
    total = sum(p.numel() for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            n = sum(p.numel() for p in layer.experts.parameters())
            total -= n - n * layer.top_k // layer.num_experts
    return total


@pytest.mark.parametrize("name", VARIANTS)
def test_param_counts_equal_built_model(name):
    spec = _load(name)
    model = build_model(spec)
    p = plan(spec)
    assert p.total_params == sum(t.numel() for t in model.parameters())
    assert p.active_params == _active_params(model)
    assert p.embedding_params == model.tok_emb.weight.numel()
    for layer in p.layers:
        block = model.blocks[layer.index]
        assert layer.params == sum(t.numel() for t in block.parameters()), layer
        assert layer.kind == ("moe" if type(block.ffn).__name__ == "MoELayer" else "dense")


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_flops_equal_flop_counter(name):
    """Matmul FLOPs measured by torch on a dropless training-mode forward pass equal plan's FLOPs
    per token (training mode: noisy_topk computes its noise projection only in training).

    The loop dispatch is measured: FlopCounterMode does not see torch._grouped_mm, and both
    dispatchers compute the same products (tests/nn/test_nn_dispatch.py).
    """
    spec = _load(name, *(["model.moe.dispatch={kind: loop}"] if spec_has_moe(name) else []))
    model = build_model(spec).train()
    b, s = 2, spec.data.seq_len
    idx = torch.randint(0, spec.model.vocab_size, (b, s))
    # The math SDPA backend decomposes into matmuls the counter sees (the fused CPU kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(idx)
    # Plan counts every top_k slot computed; a slot top-p leaves unused or a null expert takes
    # costs nothing (0 for the fixed top-k routers).
    skipped = 0
    for i, o in out.moe.items():
        layer = model.blocks[i].ffn
        per_slot = 2 * sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
        skipped += (b * s * layer.top_k - int(o.stats.tokens_per_expert_E.sum())) * per_slot
    if name in ("top-p", "null-experts"):
        assert skipped > 0
    assert counter.get_total_flops() == plan(spec).flops_per_token_fwd * b * s - skipped


def test_expected_counts_of_dynamic_routers():
    """Expected active params at uniform router probabilities: top-p with p = 0.3 of 16 experts
    takes ceil(4.8) = 5 of its top_k 8; 8 null experts beside 16 leave top_k * 16 / 24 real experts."""
    expert = 3 * 128 * 128  # swiglu: 3 matrices of d_model x d_ff
    top_p = plan(_load("top-p"))
    assert top_p.active_params - top_p.expected_active_params == 4 * (8 - 5) * expert  # 4 MoE layers
    assert top_p.flops_per_token_fwd - top_p.expected_flops_per_token_fwd == 2 * 4 * 3 * expert
    assert "ceil(p * E) = 5 of top_k 8" in top_p.expected_assumption
    nulls = plan(_load("null-experts"))
    assert nulls.active_params - nulls.expected_active_params == round(4 * (4 - 4 * 16 / 24) * expert)
    assert nulls.total_params - plan(_load("quickstart")).total_params == 4 * 8 * 128  # router rows
    fixed = plan(_load("quickstart"))
    assert (fixed.expected_active_params, fixed.expected_assumption) == (fixed.active_params, "")
    from moeplat.spec.plan_text import format_plan

    text = format_plan(_load("null-experts"), nulls)
    assert "router=topk + 8 null experts" in text and "expected" in text
    assert "expected" not in format_plan(_load("quickstart"), fixed)


def test_router_params_per_kind():
    base, noisy, hashed = (plan(_load(name)) for name in ("quickstart", "noisy-topk", "hash"))
    routers = 4 * 16 * 128  # n_layers * num_experts * d_model
    assert noisy.total_params - base.total_params == routers
    assert noisy.active_params - base.active_params == routers
    assert base.total_params - hashed.total_params == routers


def test_dense_counterpart_matches_active_ffn_params():
    moe, dense = plan(_load("quickstart")), plan(_load("dense"))
    routers = 4 * 16 * 128  # n_layers * num_experts * d_model
    assert moe.active_params - routers == dense.active_params
    assert moe.total_params > 3 * dense.total_params


def test_plain_mlp_experts_have_two_thirds_of_the_glu_weights():
    glu = plan(_load("quickstart", "model.moe.experts={kind: geglu, d_ff: 96}"))
    plain = plan(_load("quickstart", "model.moe.experts={kind: relu, d_ff: 96}"))
    assert plain.expert_params * 3 == glu.expert_params * 2
    assert plain.expert_params == 4 * 16 * 2 * 128 * 96  # n_layers * E * 2 matrices * D * F


def test_shared_gate_adds_d_model_params_and_flops_per_moe_layer():
    gated = plan(_load("shared-gate"))
    plain = plan(_load("shared-gate", "model.moe.shared_experts.gate=false"))
    assert gated.total_params - plain.total_params == 4 * 128  # n_layers * d_model
    assert gated.active_params - plain.active_params == 4 * 128
    assert gated.flops_per_token_fwd - plain.flops_per_token_fwd == 4 * 2 * 128


@pytest.mark.parametrize("router", ["topk", "random"])
def test_fine_grained_segmentation_keeps_total_and_active_params(router):
    """DeepSeekMoE sec. 3.1: m times the experts at 1/m the width, m times top_k: the expert
    parameters, total and active, are those of the m = 1 model; only the router grows, to
    num_experts * m scores (none for the parameter-free random router)."""
    opts = [f"model.moe.router={{kind: {router}}}"] + (["model.moe.losses={}"] if router == "random" else [])
    coarse = plan(_load("quickstart", *opts))
    fine = plan(_load("quickstart", *opts, "model.moe.granularity=4"))
    router_growth = 0 if router == "random" else 4 * (16 * 4 - 16) * 128  # n_layers * (E*m - E) * d_model
    assert fine.expert_params == coarse.expert_params
    assert fine.total_params - coarse.total_params == router_growth
    assert fine.active_params - coarse.active_params == router_growth
    built = build_model(_load("quickstart", *opts, "model.moe.granularity=4"))
    assert fine.total_params == sum(t.numel() for t in built.parameters())
    if router == "random":
        assert (fine.total_params, fine.active_params) == (coarse.total_params, coarse.active_params)
