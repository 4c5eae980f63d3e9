"""The MLPs of a spec: the dense FFN and the experts (kinds swiglu, geglu, gelu, relu)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from moeplat.spec.base import Strict


class _MLP(Strict):
    d_ff: PositiveInt


class _ExpertOptions(Strict):
    """Options of the routed experts only (not of the shared experts or the dense FFN)."""

    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0,
        description="Expert dropout on each routed expert's hidden activation, training only "
        "(Switch Transformer, Fedus et al. 2022, sec. 2.4 / Table 4; used for fine-tuning in ST-MoE).",
    )


class SwiGLU(_MLP):
    """An MLP W_down (silu(x W_gate) * x W_up) of hidden size d_ff, no biases (Shazeer 2020,
    "GLU Variants", eq. 6): 3 * d_model * d_ff weights."""

    kind: Literal["swiglu"]


class GeGLU(_MLP):
    """An MLP W_down (gelu(x W_gate) * x W_up) of hidden size d_ff, no biases (Shazeer 2020, eq. 6
    with GELU): 3 * d_model * d_ff weights."""

    kind: Literal["geglu"]


class GELU(_MLP):
    """A plain MLP W_down gelu(x W_up) of hidden size d_ff, no biases (Shazeer 2020 eq. 3;
    exact GELU, Hendrycks & Gimpel 2016): 2 * d_model * d_ff weights."""

    kind: Literal["gelu"]


class ReLU(_MLP):
    """A plain MLP W_down relu(x W_up) of hidden size d_ff, no biases (the Transformer FFN,
    Shazeer 2020 eq. 1): 2 * d_model * d_ff weights."""

    kind: Literal["relu"]


# The shared experts and the dense FFN are MLPs of one of these kinds.
MLP = Annotated[SwiGLU | GeGLU | GELU | ReLU, Field(discriminator="kind")]


class SwiGLUExperts(SwiGLU, _ExpertOptions):
    """Routed experts, each a SwiGLU MLP (see SwiGLU)."""


class GeGLUExperts(GeGLU, _ExpertOptions):
    """Routed experts, each a GeGLU MLP (see GeGLU)."""


class GELUExperts(GELU, _ExpertOptions):
    """Routed experts, each a plain GELU MLP (see GELU)."""


class ReLUExperts(ReLU, _ExpertOptions):
    """Routed experts, each a plain ReLU MLP (see ReLU)."""


# Each routed expert is an MLP of the same kinds, plus the routed-expert options (dropout).
Experts = Annotated[SwiGLUExperts | GeGLUExperts | GELUExperts | ReLUExperts, Field(discriminator="kind")]


def ffn_matrices(kind: str) -> int:
    """How many d_model x d_ff matrices one MLP of this kind holds (3 for the GLU variants, else 2)."""
    return 3 if kind in ("swiglu", "geglu") else 2
