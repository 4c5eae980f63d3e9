"""moeplat.interop.hf against the transformers MoE blocks themselves (tiny random configs, no downloads).

For each family (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V3, Switch Transformers): from_hf(block) computes
the block's output in float64 to 1e-10 and float32 to 1e-5, chooses the same experts with the same
weights, to_hf(from_hf(block)) gives back the same weights and outputs, and moeplat's balancing and
z-losses equal transformers' loss functions on the same router logits.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moeplat.interop import from_hf, to_hf  # noqa: E402
from moeplat.interop.hf_families import FIXED_CAPACITY_FACTOR  # noqa: E402
from moeplat.nn import MoELayer  # noqa: E402

D = 16
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _module(family: str):
    return __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["_"])


def _config(family: str, **overrides):
    """Tiny random configs: every option that changes the routing set away from its default."""
    overrides = {"experts_implementation": "eager", **overrides}  # transformers' reference loop
    if family == "mixtral":
        kw = {"hidden_size": D, "intermediate_size": 24, "num_local_experts": 6, "num_experts_per_tok": 2}
        return transformers.MixtralConfig(**{**kw, **overrides})
    if family == "olmoe":
        kw = {"hidden_size": D, "intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 3}
        return transformers.OlmoeConfig(**{**kw, **overrides})
    if family == "qwen2_moe":
        kw = {
            "hidden_size": D,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 20,
            "num_experts": 6,
            "num_experts_per_tok": 2,
        }
        return transformers.Qwen2MoeConfig(**{**kw, **overrides})
    if family == "deepseek_v3":
        kw = {
            "hidden_size": D,
            "moe_intermediate_size": 12,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 2,
            "routed_scaling_factor": 2.5,
        }
        return transformers.DeepseekV3Config(**{**kw, **overrides})
    assert family == "switch_transformers"
    kw = {"d_model": D, "d_ff": 24, "num_experts": 4, "expert_capacity": 3, "dropout_rate": 0.1}
    return transformers.SwitchTransformersConfig(**{**kw, **overrides})


BLOCK = {
    "mixtral": "MixtralSparseMoeBlock",
    "olmoe": "OlmoeSparseMoeBlock",
    "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "deepseek_v3": "DeepseekV3MoE",
    "switch_transformers": "SwitchTransformersSparseMLP",
}


def _block(family: str, dtype=torch.float64, seed: int = 0, **overrides):
    """An evaluation-mode block with random weights (and a random DeepSeek-V3 correction bias)."""
    block = getattr(_module(family), BLOCK[family])(_config(family, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        for b in block.buffers():
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return block.to(dtype).eval()


def _x(dtype, B: int = 3, S: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# (family, config overrides, batch size): Switch's capacity is per sequence in transformers (B = 1 here,
# see test_switch_capacity_is_per_sequence_in_transformers for B > 1).
CASES = [
    ("mixtral", {}, 3),
    ("mixtral", {"num_experts_per_tok": 3}, 3),
    ("olmoe", {"norm_topk_prob": False}, 3),
    ("olmoe", {"norm_topk_prob": True}, 3),
    ("qwen2_moe", {"norm_topk_prob": False}, 3),
    ("qwen2_moe", {"norm_topk_prob": True}, 3),
    ("deepseek_v3", {}, 3),
    ("deepseek_v3", {"norm_topk_prob": False, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2}, 3),
    ("switch_transformers", {}, 1),
    ("switch_transformers", {"dense_act_fn": "gelu", "expert_capacity": 5}, 1),
]
IDS = [f"{f}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for f, o, _ in CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("family", "overrides", "B"), CASES, ids=IDS)
def test_from_hf_computes_the_blocks_output(family, overrides, B, dtype):
    block = _block(family, dtype, **overrides)
    layer = from_hf(block)
    assert isinstance(layer, MoELayer) and not layer.training
    assert layer.experts.w_up.dtype == dtype
    x = _x(dtype, B=B, S=24 if family == "switch_transformers" else 10)
    with torch.no_grad():
        want, got = block(x.clone()), layer(x).y
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=0)
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize(("family", "overrides", "B"), CASES, ids=IDS)
def test_router_chooses_the_same_experts_with_the_same_weights(family, overrides, B):
    block = _block(family, **overrides)
    layer = from_hf(block)
    x = _x(torch.float64, B=B)
    with torch.no_grad():
        route = layer.router(x.reshape(-1, D))
        if family == "switch_transformers":
            _, probs_BS1, logits_BSE = block.router(x)
            logits = logits_BSE.reshape(-1, logits_BSE.shape[-1])
            hf_idx, hf_w = logits.argmax(-1, keepdim=True), probs_BS1.reshape(-1, 1)
        else:
            logits, hf_w, hf_idx = block.gate(x.reshape(-1, D))
    torch.testing.assert_close(route.logits_TE, logits.float(), atol=1e-6, rtol=0)
    # Compare slot sets in expert order (DeepSeek-V3's top-k is unsorted).
    ours_order, hf_order = route.topk_idx_TK.sort(dim=-1), hf_idx.sort(dim=-1)
    assert torch.equal(ours_order.values, hf_order.values)
    ours_w = route.topk_weight_TK.gather(1, ours_order.indices).double()
    torch.testing.assert_close(ours_w, hf_w.gather(1, hf_order.indices).double(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("family", "overrides", "B"), CASES, ids=IDS)
def test_to_hf_round_trip_gives_the_same_weights_and_outputs(family, overrides, B, dtype):
    block = _block(family, dtype, **overrides)
    back = to_hf(from_hf(block), _config(family, **overrides))
    assert type(back) is type(block) and not back.training
    want, got = block.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    x = _x(dtype, B=B, S=24 if family == "switch_transformers" else 10)
    with torch.no_grad():
        torch.testing.assert_close(back(x.clone()), block(x.clone()), atol=TOL[dtype], rtol=0)


def test_to_hf_names_every_mismatch_with_the_config():
    layer = from_hf(_block("qwen2_moe", norm_topk_prob=False))
    with pytest.raises(ValueError, match=r"(?s)router: .*normalize=False.*normalize=True"):
        to_hf(layer, _config("qwen2_moe", norm_topk_prob=True))
    with pytest.raises(ValueError, match=r"(?s)experts: layer has num_experts=6.*num_experts=8"):
        to_hf(layer, _config("qwen2_moe", num_experts=8))
    with pytest.raises(ValueError, match="model_type"):
        to_hf(layer, transformers.LlamaConfig())


def test_from_hf_rejects_what_moeplat_cannot_compute():
    with pytest.raises(ValueError, match="from_hf converts"):
        from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="router_bias"):
        from_hf(_block("switch_transformers", router_bias=True))
    with pytest.raises(ValueError, match="GELUTanh has no moeplat expert kind"):
        from_hf(_block("mixtral", hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(ValueError, match="no balancing loss"):
        from_hf(_block("deepseek_v3"), router_aux_loss_coef=0.01)


# --- family features the parity tests above rely on ---------------------------------------------------


def test_deepseek_v3_bias_groups_and_scaling_really_change_the_choice():
    """The tiny DeepSeek-V3 config exercises the bias (choice only), the group limit and the scale."""
    block = _block("deepseek_v3")
    layer = from_hf(block)
    r, x_TD = layer.router, _x(torch.float64).reshape(-1, D)
    assert (r.n_groups, r.topk_groups, r.scaling_factor, r.normalize) == (4, 2, 2.5, True)
    with torch.no_grad():
        chosen = r(x_TD)
        bias = r.bias_E.clone()
        r.bias_E.zero_()
        unbiased = r(x_TD)
        r.bias_E.copy_(bias)
    assert not torch.equal(chosen.topk_idx_TK.sort(-1).values, unbiased.topk_idx_TK.sort(-1).values)
    groups_used = (chosen.topk_idx_TK // 2).unique(dim=None).numel()
    assert groups_used == 4 and all(len(set((row // 2).tolist())) <= 2 for row in chosen.topk_idx_TK)
    torch.testing.assert_close(chosen.topk_weight_TK.sum(-1), torch.full((30,), 2.5, dtype=torch.float32))


def test_qwen2_moe_shared_expert_and_its_gate_are_copied():
    block = _block("qwen2_moe")
    layer = from_hf(block)
    assert layer.shared is not None and layer.shared.w_up.out_features == 20 and layer.shared_gate is not None
    x = _x(torch.float64)
    with torch.no_grad():
        block.shared_expert_gate.weight.zero_()  # the gate becomes sigmoid(0) = 1/2 in transformers only
        assert not torch.allclose(block(x.clone()), layer(x).y, atol=1e-3)


def test_switch_capacity_really_drops_tokens_and_maps_to_min_capacity():
    block = _block("switch_transformers", expert_capacity=3)
    layer = from_hf(block)
    assert layer.min_capacity == 3 and layer.capacity_factor_eval == FIXED_CAPACITY_FACTOR
    assert layer.experts.activation == "relu" and layer.experts.dropout == 0.1  # dropout_rate, hidden
    x = _x(torch.float64, B=1, S=24)
    with torch.no_grad():
        route = layer.router(x.reshape(-1, D))
        keep_TK = layer.keep_mask(route.topk_idx_TK)
        hf_kept_E = block.router(x)[0].reshape(-1, 4).sum(-1).bool()
        want, got = block(x.clone()), layer(x).y
    assert torch.equal(keep_TK[:, 0], hf_kept_E)
    assert keep_TK.sum() == 12 and (~keep_TK).sum() == 12  # 4 experts x 3 slots of 24 tokens
    dropped = ~keep_TK[:, 0]
    assert torch.equal(want[0, dropped], torch.zeros_like(want[0, dropped]))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_switch_capacity_is_per_sequence_in_transformers():
    """A known difference (see moeplat.interop.hf): transformers gives each batch row its own
    `expert_capacity`; moeplat's capacity is for all tokens passed to the layer (Switch sec. 2.2).
    Called per sequence, the layer computes transformers' output; on the whole batch it drops more."""
    block = _block("switch_transformers", expert_capacity=3)
    layer = from_hf(block)
    x = _x(torch.float64, B=3, S=24)
    with torch.no_grad():
        want = block(x.clone())
        per_sequence = torch.stack([layer(x[b : b + 1]).y[0] for b in range(3)])
        pooled = layer(x)
    torch.testing.assert_close(per_sequence, want, atol=1e-10, rtol=0)
    assert pooled.dropped_frac > 0.8 and not torch.allclose(pooled.y, want)


# --- balancing losses against transformers' loss functions ----------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_equals_transformers_times_top_k(family, top_k):
    block = _block(family, torch.float32, num_experts_per_tok=top_k)
    coef = 0.02
    layer = from_hf(block, router_aux_loss_coef=coef)
    assert layer.loss_coefs["load_balancing"] == pytest.approx(coef * top_k)
    x = _x(torch.float32, B=4, S=16) + 1.0  # a shared direction: some experts are favoured
    with torch.no_grad():
        logits = block.gate(x.reshape(-1, D))[0]
        out = layer(x)
    hf = _module(family).load_balancing_loss_func((logits,), logits.shape[-1], top_k)
    assert hf > top_k * 1.05  # unbalanced enough that the equality says something
    torch.testing.assert_close(out.losses["load_balancing"] * top_k, hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.aux_loss, coef * hf, atol=1e-7, rtol=0)


def test_switch_balancing_and_z_loss_equal_transformers():
    """Switch's balancing loss is per sequence (moeplat's sequence_balance for top-1); z-loss as ST-MoE."""
    mod = _module("switch_transformers")
    block = _block("switch_transformers", torch.float32, expert_capacity=64)
    layer = from_hf(block, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    x = _x(torch.float32, B=3, S=16)
    with torch.no_grad():
        logits = block.router(x)[2]
        out = layer(x)
    hf_balance = mod.load_balancing_loss_func(logits.softmax(-1), logits.argmax(-1))
    hf_z = mod.router_z_loss_func(logits)
    torch.testing.assert_close(out.losses["sequence_balance"], hf_balance, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.losses["z_loss"], hf_z, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.aux_loss, 0.01 * hf_balance + 0.001 * hf_z, atol=1e-6, rtol=0)
    # For one sequence it is also the batch-wide load_balancing loss.
    with torch.no_grad():
        one = layer(x[:1])
    hf_one = mod.load_balancing_loss_func(logits[:1].softmax(-1), logits[:1].argmax(-1))
    torch.testing.assert_close(one.losses["load_balancing"], hf_one, atol=1e-6, rtol=0)


def test_deepseek_v3_gamma_is_moeplat_only_and_survives_to_hf():
    block = _block("deepseek_v3")
    layer = from_hf(block, gamma=0.01)
    assert layer.router.gamma == 0.01 and from_hf(block).router.gamma == 0.0
    layer.after_optimizer_step(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, 3]))  # moves the bias
    back = to_hf(layer, _config("deepseek_v3"))
    torch.testing.assert_close(
        back.gate.e_score_correction_bias,
        block.gate.e_score_correction_bias
        + 0.01 * torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, -1], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="DeepSeek-V3 only"):
        from_hf(_block("mixtral"), gamma=0.01)
