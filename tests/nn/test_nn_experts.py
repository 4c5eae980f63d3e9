"""Expert MLP activations (Shazeer 2020, "GLU Variants"): hand-written formulas, weights, dispatch parity."""

import pytest
import torch
from dispatch_helpers import run_dispatch

import moeplat.nn.dispatch as dispatch_mod
from moeplat.nn import DenseFFN, MLPExperts, capacity_keep_mask, dispatch_loop, dispatch_sorted
from moeplat.nn.dispatch import _grouped_mm_works

KINDS = ["swiglu", "geglu", "gelu", "relu"]


def _by_hand(kind, x, w_gate, w_up, w_down):
    """The defining equations, written out independently of moeplat.nn.experts."""
    if kind == "swiglu":
        h = (x @ w_gate) * torch.sigmoid(x @ w_gate) * (x @ w_up)
    elif kind == "geglu":
        g = x @ w_gate
        h = 0.5 * g * (1 + torch.erf(g / 2**0.5)) * (x @ w_up)
    elif kind == "gelu":
        u = x @ w_up
        h = 0.5 * u * (1 + torch.erf(u / 2**0.5))
    else:
        h = (x @ w_up).clamp(min=0)
    return h @ w_down


@pytest.mark.parametrize("kind", KINDS)
def test_each_expert_computes_its_activation_and_has_its_weights(kind):
    torch.manual_seed(0)
    E, D, Fh = 3, 4, 6
    experts = MLPExperts(E, D, Fh, kind).double()
    gated = kind in ("swiglu", "geglu")
    assert (experts.w_gate is not None) == gated
    assert sum(p.numel() for p in experts.parameters()) == (3 if gated else 2) * E * D * Fh
    x = torch.randn(5, D, dtype=torch.float64)
    for e in range(E):
        w_gate = experts.w_gate[e] if gated else None
        expected = _by_hand(kind, x, w_gate, experts.w_up[e], experts.w_down[e])
        torch.testing.assert_close(experts(x, e), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_ffn_computes_its_activation(kind):
    torch.manual_seed(1)
    ffn = DenseFFN(4, 6, kind).double()
    gated = kind in ("swiglu", "geglu")
    assert sum(p.numel() for p in ffn.parameters()) == (3 if gated else 2) * 4 * 6
    x = torch.randn(5, 4, dtype=torch.float64)
    w_gate = ffn.w_gate.weight.t() if gated else None
    expected = _by_hand(kind, x, w_gate, ffn.w_up.weight.t(), ffn.w_down.weight.t())
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)


def test_activations_compute_different_functions():
    torch.manual_seed(2)
    x = torch.randn(8, 4)
    outs = []
    for kind in KINDS:
        torch.manual_seed(3)  # w_up, w_down drawn alike where the kinds share them
        outs.append(MLPExperts(2, 4, 6, kind)(x, 0))
    for i in range(len(outs)):
        for j in range(i):
            assert not torch.allclose(outs[i], outs[j])


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        MLPExperts(2, 4, 4, "tanh")
    with pytest.raises(ValueError, match="activation"):
        DenseFFN(4, 4, "tanh")


def _routing(T, E, K, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=g).argsort(dim=-1)[:, :K]
    return idx, torch.rand(T, K, generator=g, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("dtype", "path"), [(torch.float64, "split"), (torch.float32, "split"), (torch.float32, "grouped_mm")]
)
def test_sorted_equals_loop_for_every_activation(kind, dtype, path, monkeypatch):
    E, K, T, D, Fh = 5, 2, 40, 16, 32
    if path == "split":
        monkeypatch.setattr(dispatch_mod, "_grouped_mm_works", lambda *a: False)
    elif not _grouped_mm_works(MLPExperts(E, D, Fh, kind), torch.device("cpu"), dtype):
        pytest.skip("torch._grouped_mm is unavailable for float32 on this device/torch")
    torch.manual_seed(7)
    experts = MLPExperts(E, D, Fh, kind).to(dtype)
    x_TD = torch.randn(T, D, dtype=dtype)
    idx, w = _routing(T, E, K, seed=8, dtype=dtype)
    keep = capacity_keep_mask(idx, E, 12, policy="probability", topk_weight_TK=w)
    assert (~keep).any()
    ref = run_dispatch(dispatch_loop, experts, x_TD, idx, w, keep)
    out = run_dispatch(dispatch_sorted, experts, x_TD, idx, w, keep)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(out[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert (
        set(out[3])
        == set(ref[3])
        == ({"w_gate", "w_up", "w_down"} if experts.w_gate is not None else {"w_up", "w_down"})
    )
    for name in ref[3]:
        torch.testing.assert_close(out[3][name], ref[3][name], **tol)
