"""The capacity-buffer dispatcher must equal the loop reference with the same keep mask, forward
and backward, in float64; the MoE layer built with it must equal the loop-built layer."""

import pytest
import torch
from dispatch_helpers import run_dispatch

from moeplat.nn import MoELayer, SwiGLUExperts, capacity_keep_mask, dispatch_capacity, dispatch_loop
from moeplat.nn.capacity import expert_capacity
from moeplat.nn.experts import MLPExperts

TOL = dict(rtol=1e-12, atol=1e-12)


def _routing(T, E, K, seed, unused=1):
    g = torch.Generator().manual_seed(seed)
    scores_TE = torch.rand(T, E, generator=g)
    scores_TE[:, E - unused :] = -1.0  # these experts receive zero tokens
    return scores_TE.argsort(dim=-1, descending=True)[:, :K], torch.rand(
        T, K, generator=g, dtype=torch.float64
    )


def _assert_same(a, b):
    for got, ref in zip(a[:3], b[:3], strict=True):
        torch.testing.assert_close(got, ref, **TOL)
    for name in b[3]:
        torch.testing.assert_close(a[3][name], b[3][name], **TOL, msg=name)


@pytest.mark.parametrize("E", [4, 8])
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_capacity_equals_loop_with_drops_float64(E, K, policy, activation):
    torch.manual_seed(E + K)
    T, D, F = 24, 8, 12
    experts = MLPExperts(E, D, F, activation).double()
    x_TD = torch.randn(T, D, dtype=torch.float64)
    idx, w = _routing(T, E, K, seed=E * K)
    C = expert_capacity(T, E, K, 0.75)
    keep = capacity_keep_mask(idx, E, C, policy=policy, topk_weight_TK=w)
    assert (~keep).any(), "the test must really drop slots"
    ref = run_dispatch(dispatch_loop, experts, x_TD, idx, w, keep)
    got = run_dispatch(lambda *a: dispatch_capacity(*a, capacity=C), experts, x_TD, idx, w, keep)
    _assert_same(got, ref)
    assert (got[2][~keep] == 0).all()  # a dropped slot's weight gets no gradient
    assert (got[0][~keep.any(dim=1)] == 0).all()  # all slots dropped: zero output
    assert got[3]["w_up"][E - 1].abs().max() == 0  # the unused expert gets no gradient


def test_capacity_without_size_fits_the_fullest_expert_dropless():
    torch.manual_seed(0)
    E, K, T = 5, 2, 30
    experts = SwiGLUExperts(E, 8, 12).double()
    x_TD = torch.randn(T, 8, dtype=torch.float64)
    idx, w = _routing(T, E, K, seed=3, unused=0)
    keep = torch.ones(T, K, dtype=torch.bool)
    _assert_same(
        run_dispatch(dispatch_capacity, experts, x_TD, idx, w, keep),
        run_dispatch(dispatch_loop, experts, x_TD, idx, w, keep),
    )


def test_a_keep_mask_over_capacity_is_an_error_not_a_silent_drop():
    experts = SwiGLUExperts(4, 8, 8)
    idx = torch.zeros(6, 1, dtype=torch.long)  # every token to expert 0
    keep = torch.ones(6, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="capacity=2"):
        dispatch_capacity(experts, torch.randn(6, 8), idx, torch.ones(6, 1), keep, capacity=2)


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("shared", [{}, {"n_shared_experts": 2, "shared_d_ff": 4, "shared_gate": True}])
def test_capacity_layer_equals_loop_layer(policy, shared):
    torch.manual_seed(0)
    kw = dict(capacity_factor_train=0.5, capacity_factor_eval=0.75, drop_policy=policy, balance_coef=0.01)
    loop = MoELayer(8, 6, 2, 12, dispatch="loop", **kw, **shared).double()
    cap = MoELayer(8, 6, 2, 12, dispatch="capacity", **kw, **shared).double()
    cap.load_state_dict(loop.state_dict())
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    for train in (True, False):
        loop.train(train), cap.train(train)
        grads = []
        for layer in (loop, cap):
            layer.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_(True)
            out = layer(xg)
            (out.y.square().sum() + out.aux_loss).backward()
            grads.append((out, xg.grad, {n: p.grad for n, p in layer.named_parameters()}))
        (ref, gx_ref, gp_ref), (out, gx, gp) = grads
        assert out.dropped_frac.item() > 0  # drops are counted and reported
        torch.testing.assert_close(out.dropped_frac, ref.dropped_frac)
        torch.testing.assert_close(out.y, ref.y, **TOL)
        torch.testing.assert_close(gx, gx_ref, **TOL)
        for name, g in gp_ref.items():
            torch.testing.assert_close(gp[name], g, **TOL, msg=name)


def test_capacity_dispatch_needs_a_capacity_factor():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoELayer(8, 4, 2, 8, dispatch="capacity")
