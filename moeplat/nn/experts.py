"""Expert MLPs: the dense FFN and the stacked routed experts, in four activations.

Shazeer 2020, "GLU Variants Improve Transformer", without biases:
    swiglu (eq. 6): FFN(x) = W_down (silu(x W_gate) * (x W_up))
    geglu  (eq. 6): FFN(x) = W_down (gelu(x W_gate) * (x W_up))
    relu   (eq. 1, the Transformer FFN): FFN(x) = W_down relu(x W_up)
    gelu   (eq. 3; Hendrycks & Gimpel 2016): FFN(x) = W_down gelu(x W_up)
The GLU kinds hold three matrices (w_gate, w_up, w_down), the plain ones two (w_up, w_down).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# activation name -> (elementwise function, gated?). gelu is the exact (erf) GELU.
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
}


def ffn_matrices(activation: str) -> int:
    """How many D x F matrices one MLP of this activation holds (3 for GLU variants, else 2)."""
    return 3 if ACTIVATIONS[activation][1] else 2


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def hidden(activation: str, gate_NF: torch.Tensor | None, up_NF: torch.Tensor) -> torch.Tensor:
    """The hidden activation of an MLP from its pre-activations: act(gate) * up, or act(up)."""
    fn, gated = ACTIVATIONS[activation]
    return fn(gate_NF) * up_NF if gated else fn(up_NF)


class DenseFFN(nn.Module):
    """One MLP, D -> F -> D, no biases: exactly ffn_matrices(activation) * D * F parameters."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu") -> None:
        super().__init__()
        assert d_model > 0 and d_ff > 0, (d_model, d_ff)
        _check_activation(activation)
        self.activation = activation
        gated = ACTIVATIONS[activation][1]
        self.w_gate = nn.Linear(d_model, d_ff, bias=False) if gated else None
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        gate = self.w_gate(x_D) if self.w_gate is not None else None
        return self.w_down(hidden(self.activation, gate, self.w_up(x_D)))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def mlp(
    x_ND: torch.Tensor,
    w_gate_DF: torch.Tensor | None,
    w_up_DF: torch.Tensor,
    w_down_FD: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """One MLP with weights stored input-major ([D, F], [F, D]), i.e. x @ W rather than F.linear."""
    gate_NF = x_ND @ w_gate_DF if w_gate_DF is not None else None
    return hidden(activation, gate_NF, x_ND @ w_up_DF) @ w_down_FD


def swiglu(x_ND: torch.Tensor, w_gate_DF: torch.Tensor, w_up_DF: torch.Tensor, w_down_FD: torch.Tensor):
    """SwiGLU with weights stored input-major ([D, F], [F, D]), i.e. x @ W rather than F.linear."""
    return mlp(x_ND, w_gate_DF, w_up_DF, w_down_FD, "swiglu")


class MLPExperts(nn.Module):
    """E independent MLPs of one activation with their weights stacked along a leading expert dimension.

    Stacking ([E, D, F] rather than E Linear modules) is what lets the sorted dispatcher run all
    experts as one grouped GEMM (MegaBlocks, Gale et al. 2022); ffn_matrices(activation) * E * D * F
    parameters in all (w_gate is None for the plain gelu/relu MLPs).
    Which tokens reach which expert is the dispatcher's business (moeplat.nn.dispatch).

    `dropout` is expert dropout: dropout with that probability on each expert's hidden activation,
    in training only (Switch Transformer, Fedus et al. 2022, sec. 2.4 and Table 4; ST-MoE uses it
    when fine-tuning). Every dispatcher computes the hidden activation through `hidden()` here.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, activation: str = "swiglu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        assert num_experts > 0 and d_model > 0 and d_ff > 0, (num_experts, d_model, d_ff)
        assert 0.0 <= dropout < 1.0, dropout
        _check_activation(activation)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation, self.dropout = activation, dropout
        gated = ACTIVATIONS[activation][1]
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, d_ff)) if gated else None
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution nn.Linear would give each expert on its own: U(-1/sqrt(fan_in), +).
        # TransformerLM.reset_parameters overrides this with its own scheme.
        for w, fan_in in ((self.w_gate, self.d_model), (self.w_up, self.d_model), (self.w_down, self.d_ff)):
            if w is not None:
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(w, -bound, bound)

    def hidden(self, gate_NF: torch.Tensor | None, up_NF: torch.Tensor) -> torch.Tensor:
        """The experts' hidden activation from its pre-activations, expert dropout applied."""
        return F.dropout(hidden(self.activation, gate_NF, up_NF), self.dropout, self.training)

    def forward(self, x_ND: torch.Tensor, expert: int) -> torch.Tensor:
        """Run expert number `expert` on the rows of x_ND (used by the dispatchers' loops)."""
        gate_NF = x_ND @ self.w_gate[expert] if self.w_gate is not None else None
        return self.hidden(gate_NF, x_ND @ self.w_up[expert]) @ self.w_down[expert]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"activation={self.activation!r}, dropout={self.dropout}"
        )


class SwiGLUExperts(MLPExperts):
    """MLPExperts with the SwiGLU activation (the default expert of Mixtral, DeepSeek, Qwen-MoE)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__(num_experts, d_model, d_ff, "swiglu")
