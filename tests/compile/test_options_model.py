"""Every `model` option of a spec changes what `moeplat.compile.model` builds (one test per option).

Each test loads a real spec (tests/fixtures/tiny.yaml or specs/quickstart.yaml) with `--set`-style
overrides, builds it, and checks an effect that would break if the option were ignored or wired to
the wrong place: a shape, a module type, an output that changes (or does not) with weights held equal.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from moeplat.compile.model import build_model, build_moe_layer
from moeplat.errors import SpecError
from moeplat.nn import DenseFFN, MoELayer
from moeplat.nn.capacity import expert_capacity
from moeplat.nn.dispatch import DISPATCHERS
from moeplat.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
QUICKSTART = REPO / "specs" / "quickstart.yaml"
DENSE_FFN = "model.dense_ffn={kind: swiglu, d_ff: 48}"


def _spec(*overrides: str, path: Path = TINY):
    return load_spec(path, list(overrides)).spec


def _model(*overrides: str, seed: int = 0, path: Path = TINY):
    torch.manual_seed(seed)
    return build_model(_spec(*overrides, path=path))


def _layer(*overrides: str, seed: int = 0) -> MoELayer:
    spec = _spec(*overrides)
    torch.manual_seed(seed)
    return build_moe_layer(spec.model.moe, spec.model.d_model, spec.model.vocab_size)


def _tokens(batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


def _x(d_model: int = 32, tokens: int = 64) -> torch.Tensor:
    return torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(2))


def _logits_with_weights_of(src: nn.Module, dst: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """dst's logits after loading src's weights: isolates the effect of a non-parameter option."""
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        return dst(idx).logits_BSV


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- model.moe.router -----------------------------------------------------------------------------


def test_router_normalize_rescales_the_chosen_weights_and_the_output():
    norm, raw = _layer("model.moe.router.normalize=true"), _layer("model.moe.router.normalize=false")
    assert norm.router.normalize and not raw.router.normalize
    raw.load_state_dict(norm.state_dict())
    x = _x()
    with torch.no_grad():
        w_norm, w_raw = norm.router(x).topk_weight_TK, raw.router(x).topk_weight_TK
        y_norm, y_raw = norm(x).y, raw(x).y
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(64))
    assert (w_raw.sum(-1) < 1 - 1e-3).all()  # raw softmax mass of 2 of 4 experts
    # Dropless and no shared experts: the routed output is linear in the combine weights, so
    # normalising divides each token's output by its raw top-k mass.
    torch.testing.assert_close(y_norm, y_raw / w_raw.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)


# --- model.moe.capacity ---------------------------------------------------------------------------


def test_capacity_factor_train_drops_in_train_mode_and_eval_factor_in_eval_mode():
    layer = _layer("model.moe.capacity={kind: factor, train: 0.5, eval: 4.0}")
    x = _x()
    with torch.no_grad():
        train_out = layer.train()(x)
        eval_out = layer.eval()(x)
    T, K, E = 64, 2, 4
    cap = expert_capacity(T, E, K, 0.5)
    assert train_out.dropped_frac > 0
    assert int(train_out.tokens_per_expert_E.max()) <= cap
    assert int(train_out.tokens_per_expert_E.sum()) == round(T * K * (1 - float(train_out.dropped_frac)))
    assert float(eval_out.dropped_frac) == 0.0
    assert int(eval_out.tokens_per_expert_E.sum()) == T * K
    assert not torch.allclose(train_out.y, eval_out.y)


def test_capacity_factors_are_not_swapped():
    layer = _layer("model.moe.capacity={kind: factor, train: 4.0, eval: 0.5}")
    x = _x()
    with torch.no_grad():
        assert float(layer.train()(x).dropped_frac) == 0.0
        assert float(layer.eval()(x).dropped_frac) > 0


def test_capacity_train_factor_sets_how_much_is_dropped():
    x = _x()
    dropped = []
    for factor in (0.25, 0.5, 1.0):
        layer = _layer(f"model.moe.capacity={{kind: factor, train: {factor}, eval: 2.0}}").train()
        with torch.no_grad():
            dropped.append(float(layer(x).dropped_frac))
    assert dropped[0] > dropped[1] > dropped[2]


def test_min_capacity_floors_the_capacity_and_so_stops_the_drops():
    cap = "model.moe.capacity={kind: factor, train: 0.25, eval: 0.25"
    low, high = _layer(cap + "}").train(), _layer(cap + ", min_capacity: 128}").train()
    assert (low.min_capacity, high.min_capacity) == (1, 128)
    x = _x()
    with torch.no_grad():
        out_low, out_high = low(x), high(x)
    assert float(out_low.dropped_frac) > 0
    assert int(out_low.tokens_per_expert_E.max()) <= expert_capacity(64, 4, 2, 0.25)
    assert float(out_high.dropped_frac) == 0.0


def test_drop_policy_probability_keeps_the_heaviest_slots_and_changes_the_output():
    cap = "model.moe.capacity={kind: factor, train: 0.5, eval: 0.5, drop_policy: "
    by_pos, by_prob = _layer(cap + "position}"), _layer(cap + "probability}")
    assert (by_pos.drop_policy, by_prob.drop_policy) == ("position", "probability")
    by_prob.load_state_dict(by_pos.state_dict())
    x = _x()
    with torch.no_grad():
        route = by_prob.router(x)
        keep_TK = by_prob.keep_mask(route.topk_idx_TK, route.valid_TK, route.topk_weight_TK)
        for e in range(4):
            mine = route.topk_idx_TK == e
            dropped = route.topk_weight_TK[mine & ~keep_TK]
            if dropped.numel():
                assert route.topk_weight_TK[mine & keep_TK].min() >= dropped.max()
        out_pos, out_prob = by_pos(x), by_prob(x)
    assert float(out_pos.dropped_frac) == float(out_prob.dropped_frac) > 0  # same count, other slots
    assert not torch.allclose(out_pos.y, out_prob.y)


def test_dropless_never_drops_in_either_mode():
    layer = _layer("model.moe.capacity={kind: dropless}")
    assert layer.capacity_factor_train is None and layer.capacity_factor_eval is None
    x = _x()
    with torch.no_grad():
        train_out, eval_out = layer.train()(x), layer.eval()(x)
    assert float(train_out.dropped_frac) == 0.0 == float(eval_out.dropped_frac)
    assert int(train_out.tokens_per_expert_E.sum()) == 64 * 2
    torch.testing.assert_close(train_out.y, eval_out.y)


# --- model.moe.losses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("losses", "lb_coef", "z_coef"),
    [
        ("{load_balancing: {coef: 0.01}, z_loss: {coef: 0.001}}", 0.01, 0.001),
        ("{load_balancing: {coef: 0.02}, z_loss: {coef: 0.001}}", 0.02, 0.001),
        ("{load_balancing: {coef: 0.01}}", 0.01, 0.0),
        ("{z_loss: {coef: 0.5}}", 0.0, 0.5),
        ("{load_balancing: null, z_loss: null}", 0.0, 0.0),
        ("{}", 0.0, 0.0),
    ],
)
def test_loss_coefficients_weight_the_aux_loss(losses, lb_coef, z_coef):
    layer = _layer(f"model.moe.losses={losses}")
    assert (layer.balance_coef, layer.z_loss_coef) == (lb_coef, z_coef)
    out = layer(_x())
    lb, z = out.losses["load_balancing"], out.losses["z_loss"]
    assert lb > 0.5 and z > 0  # the unweighted losses are always computed (telemetry)
    torch.testing.assert_close(out.aux_loss, lb_coef * lb + z_coef * z)
    if lb_coef == z_coef == 0:
        assert float(out.aux_loss) == 0.0 and not out.aux_loss.requires_grad
    else:
        out.aux_loss.backward()  # the aux loss trains the router
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "router"),
    [
        ("importance", "topk"),
        ("load", "noisy_topk"),
        ("sequence_balance", "topk"),
        ("sequence_balance", "gshard"),
    ],
)
def test_combinable_balance_losses_are_weighted_into_the_aux_loss(name, router):
    layer = _layer(
        f"model.moe.router={{kind: {router}}}",
        f"model.moe.losses={{{name}: {{coef: 0.25}}, z_loss: {{coef: 0.001}}}}",
    ).train()
    assert layer.loss_coefs[name] == 0.25 and layer.loss_coefs["load_balancing"] == 0.0
    out = layer(_x().reshape(4, 16, 32))  # 4 sequences of 16 tokens
    value = out.losses[name]
    assert value > 0
    torch.testing.assert_close(out.aux_loss, 0.25 * value + 0.001 * out.losses["z_loss"])
    layer.zero_grad()
    (out.aux_loss - 0.001 * out.losses["z_loss"]).backward()  # the new loss alone trains the router
    assert layer.router.weight.grad.abs().sum() > 0
    off = _layer(f"model.moe.router={{kind: {router}}}", "model.moe.losses={z_loss: {coef: 0.001}}").train()
    torch.manual_seed(0)
    out_off = off(_x().reshape(4, 16, 32))
    torch.testing.assert_close(out_off.aux_loss, 0.001 * out_off.losses["z_loss"])


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch", "sequence"])
def test_load_balancing_scope_reaches_the_layer_and_the_loader(scope):
    """losses.load_balancing.scope is the layer's balance_loss_scope; with global_batch and
    train.grad_accum 2 the training loader looks ahead over each step's 2 micro-batches."""
    from moeplat.compile.data import step_group

    lb = f"model.moe.losses.load_balancing={{coef: 0.01, scope: {scope}}}"
    assert _layer(lb).balance_loss_scope == scope
    assert step_group(_spec(lb, "train.grad_accum=2")) == (2 if scope == "global_batch" else 1)
    assert step_group(_spec(lb)) == 1
    x = _x().reshape(4, 16, 32)
    values = {
        s: _layer(f"model.moe.losses.load_balancing={{coef: 0.01, scope: {s}}}")(x)
        for s in ("micro_batch", "sequence")
    }
    assert values["sequence"].losses["load_balancing"] != values["micro_batch"].losses["load_balancing"]


def test_load_balancing_scope_defaults_to_micro_batch_and_rejects_unknown_scopes():
    assert _layer("model.moe.losses.load_balancing={coef: 0.01}").balance_loss_scope == "micro_batch"
    with pytest.raises(SpecError, match="scope"):
        _spec("model.moe.losses.load_balancing={coef: 0.01, scope: global}")


def test_model_aux_loss_sums_the_weighted_losses_of_every_moe_layer():
    model = _model("model.moe.losses={load_balancing: {coef: 0.03}, z_loss: {coef: 0.002}}")
    out = model(_tokens())
    assert len(out.moe) == 2
    expected = sum(0.03 * o.losses["load_balancing"] + 0.002 * o.losses["z_loss"] for o in out.moe.values())
    torch.testing.assert_close(out.aux_loss, expected)


# --- model.moe.dispatch ---------------------------------------------------------------------------


def test_dispatch_kind_picks_the_dispatcher_and_both_compute_the_same(monkeypatch):
    calls = []
    for kind in ("loop", "sorted"):
        real = DISPATCHERS[kind]
        monkeypatch.setitem(DISPATCHERS, kind, lambda *a, _k=kind, _f=real: calls.append(_k) or _f(*a))
    loop, fast = _layer("model.moe.dispatch={kind: loop}"), _layer("model.moe.dispatch={kind: sorted}")
    assert (loop.dispatch, fast.dispatch) == ("loop", "sorted")
    fast.load_state_dict(loop.state_dict())
    x = _x()
    with torch.no_grad():
        y_loop = loop(x).y
        assert calls == ["loop"]
        y_fast = fast(x).y
        assert calls == ["loop", "sorted"]
    torch.testing.assert_close(y_loop, y_fast, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["loop", "sorted"])
def test_experts_dropout_randomises_the_routed_experts_in_training_only(dispatch):
    plain = _layer(f"model.moe.dispatch={{kind: {dispatch}}}")
    dropped = _layer(f"model.moe.dispatch={{kind: {dispatch}}}", "model.moe.experts.dropout=0.4")
    assert plain.experts.dropout == 0.0 and dropped.experts.dropout == 0.4
    dropped.load_state_dict(plain.state_dict())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x).y, plain.eval()(x).y)
        torch.testing.assert_close(plain.train()(x).y, plain(x).y)  # dropout 0: deterministic
        y1, y2 = dropped.train()(x).y, dropped(x).y
    assert not torch.allclose(y1, y2, atol=1e-4)


def test_granularity_segments_each_expert_into_m_narrower_experts_and_routes_to_m_times_top_k():
    spec = _spec("model.moe.granularity=4", "model.moe.experts.d_ff=24", "model.moe.num_experts=4")
    coarse = _layer("model.moe.experts.d_ff=24", "model.moe.num_experts=4")
    fine = build_moe_layer(spec.model.moe, spec.model.d_model, spec.model.vocab_size)
    assert (fine.num_experts, fine.top_k) == (16, 4 * coarse.top_k)
    assert fine.experts.w_up.shape == (16, 32, 6) and fine.router.num_experts == 16
    assert _n_params(fine.experts) == _n_params(coarse.experts)
    with torch.no_grad():
        out = fine(_x())
    assert out.stats.load_E.shape == (16,)
    assert (out.stats.tokens_per_expert_E > 0).sum() > 4  # tokens reach more than num_experts experts


def test_granularity_must_divide_the_expert_d_ff():
    with pytest.raises(SpecError, match="divisible by granularity"):
        _spec("model.moe.granularity=5", "model.moe.experts.d_ff=24")


# --- model.moe.shared_experts ---------------------------------------------------------------------


def test_shared_experts_count_and_d_ff_add_a_fused_ffn_seen_by_every_token():
    plain = _layer("model.moe.shared_experts.count=0")
    shared = _layer("model.moe.shared_experts={count: 2, d_ff: 16}")
    assert plain.shared is None
    assert isinstance(shared.shared, DenseFFN) and shared.shared.w_gate.out_features == 2 * 16
    assert _n_params(shared) - _n_params(plain) == 3 * 32 * (2 * 16)
    missing, unexpected = shared.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("shared.") for k in missing) and not unexpected
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(shared(x).y - plain(x).y, shared.shared(x), rtol=1e-4, atol=1e-6)


def test_shared_experts_gate_scales_the_shared_output_by_a_sigmoid_of_x():
    plain = _layer("model.moe.shared_experts={count: 2, d_ff: 16}")
    gated = _layer("model.moe.shared_experts={count: 2, d_ff: 16, gate: true}")
    assert plain.shared_gate is None
    assert gated.shared_gate.weight.shape == (1, 32) and gated.shared_gate.bias is None
    assert _n_params(gated) - _n_params(plain) == 32
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["shared_gate.weight"] and not unexpected
    x = _x()
    with torch.no_grad():
        gate_T1 = torch.sigmoid(x @ gated.shared_gate.weight.T)
        expected = plain(x).y + (gate_T1 - 1) * plain.shared(x)
        torch.testing.assert_close(gated(x).y, expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(gated(x).y, plain(x).y, atol=1e-4)


def test_shared_experts_gate_without_shared_experts_is_an_error():
    with pytest.raises(SpecError, match="gate"):
        _spec("model.moe.shared_experts={count: 0, gate: true}")


def test_shared_experts_d_ff_defaults_to_the_routed_experts_d_ff():
    three = _layer("model.moe.shared_experts={count: 3}", "model.moe.experts.d_ff=24")
    assert three.shared.w_gate.out_features == 3 * 24
    wide = _layer("model.moe.shared_experts={count: 3, d_ff: 8}", "model.moe.experts.d_ff=24")
    assert wide.shared.w_gate.out_features == 3 * 8


# --- model.moe.layers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "moe_blocks"),
    [
        ("{kind: all}", [0, 1, 2, 3]),
        ("{kind: every}", [1, 3]),  # defaults n=2, offset=1
        ("{kind: every, n: 3, offset: 0}", [0, 3]),
        ("{kind: every, n: 2, offset: 2}", [2]),
        ("{kind: first_dense}", [1, 2, 3]),  # default k=1
        ("{kind: first_dense, k: 3}", [3]),
        ("{kind: list, layers: [2, 0]}", [0, 2]),
    ],
)
def test_layer_selection_decides_which_blocks_hold_an_moe_layer(layers, moe_blocks):
    dense_ffn = DENSE_FFN if len(moe_blocks) < 4 else "model.dense_ffn=null"  # unused dense_ffn is an error
    model = _model("model.n_layers=4", dense_ffn, f"model.moe.layers={layers}")
    assert len(model.blocks) == 4
    got = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]
    assert got == moe_blocks
    for i, block in enumerate(model.blocks):
        if i not in moe_blocks:
            assert type(block.ffn) is DenseFFN and block.ffn.w_gate.out_features == 48
    assert sorted(model(_tokens()).moe) == moe_blocks


# --- model.moe.num_experts / top_k / experts ------------------------------------------------------


@pytest.mark.parametrize(("num_experts", "top_k", "d_ff"), [(4, 2, 32), (6, 1, 20), (3, 3, 8)])
def test_num_experts_top_k_and_expert_d_ff_set_the_shapes(num_experts, top_k, d_ff):
    layer = _layer(
        f"model.moe.num_experts={num_experts}", f"model.moe.top_k={top_k}", f"model.moe.experts.d_ff={d_ff}"
    )
    assert layer.router.weight.shape == (num_experts, 32)
    assert layer.experts.w_gate.shape == (num_experts, 32, d_ff)
    assert layer.experts.w_up.shape == (num_experts, 32, d_ff)
    assert layer.experts.w_down.shape == (num_experts, d_ff, 32)
    with torch.no_grad():
        route = layer.router(_x())
        out = layer(_x())
    assert route.topk_idx_TK.shape == (64, top_k) and route.probs_TE.shape == (64, num_experts)
    assert out.load_E.shape == (num_experts,)
    assert int(out.tokens_per_expert_E.sum()) == 64 * top_k


# --- model: sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "gated"), [("swiglu", True), ("geglu", True), ("gelu", False), ("relu", False)]
)
def test_experts_kind_sets_the_activation_of_routed_and_shared_experts(kind, gated):
    layer = _layer(f"model.moe.experts={{kind: {kind}, d_ff: 24}}", "model.moe.shared_experts.count=1")
    assert layer.experts.activation == kind and layer.shared.activation == kind
    assert (layer.experts.w_gate is not None) == gated and (layer.shared.w_gate is not None) == gated
    assert _n_params(layer.experts) == (3 if gated else 2) * 4 * 32 * 24
    # Same up/down weights, other activation: the output changes with the kind.
    relu = _layer("model.moe.experts={kind: relu, d_ff: 24}", "model.moe.shared_experts.count=1")
    relu.load_state_dict(layer.state_dict(), strict=False)
    x = _x()
    with torch.no_grad():
        assert (kind == "relu") == torch.allclose(layer(x).y, relu(x).y)


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu", "relu"])
def test_dense_ffn_kind_sets_the_activation_of_the_dense_blocks(kind):
    model = _model("model.moe=null", f"model.dense_ffn={{kind: {kind}, d_ff: 40}}")
    gated = kind in ("swiglu", "geglu")
    assert all(b.ffn.activation == kind and (b.ffn.w_gate is not None) == gated for b in model.blocks)
    idx = _tokens()
    relu = _model("model.moe=null", "model.dense_ffn={kind: relu, d_ff: 40}")
    mine = _logits_with_weights_of(relu, model, idx) if not gated else model(idx).logits_BSV.detach()
    with torch.no_grad():
        assert (kind == "relu") == torch.allclose(mine, relu(idx).logits_BSV)


def test_d_model_sets_the_width_everywhere():
    model = _model("model.d_model=48", "model.n_heads=2", "model.n_kv_heads=2")
    assert model.tok_emb.weight.shape == (256, 48)
    assert model.norm.weight.shape == (48,)
    assert model.blocks[0].attn.wq.weight.shape == (48, 48)
    assert model.blocks[0].ffn.router.weight.shape == (4, 48)
    assert model.blocks[0].ffn.experts.w_gate.shape == (4, 48, 32)


def test_vocab_size_sets_the_embedding_and_logits():
    model = _model("model.vocab_size=300")
    assert model.tok_emb.weight.shape == (300, 32)
    assert model(_tokens()).logits_BSV.shape == (2, 16, 300)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_n_layers_sets_the_number_of_blocks(n_layers):
    model = _model(f"model.n_layers={n_layers}")
    assert len(model.blocks) == n_layers
    assert sorted(model(_tokens()).moe) == list(range(n_layers))


def test_n_heads_sets_head_dim_and_changes_the_output():
    two = _model("model.n_heads=2", "model.n_kv_heads=null")
    four = _model("model.n_heads=4", "model.n_kv_heads=null")
    a2, a4 = two.blocks[0].attn, four.blocks[0].attn
    assert (a2.n_heads, a2.head_dim, a4.n_heads, a4.head_dim) == (2, 16, 4, 8)
    assert a2.rope_cos.shape[1] == 16 and a4.rope_cos.shape[1] == 8
    idx = _tokens()
    with torch.no_grad():
        base = two(idx).logits_BSV
    # The parameters have the same shapes; only the split into heads differs.
    assert not torch.allclose(base, _logits_with_weights_of(two, four, idx), atol=1e-5)


@pytest.mark.parametrize(("n_kv_heads", "kv"), [("1", 1), ("2", 2), ("null", 4)])
def test_n_kv_heads_sets_the_key_and_value_projections(n_kv_heads, kv):
    model = _model("model.n_heads=4", f"model.n_kv_heads={n_kv_heads}")
    attn = model.blocks[0].attn
    assert attn.n_kv_heads == kv
    assert attn.wq.weight.shape == (4 * 8, 32)
    assert attn.wk.weight.shape == (kv * 8, 32) and attn.wv.weight.shape == (kv * 8, 32)
    assert model(_tokens()).logits_BSV.shape == (2, 16, 256)


def test_max_seq_len_sets_the_rope_tables_and_the_longest_input():
    model = _model("model.max_seq_len=20", "data.seq_len=16")
    for block in model.blocks:
        assert block.attn.rope_cos.shape == (20, 16) and block.attn.rope_sin.shape == (20, 16)
    assert model(_tokens(seq=20)).logits_BSV.shape == (2, 20, 256)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(seq=21))


def test_rope_theta_changes_the_rotation_and_the_output():
    base = _model("model.rope_theta=10000")
    other = _model("model.rope_theta=50")
    assert not torch.allclose(base.blocks[0].attn.rope_cos, other.blocks[0].attn.rope_cos)
    # Position 1, lowest frequency pair: angle 1 * theta^(-2*7/16) for head_dim 16.
    hd = 16
    for model, theta in ((base, 10000.0), (other, 50.0)):
        expected = math.cos(theta ** (-2 * (hd // 2 - 1) / hd))
        assert model.blocks[0].attn.rope_cos[1, hd // 2 - 1].item() == pytest.approx(expected, rel=1e-6)
    idx = _tokens()
    with torch.no_grad():
        ref = base(idx).logits_BSV
    assert not torch.allclose(ref, _logits_with_weights_of(base, other, idx), atol=1e-5)


def test_norm_eps_is_the_eps_of_every_rmsnorm_and_changes_the_output():
    small, big = _model("model.norm_eps=1e-6"), _model("model.norm_eps=10.0")
    for model, eps in ((small, 1e-6), (big, 10.0)):
        norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
        assert len(norms) == 2 * 2 + 1  # two per block and the final one
        assert all(m.eps == eps for m in norms)
    idx = _tokens()
    with torch.no_grad():
        ref = small(idx).logits_BSV
    assert not torch.allclose(ref, _logits_with_weights_of(small, big, idx), atol=1e-4)


def test_dropout_randomises_train_mode_only():
    idx = _tokens()
    model = _model("model.dropout=0.3")
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    assert all(b.attn.dropout == 0.3 for b in model.blocks)
    with torch.no_grad():
        model.train()
        a, b = model(idx).logits_BSV, model(idx).logits_BSV
        assert not torch.allclose(a, b)
        model.eval()
        torch.testing.assert_close(model(idx).logits_BSV, model(idx).logits_BSV, rtol=0, atol=0)

    no_drop = _model("model.dropout=0.0").train()
    with torch.no_grad():
        torch.testing.assert_close(no_drop(idx).logits_BSV, no_drop(idx).logits_BSV, rtol=0, atol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_tie_embeddings_shares_the_head_with_the_embedding(tie):
    model = _model(f"model.tie_embeddings={str(tie).lower()}")
    untied_extra = 0 if tie else 256 * 32
    assert (model.lm_head.weight is model.tok_emb.weight) is tie
    assert _n_params(model) == _n_params(_model("model.tie_embeddings=true")) + untied_extra
    if not tie:
        assert not torch.equal(model.lm_head.weight, model.tok_emb.weight)


@pytest.mark.parametrize("init_std", [0.01, 0.1])
def test_init_std_is_the_std_of_the_weights(init_std):
    # quickstart sizes (d_model 128, 8 experts) so each empirical std rests on >10k draws.
    model = _model(f"model.init_std={init_std}", "model.tie_embeddings=false", path=QUICKSTART)
    resid = init_std / math.sqrt(2 * 4)

    def std(tensors):
        return torch.cat([t.detach().flatten() for t in tensors]).std().item()

    blocks = model.blocks
    assert std([model.tok_emb.weight]) == pytest.approx(init_std, rel=0.05)
    assert std([model.lm_head.weight]) == pytest.approx(init_std, rel=0.05)
    assert std([b.attn.wq.weight for b in blocks]) == pytest.approx(init_std, rel=0.05)
    assert std([b.ffn.router.weight for b in blocks]) == pytest.approx(init_std, rel=0.1)
    assert std([b.ffn.experts.w_gate for b in blocks]) == pytest.approx(init_std, rel=0.05)
    assert std([b.attn.wo.weight for b in blocks]) == pytest.approx(resid, rel=0.05)
    assert std([b.ffn.experts.w_down for b in blocks]) == pytest.approx(resid, rel=0.05)


def test_dense_ffn_d_ff_sizes_every_block_of_a_dense_model():
    narrow = _model("model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 40}")
    wide = _model("model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 72}")
    for model, d_ff in ((narrow, 40), (wide, 72)):
        assert all(type(b.ffn) is DenseFFN and b.ffn.w_gate.out_features == d_ff for b in model.blocks)
        assert model(_tokens()).moe == {}
    assert _n_params(wide) - _n_params(narrow) == 2 * 3 * 32 * (72 - 40)


def test_moe_null_builds_a_dense_model_from_the_dense_spec():
    model = _model(path=REPO / "specs" / "quickstart-dense.yaml")
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert all(b.ffn.w_gate.out_features == 512 for b in model.blocks)
    out = model(_tokens())
    assert float(out.aux_loss) == 0.0
