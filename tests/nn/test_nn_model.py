"""TransformerLM: shapes, causality, parameter counts, init, and that it can learn."""

import math

import pytest
import torch

from moeplat.nn import DenseFFN, LMOutput, MoELayer, TransformerLM

V, D, H, KV, S = 64, 32, 4, 2, 16


def _model(tie=True, moe_kw=None, n_layers=2, **kw):
    torch.manual_seed(0)
    ffns = [
        DenseFFN(D, 48) if i % 2 == 0 else MoELayer(D, 4, 2, 24, n_shared_experts=1, **(moe_kw or {}))
        for i in range(n_layers)
    ]
    return TransformerLM(V, D, H, KV, S, ffns, tie_embeddings=tie, **kw)


def test_output_shapes_and_moe_outputs():
    model = _model(moe_kw=dict(balance_coef=0.01))
    idx = torch.randint(0, V, (3, S))
    out = model(idx, targets_BS=idx)
    assert isinstance(out, LMOutput)
    assert out.logits_BSV.shape == (3, S, V)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert list(out.moe) == [1] and out.moe[1].y.shape == (3, S, D)
    torch.testing.assert_close(out.aux_loss, out.moe[1].aux_loss)
    assert model(idx).loss is None


def test_aux_loss_is_zero_tensor_without_moe_layers():
    model = TransformerLM(V, D, H, KV, S, [DenseFFN(D, 48)])
    out = model(torch.randint(0, V, (1, 4)))
    assert out.moe == {} and out.aux_loss.item() == 0.0 and out.aux_loss.dtype == torch.float32


def test_causality():
    """Changing token t leaves logits at positions < t unchanged (dropless MoE is per-token)."""
    model = _model().eval()
    idx = torch.randint(0, V, (2, S))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    a, b = model(idx).logits_BSV, model(changed).logits_BSV
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


def _expected_params(tie, L=2):
    hd = D // H
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D
    dense = 3 * D * 48
    moe = 4 * D + 3 * 4 * D * 24 + 3 * D * 24  # router + routed experts + one shared expert
    ffns = sum(dense if i % 2 == 0 else moe for i in range(L))
    return V * D + L * (2 * D + attn) + ffns + D + (0 if tie else V * D)


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_exact(tie):
    model = _model(tie=tie)
    assert sum(p.numel() for p in model.parameters()) == _expected_params(tie)
    assert model.num_params() == _expected_params(tie)
    assert model.num_params(exclude_embedding=True) == _expected_params(tie) - V * D
    assert (model.lm_head.weight is model.tok_emb.weight) == tie


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = _model(moe_kw=dict(balance_coef=0.01, z_loss_coef=0.001))
    idx = torch.randint(0, V, (4, S))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        out = model(idx[:, :-1], targets_BS=idx[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out.loss.item()
    assert first == pytest.approx(math.log(V), rel=0.1)  # small init -> near-uniform predictions
    assert out.loss.item() < 0.1 * first


def test_gqa_model_runs_and_trains_kv_weights():
    model = TransformerLM(V, D, 4, 1, S, [DenseFFN(D, 32)])
    assert model.blocks[0].attn.wk.weight.shape == (D // 4, D)
    out = model(torch.randint(0, V, (2, S)), targets_BS=torch.randint(0, V, (2, S)))
    out.loss.backward()
    assert model.blocks[0].attn.wk.weight.grad.abs().sum() > 0


def test_init_std_of_experts_and_residual_projections():
    torch.manual_seed(0)
    L, std = 4, 0.05
    ffns = [MoELayer(64, 8, 2, 128) for _ in range(L)]
    model = TransformerLM(V, 64, 4, 4, S, ffns, init_std=std)
    resid = std / math.sqrt(2 * L)
    experts = model.blocks[0].ffn.experts
    assert experts.w_gate.std().item() == pytest.approx(std, rel=0.05)
    assert experts.w_up.std().item() == pytest.approx(std, rel=0.05)
    assert experts.w_down.std().item() == pytest.approx(resid, rel=0.05)
    assert abs(experts.w_gate.mean().item()) < 0.05 * std
    for e in range(8):  # every expert individually has the documented scale ...
        assert experts.w_gate[e].std().item() == pytest.approx(std, rel=0.1)
    # ... and is its own draw: two experts' weights are uncorrelated.
    corr = torch.corrcoef(torch.stack([experts.w_gate[0].flatten(), experts.w_gate[1].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.05
    assert model.blocks[1].attn.wo.weight.std().item() == pytest.approx(resid, rel=0.1)
    assert model.blocks[1].attn.wq.weight.std().item() == pytest.approx(std, rel=0.1)
    assert model.blocks[2].ffn.router.weight.std().item() == pytest.approx(std, rel=0.1)
    assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(64))


def test_dense_ffn_init_and_tied_head():
    torch.manual_seed(0)
    L, std = 3, 0.02
    model = TransformerLM(V, 64, 4, 4, S, [DenseFFN(64, 256) for _ in range(L)], init_std=std)
    ffn = model.blocks[0].ffn
    assert ffn.w_down.weight.std().item() == pytest.approx(std / math.sqrt(2 * L), rel=0.05)
    assert ffn.w_gate.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.05)


def test_token_ids_reach_a_hash_routed_moe_layer():
    from moeplat.nn import HashRouter

    torch.manual_seed(0)
    router = HashRouter(4, V, seed=3)
    model = TransformerLM(V, D, H, KV, S, [DenseFFN(D, 48), MoELayer(D, 4, 1, 24, router=router)])
    idx = torch.randint(0, V, (3, S))
    out = model(idx)
    expected = torch.bincount(router.table_V[idx.flatten()], minlength=4).float() / idx.numel()
    torch.testing.assert_close(out.moe[1].load_E, expected)
    # Block still works for callers that pass no token ids, as long as the router needs none.
    x = torch.randn(2, S, D)
    block = model.blocks[0]
    torch.testing.assert_close(block(x)[0], block(x, token_ids_BS=idx[:2])[0])
    with pytest.raises(ValueError, match="token ids"):
        model.blocks[1](x)


def test_after_optimizer_step_reaches_the_routers_of_the_named_layers():
    from moeplat.nn import SigmoidBiasRouter

    ffns = [MoELayer(D, 4, 2, 24, router=SigmoidBiasRouter(D, 4, 2, gamma=0.5)) for _ in range(2)]
    model = TransformerLM(V, D, H, KV, S, ffns)
    model.after_optimizer_step({1: torch.tensor([3.0, 1.0, 0.0, 0.0])})  # mean 1
    assert model.blocks[0].ffn.router.bias_E.tolist() == [0.0] * 4
    assert model.blocks[1].ffn.router.bias_E.tolist() == [-0.5, 0.0, 0.5, 0.5]
    assert "blocks.1.ffn.router.bias_E" in model.state_dict()
