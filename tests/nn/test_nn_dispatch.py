"""The sorted (fast) dispatcher must equal the loop reference, forward and backward."""

import pytest
import torch
from dispatch_helpers import run_dispatch

import moeplat.nn.dispatch as dispatch_mod
from moeplat.nn import DISPATCHERS, SwiGLUExperts, capacity_keep_mask, dispatch_loop, dispatch_sorted
from moeplat.nn.dispatch import _GROUPED_MM_OK, _grouped_mm_works


def _routing(T, E, K, seed, unused=1):
    """Random distinct top-k choices that never pick the last `unused` experts, random weights."""
    g = torch.Generator().manual_seed(seed)
    scores_TE = torch.rand(T, E, generator=g)
    scores_TE[:, E - unused :] = -1.0  # these experts receive zero tokens
    topk_idx_TK = scores_TE.argsort(dim=-1, descending=True)[:, :K]
    topk_weight_TK = torch.rand(T, K, generator=g, dtype=torch.float64)
    return topk_idx_TK, topk_weight_TK


@pytest.mark.parametrize("E", [4, 5, 8])
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize(("capacity", "policy"), [(None, None), (2, "position"), (2, "probability")])
@pytest.mark.parametrize("F", [12, 6])  # the combine weight scales the output (F > D) or the hidden
def test_sorted_equals_loop_float64(E, K, capacity, policy, F):
    torch.manual_seed(E * 10 + K)
    T, D = 24, 8
    experts = SwiGLUExperts(E, D, F).double()
    x_TD = torch.randn(T, D, dtype=torch.float64)
    idx, w = _routing(T, E, K, seed=E + K)
    if capacity is None:
        keep = torch.ones(T, K, dtype=torch.bool)
    else:
        keep = capacity_keep_mask(idx, E, capacity, policy=policy, topk_weight_TK=w)
        assert (~keep).any(), "the test must really drop slots"
    assert not (idx == E - 1).any()

    y_ref, gx_ref, gw_ref, gp_ref = run_dispatch(dispatch_loop, experts, x_TD, idx, w, keep)
    y, gx, gw, gp = run_dispatch(dispatch_sorted, experts, x_TD, idx, w, keep)

    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-12, atol=1e-12)
        assert gp[name][E - 1].abs().max() == 0  # the unused expert gets no gradient
    # Dropped slots carry no gradient to their combine weight; a token with every slot dropped
    # gets exactly zero output (it passes through the residual only).
    assert (gw[~keep] == 0).all()
    assert (y[~keep.any(dim=1)] == 0).all()


@pytest.mark.parametrize("path", ["grouped_mm", "split"])
@pytest.mark.parametrize("F", [32, 8])  # the combine weight on the output (F > D) or on the hidden
def test_sorted_equals_loop_float32_both_paths(path, F, monkeypatch):
    """float32 is where torch._grouped_mm may be taken; both segment paths must agree with the loop."""
    if path == "split":
        monkeypatch.setattr(dispatch_mod, "_grouped_mm_works", lambda *a: False)
    elif not _grouped_mm_works(SwiGLUExperts(6, 16, 32), torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm is unavailable for float32 on this device/torch")
    torch.manual_seed(0)
    E, K, T, D = 6, 2, 40, 16
    experts = SwiGLUExperts(E, D, F)
    x_TD = torch.randn(T, D)
    idx, w = _routing(T, E, K, seed=1, unused=2)
    w = w.float()
    keep = capacity_keep_mask(idx, E, capacity=10)
    assert (~keep).any()
    y_ref, gx_ref, gw_ref, gp_ref = run_dispatch(dispatch_loop, experts, x_TD, idx, w, keep)
    y, gx, gw, gp = run_dispatch(dispatch_sorted, experts, x_TD, idx, w, keep)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], **tol)


def test_grouped_mm_probe_rejects_float64_and_is_cached():
    experts = SwiGLUExperts(2, 8, 8).double()
    assert _grouped_mm_works(experts, torch.device("cpu"), torch.float64) is False
    assert _GROUPED_MM_OK[("cpu", torch.float64, 8, 8)] is False


def test_first_grouped_mm_probe_inside_a_checkpointed_block(monkeypatch):
    """The probe runs on the first forward of a process; inside torch.utils.checkpoint its own saved
    tensors must not count, or the recomputation saves fewer (CheckpointError in backward)."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(dispatch_mod, "_GROUPED_MM_OK", {})  # as in a fresh process
    torch.manual_seed(0)
    experts = SwiGLUExperts(4, 16, 16)
    x_TD = torch.randn(8, 16, requires_grad=True)
    idx, w = _routing(8, 4, 2, seed=1)
    keep = torch.ones(8, 2, dtype=torch.bool)
    y = checkpoint(dispatch_sorted, experts, x_TD, idx, w.float(), keep, use_reentrant=False)
    y.sum().backward()
    assert dispatch_mod._GROUPED_MM_OK and x_TD.grad is not None


def test_sorted_equals_loop_under_bf16_autocast():
    """Mixed precision: float32 weights and inputs, matmuls in bfloat16 on both paths."""
    torch.manual_seed(4)
    E, K, T, D, F = 4, 2, 32, 16, 32
    experts = SwiGLUExperts(E, D, F)
    x_TD = torch.randn(T, D)
    idx, w = _routing(T, E, K, seed=5, unused=1)
    keep = torch.ones(T, K, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, gx_ref, _, gp_ref = run_dispatch(dispatch_loop, experts, x_TD, idx, w.float(), keep)
        y, gx, _, gp = run_dispatch(dispatch_sorted, experts, x_TD, idx, w.float(), keep)
    assert y.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], **tol)


def test_output_dtype_follows_input():
    experts = SwiGLUExperts(4, 16, 16).to(torch.bfloat16)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    idx, w = _routing(10, 4, 2, seed=3, unused=0)
    keep = torch.ones(10, 2, dtype=torch.bool)
    for fn in DISPATCHERS.values():
        assert fn(experts, x, idx, w.float(), keep).dtype == torch.bfloat16


def test_dispatch_matches_hand_written_mixture():
    """Against the defining formula, independent of either implementation's indexing."""
    torch.manual_seed(1)
    E, T, D, F, K = 3, 5, 4, 6, 2
    experts = SwiGLUExperts(E, D, F).double()
    x = torch.randn(T, D, dtype=torch.float64)
    idx, w = _routing(T, E, K, seed=2, unused=0)
    keep = torch.tensor([[True, False], [True, True], [False, True], [True, True], [False, False]])
    expected = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            if keep[t, k]:
                expected[t] += w[t, k] * experts(x[t : t + 1], int(idx[t, k]))[0]
    for fn in DISPATCHERS.values():
        torch.testing.assert_close(fn(experts, x, idx, w, keep).detach(), expected, rtol=1e-12, atol=1e-12)


def _dropout_case(dropout):
    torch.manual_seed(0)
    E, K, T, D, F = 4, 2, 32, 8, 16
    experts = SwiGLUExperts(E, D, F)
    experts.dropout = dropout
    idx, w = _routing(T, E, K, seed=3, unused=0)
    return experts, torch.randn(T, D), idx, w.float(), torch.ones(T, K, dtype=torch.bool)


def test_expert_dropout_is_drawn_identically_by_loop_and_split_sorted(monkeypatch):
    """Same seed, same masks: both take the hidden activation from experts.hidden, one expert at
    a time, rows in token order (the grouped-GEMM path draws one mask for all rows instead)."""
    monkeypatch.setattr(dispatch_mod, "_grouped_mm_works", lambda *a: False)
    experts, x, idx, w, keep = _dropout_case(0.5)
    experts.train()
    torch.manual_seed(7)
    y_loop = dispatch_loop(experts, x, idx, w, keep)
    torch.manual_seed(7)
    y_sorted = dispatch_sorted(experts, x, idx, w, keep)
    torch.testing.assert_close(y_sorted, y_loop, rtol=1e-5, atol=1e-6)
    experts.dropout = 0.0
    assert not torch.allclose(dispatch_loop(experts, x, idx, w, keep), y_loop, atol=1e-4)


@pytest.mark.parametrize("path", ["grouped_mm", "split"])
@pytest.mark.parametrize("fn", [dispatch_loop, dispatch_sorted])
def test_expert_dropout_randomises_training_only(fn, path, monkeypatch):
    if path == "split":
        monkeypatch.setattr(dispatch_mod, "_grouped_mm_works", lambda *a: False)
    experts, x, idx, w, keep = _dropout_case(0.3)
    with torch.no_grad():
        experts.eval()
        y_eval = fn(experts, x, idx, w, keep)
        torch.testing.assert_close(fn(experts, x, idx, w, keep), y_eval)
        experts.dropout = 0.0
        torch.testing.assert_close(fn(experts, x, idx, w, keep), y_eval)  # eval: dropout is off
        experts.dropout = 0.3
        experts.train()
        y1, y2 = fn(experts, x, idx, w, keep), fn(experts, x, idx, w, keep)
    assert not torch.allclose(y1, y2, atol=1e-4)
    assert not torch.allclose(y1, y_eval, atol=1e-4)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize(("T", "K"), [(1, 1), (1, 2), (3, 2), (2, 4)])
def test_few_slot_dispatch_equals_loop(activation, T, K):
    """Decoding's path: one expert call per kept slot; unkept slots are skipped whatever index
    they hold; equal to the loop reference in float64."""
    from moeplat.nn import MLPExperts
    from moeplat.nn.dispatch import dispatch_few

    torch.manual_seed(T * 10 + K)
    E, D, F = 8, 6, 10
    experts = MLPExperts(E, D, F, activation).double()
    x_TD = torch.randn(T, D, dtype=torch.float64)
    idx, w = _routing(T, E, K, seed=T + K)
    keep = torch.rand(T, K) < 0.7
    keep[0, 0] = True
    ref = dispatch_loop(experts, x_TD, idx, w, keep)
    junk = torch.where(keep, idx, torch.tensor(-1))  # e.g. top-p's unused slots
    torch.testing.assert_close(dispatch_few(experts, x_TD, junk, w, keep), ref, rtol=1e-12, atol=1e-12)


def test_the_layer_takes_the_few_slot_path_only_outside_autograd_with_few_slots(monkeypatch):
    from moeplat.nn import MoELayer, TopKRouter
    from moeplat.nn import dispatch as dispatch_module

    torch.manual_seed(0)
    layer = MoELayer(8, 8, 2, 12, router=TopKRouter(8, 8, 2), dispatch="sorted").double().eval()
    calls = []
    real = dispatch_module.dispatch_few
    monkeypatch.setattr("moeplat.nn.moe.dispatch_few", lambda *a, **k: calls.append(1) or real(*a, **k))
    x_TD = torch.randn(3, 8, dtype=torch.float64)
    with_grad = layer(x_TD).y  # 6 slots <= 8 experts, but autograd is on: the sorted path
    assert calls == []
    with torch.no_grad():
        fast = layer(x_TD).y
        assert calls == [1]
        layer(torch.randn(5, 8, dtype=torch.float64))  # 10 slots > 8 experts: sorted again
        assert calls == [1]
    torch.testing.assert_close(fast, with_grad.detach(), rtol=1e-12, atol=1e-12)


def test_telemetry_off_computes_the_same_output_and_nothing_else():
    from moeplat.nn import MoELayer, TopKRouter

    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, 12, router=TopKRouter(8, 4, 2), balance_coef=0.01, z_loss_coef=1e-3).eval()
    x = torch.randn(2, 5, 8)
    full, bare = layer(x), layer(x, telemetry=False)
    torch.testing.assert_close(bare.y, full.y, rtol=0, atol=0)
    assert full.aux_loss > 0 and full.stats is not None and full.losses
    assert bare.aux_loss.item() == 0.0 and bare.stats is None and bare.losses == {}
