"""SwiGLU MLPs: the dense FFN and the stacked routed experts.

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 without biases):
    FFN(x) = W_down (silu(x W_gate) * (x W_up))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DenseFFN(nn.Module):
    """One SwiGLU MLP, D -> F -> D, no biases: exactly 3 * D * F parameters."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        assert d_model > 0 and d_ff > 0, (d_model, d_ff)
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x_D)) * self.w_up(x_D))


def swiglu(x_ND: torch.Tensor, w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor):
    """SwiGLU with weights stored input-major ([D, F], [F, D]), i.e. x @ W rather than F.linear."""
    return (F.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)) @ w_down_FD


class SwiGLUExperts(nn.Module):
    """E independent SwiGLU MLPs with their weights stacked along a leading expert dimension.

    Stacking ([E, D, F] rather than E Linear modules) is what lets the sorted dispatcher run all
    experts as one grouped GEMM (MegaBlocks, Gale et al. 2022); 3 * E * D * F parameters in all.
    Which tokens reach which expert is the dispatcher's business (moeplat.nn.dispatch).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        assert num_experts > 0 and d_model > 0 and d_ff > 0, (num_experts, d_model, d_ff)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution nn.Linear would give each expert on its own: U(-1/sqrt(fan_in), +).
        # TransformerLM.reset_parameters overrides this with its own scheme.
        for w, fan_in in ((self.w_gate, self.d_model), (self.w_up, self.d_model), (self.w_down, self.d_ff)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_ND: torch.Tensor, expert: int) -> torch.Tensor:
        """Run expert number `expert` on the rows of x_ND (used by the reference dispatcher)."""
        return swiglu(x_ND, self.w_gate[expert], self.w_up[expert], self.w_down[expert])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"
