"""The sorted (dropless) dispatch never materialises a [T, E, D]-sized tensor (issue 9, item 6):
every tensor any aten op produces in its forward and backward is recorded by a dispatch mode, and
the largest must stay well under T*E*D. The instrument is checked on a one-hot dense formulation
that does build [T, E, D], so the test can fail."""

from __future__ import annotations

import torch
from dispatch_helpers import run_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from moeplat.nn import SwiGLUExperts, dispatch_sorted

T, E, K, D, F = 64, 16, 2, 32, 16  # [E, D, F] weights (8k) and [T*K, D] copies (4k) << T*E*D (32k)


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _inputs():
    g = torch.Generator().manual_seed(0)
    experts = SwiGLUExperts(E, D, F)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return experts, x, idx, w, torch.ones(T, K, dtype=torch.bool)


def _one_hot_dense(experts, x_TD, idx_TK, w_TK, keep_TK):
    """Every token through every expert, weighted by a [T, E] combine matrix: builds [T, E, D]."""
    combine_TE = torch.zeros(T, E).scatter_add(1, idx_TK, w_TK * keep_TK)
    h_TEF = torch.nn.functional.silu(torch.einsum("td,edf->tef", x_TD, experts.w_gate))
    h_TEF = h_TEF * torch.einsum("td,edf->tef", x_TD, experts.w_up)
    y_TED = torch.einsum("tef,efd->ted", h_TEF, experts.w_down)
    return (y_TED * combine_TE.unsqueeze(-1)).sum(1)


def test_sorted_dispatch_never_builds_a_tokens_x_experts_x_dim_tensor():
    experts, x, idx, w, keep = _inputs()
    run_dispatch(dispatch_sorted, experts, x, idx, w, keep)  # warm-up: the grouped-GEMM probe
    with LargestTensor() as sorted_mode:
        y_sorted = run_dispatch(dispatch_sorted, experts, x, idx, w, keep)[0]
    with LargestTensor() as dense_mode:
        y_dense = run_dispatch(_one_hot_dense, experts, x, idx, w, keep)[0]
    torch.testing.assert_close(y_sorted, y_dense, rtol=1e-4, atol=1e-5)  # the same layer
    assert dense_mode.numel >= T * E * D  # the instrument sees a [T, E, D] tensor when there is one
    assert sorted_mode.numel <= T * E * D // 4, sorted_mode.numel
