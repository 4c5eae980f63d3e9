"""MoELayer: dispatcher parity, capacity vs dropless, aux loss, statistics, parameter counts."""

import pytest
import torch

from moeplat.nn import MoELayer, MoEOutput, load_balancing_loss, router_z_loss


def _pair(**kw):
    """Two MoE layers with identical weights, one per dispatcher, in float64."""
    torch.manual_seed(0)
    loop = MoELayer(8, 6, 2, 12, dispatch="loop", **kw).double()
    fast = MoELayer(8, 6, 2, 12, dispatch="sorted", **kw).double()
    fast.load_state_dict(loop.state_dict())
    return loop, fast


def _fwd_bwd(layer, x_BSD):
    layer.zero_grad(set_to_none=True)
    x = x_BSD.clone().requires_grad_(True)
    out = layer(x)
    (out.y.square().sum() + out.aux_loss).backward()
    return out, x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_loop_and_sorted_layers_agree_with_shared_experts(capacity_factor):
    loop, fast = _pair(
        n_shared_experts=2,
        shared_d_ff=4,
        capacity_factor_train=capacity_factor,
        balance_coef=0.01,
        z_loss_coef=0.001,
    )
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    out_ref, gx_ref, gp_ref = _fwd_bwd(loop, x)
    out, gx, gp = _fwd_bwd(fast, x)
    assert isinstance(out, MoEOutput) and out.y.shape == x.shape
    assert (out.dropped_frac > 0).item() == (capacity_factor is not None)
    torch.testing.assert_close(out.y, out_ref.y)
    torch.testing.assert_close(gx, gx_ref)
    assert gp["shared.w_down.weight"].abs().sum() > 0
    for name, g in gp_ref.items():
        torch.testing.assert_close(gp[name], g, msg=name)


def test_huge_capacity_factor_equals_dropless():
    torch.manual_seed(1)
    dropless = MoELayer(8, 4, 2, 16).double()
    capped = MoELayer(8, 4, 2, 16, capacity_factor_train=100.0).double()
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    a, b = dropless(x), capped(x)
    assert b.dropped_frac.item() == 0.0
    torch.testing.assert_close(a.y, b.y)


def test_capacity_factor_follows_train_eval_mode_and_statistics_are_consistent():
    torch.manual_seed(2)
    layer = MoELayer(16, 4, 2, 16, capacity_factor_train=0.5, capacity_factor_eval=None)
    x = torch.randn(4, 8, 16)
    T, K = 32, 2
    out = layer.train()(x)
    assert out.dropped_frac.item() > 0
    assert out.tokens_per_expert_E.max().item() <= 8  # C = ceil(0.5 * 32 * 2 / 4)
    assert out.tokens_per_expert_E.sum().item() == round((1 - out.dropped_frac.item()) * T * K)
    # load_E is measured before dropping, so it can only exceed the kept fraction.
    assert (out.load_E * T * K >= out.tokens_per_expert_E).all()
    assert out.load_E.sum().item() == pytest.approx(1.0)
    assert not out.load_E.requires_grad and not out.losses["load_balancing"].requires_grad
    out_eval = layer.eval()(x)
    assert out_eval.dropped_frac.item() == 0.0
    assert out_eval.tokens_per_expert_E.sum().item() == T * K


def test_aux_loss_is_weighted_sum_of_the_logged_losses():
    torch.manual_seed(3)
    layer = MoELayer(16, 4, 2, 16, balance_coef=0.01, z_loss_coef=0.001)
    out = layer(torch.randn(2, 5, 16))
    expected = 0.01 * out.losses["load_balancing"] + 0.001 * out.losses["z_loss"]
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0
    out.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_zero_coefficients_give_zero_aux_but_still_report_losses():
    layer = MoELayer(16, 4, 2, 16)
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert out.aux_loss.item() == 0.0 and out.aux_loss.dtype == torch.float32
    route = layer.router(x.reshape(-1, 16))
    lb = load_balancing_loss(route.probs_TE, route.topk_idx_TK, 4)
    torch.testing.assert_close(out.losses["load_balancing"], lb.detach())
    torch.testing.assert_close(out.losses["z_loss"], router_z_loss(route.logits_TE).detach())


def test_a_step_without_statistics_computes_only_the_switched_on_losses():
    """stats=False (a training step that logs nothing): the aux loss and its gradient are the
    logging step's, and the zero-coefficient losses, telemetry only, are not computed."""
    torch.manual_seed(4)
    layer = MoELayer(16, 4, 2, 16, balance_coef=0.01, z_loss_coef=0.001, sequence_balance_coef=0.1)
    x = torch.randn(2, 5, 16)
    logged, quiet = layer(x), layer(x, stats=False)
    assert set(logged.losses) == {"load_balancing", "importance", "sequence_balance", "variance", "z_loss"}
    assert set(quiet.losses) == {"load_balancing", "sequence_balance", "z_loss"}
    torch.testing.assert_close(quiet.aux_loss, logged.aux_loss)
    grads = []
    for out in (logged, quiet):
        layer.zero_grad()
        out.aux_loss.backward()
        grads.append(layer.router.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    seq = MoELayer(16, 4, 2, 16, balance_coef=0.01, balance_loss_scope="sequence")
    quiet_seq = seq(x, stats=False)  # the per-sequence balance loss needs the sequence term
    assert set(quiet_seq.losses) == {"load_balancing"}
    torch.testing.assert_close(quiet_seq.aux_loss, seq(x).aux_loss)


def test_parameter_counts():
    D, E, F = 16, 4, 24
    layer = MoELayer(D, E, 2, F)
    assert sum(p.numel() for p in layer.parameters()) == E * D + 3 * E * D * F
    shared = MoELayer(D, E, 2, F, n_shared_experts=2, shared_d_ff=8)
    assert sum(p.numel() for p in shared.parameters()) == E * D + 3 * E * D * F + 3 * D * 2 * 8
    default_width = MoELayer(D, E, 2, F, n_shared_experts=1)
    assert default_width.shared.w_up.out_features == F


def test_invalid_arguments():
    with pytest.raises(ValueError, match="dispatch"):
        MoELayer(8, 4, 2, 8, dispatch="nope")
    with pytest.raises(ValueError, match="capacity"):
        MoELayer(8, 4, 2, 8, capacity_factor_train=0.0)
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 4, 5, 8)
