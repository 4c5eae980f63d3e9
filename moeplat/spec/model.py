"""The `model` section: a decoder-only transformer whose FFN layers may be MoE layers."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from moeplat.spec.base import Strict, check
from moeplat.spec.routers import Router, TopKRouter, router_problems

# --- which layers are MoE -------------------------------------------------------------------


class AllLayers(Strict):
    """Every layer's FFN is an MoE layer (Mixtral, OLMoE)."""

    kind: Literal["all"]


class EveryNth(Strict):
    """Layers offset, offset+n, offset+2n, ... are MoE (GShard/Switch use every 2nd layer)."""

    kind: Literal["every"]
    n: PositiveInt = 2
    offset: Annotated[int, Field(ge=0)] = 1


class FirstDense(Strict):
    """The first k layers are dense, the rest MoE (DeepSeek-V2/V3 keep early layers dense)."""

    kind: Literal["first_dense"]
    k: Annotated[int, Field(ge=0)] = 1


class LayerList(Strict):
    """An explicit list of 0-based layer indices."""

    kind: Literal["list"]
    layers: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


LayerSelection = Annotated[AllLayers | EveryNth | FirstDense | LayerList, Field(discriminator="kind")]


def moe_layer_indices(selection: LayerSelection, n_layers: int) -> list[int]:
    """0-based indices of the layers whose FFN is an MoE layer."""
    if isinstance(selection, AllLayers):
        return list(range(n_layers))
    if isinstance(selection, EveryNth):
        return list(range(selection.offset, n_layers, selection.n))
    if isinstance(selection, FirstDense):
        return list(range(selection.k, n_layers))
    return sorted(set(selection.layers))


# --- router, experts, capacity, losses, dispatch ---------------------------------------------


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


class SharedExperts(Strict):
    """Experts every token goes through, added to the routed output (DeepSeekMoE, Qwen2-MoE).

    `count` shared experts of width `d_ff` (default: the routed experts' d_ff) are fused into one
    MLP of hidden size count * d_ff, which computes the same function; their activation is the
    routed experts' kind.

    `gate: true` multiplies the shared output by a learned scalar gate sigmoid(x . w_g) per token,
    w_g a D-vector (Qwen2-MoE, Qwen Team 2024: `shared_expert_gate` of transformers'
    modeling_qwen2_moe); it adds d_model parameters per MoE layer.
    """

    count: Annotated[int, Field(ge=0)] = 0
    d_ff: PositiveInt | None = None
    gate: bool = False

    @model_validator(mode="after")
    def _cross(self) -> SharedExperts:
        problems = []
        if self.gate and self.count == 0:
            problems.append(
                ("gate", "gates the shared experts, but count is 0: set count >= 1 or gate: false")
            )
        return check(problems) or self


class Dropless(Strict):
    """Every routed token-slot is computed (MegaBlocks-style dropless MoE)."""

    kind: Literal["dropless"]


class CapacityFactor(Strict):
    """Fixed expert capacity C = ceil(factor * tokens * top_k / num_experts) (GShard, Switch).

    C is at least `min_capacity`. Slots beyond capacity are dropped; which ones, `drop_policy` says:
    `position` (GShard/Switch: first choices are placed before second choices, then by token
    position) or `probability` (within an expert, the slots with the highest router weight are kept;
    the per-slot form of V-MoE's Batch Prioritized Routing, Riquelme et al. 2021 sec. 4.1). A dropped
    token-slot contributes nothing and the token passes through the residual connection. Separate
    factors for training and evaluation (Switch uses a larger eval factor).
    """

    kind: Literal["factor"]
    train: Annotated[float, Field(gt=0)] = 1.25
    eval: Annotated[float, Field(gt=0)] = 2.0
    min_capacity: PositiveInt = 1
    drop_policy: Literal["position", "probability"] = "position"


Capacity = Annotated[Dropless | CapacityFactor, Field(discriminator="kind")]


class LossCoef(Strict):
    coef: Annotated[float, Field(ge=0)]


class Losses(Strict):
    """Auxiliary router losses, combinable, each with its coefficient; omit one (or null) to switch it off.

    load_balancing: Switch Transformer eq. 4, E * sum_i f_i * P_i (1.0 at perfect balance).
    z_loss: ST-MoE eq. 5, mean over tokens of logsumexp(logits)^2.
    importance: Shazeer et al. 2017 eq. 6-7, CV^2 of each expert's summed gate values.
    load: Shazeer et al. 2017 eq. 8-11, CV^2 of the smooth load estimate (router kind noisy_topk).
    sequence_balance: DeepSeek-V3 eq. 17-20, the Switch-style loss per sequence, averaged.
    """

    load_balancing: LossCoef | None = None
    z_loss: LossCoef | None = None
    importance: LossCoef | None = None
    load: LossCoef | None = None
    sequence_balance: LossCoef | None = None


class LoopDispatch(Strict):
    """Reference dispatch: one expert at a time. Slow and obviously correct."""

    kind: Literal["loop"]


class SortedDispatch(Strict):
    """Sort token-slots by expert, one gather, contiguous per-expert matmuls, one scatter-add."""

    kind: Literal["sorted"]


Dispatch = Annotated[LoopDispatch | SortedDispatch, Field(discriminator="kind")]


class MoESpec(Strict):
    """One MoE layer's design. With `granularity: m` (DeepSeekMoE fine-grained expert segmentation,
    Dai et al. 2024, sec. 3.1, eq. 6-8) each of the num_experts experts is split into m experts of
    width d_ff / m, and top_k * m of them are chosen: the same expert parameters and per-token
    expert FLOPs as m = 1, with many more combinations of experts (the router grows to
    num_experts * m scores). `routed_experts`, `routed_top_k` and `routed_d_ff` are what is built.
    """

    num_experts: Annotated[int, Field(ge=2)]
    top_k: PositiveInt
    granularity: PositiveInt = 1
    layers: LayerSelection = AllLayers(kind="all")
    router: Router = TopKRouter(kind="topk")
    experts: Experts
    shared_experts: SharedExperts = SharedExperts()
    capacity: Capacity = Dropless(kind="dropless")
    losses: Losses = Losses()
    dispatch: Dispatch = SortedDispatch(kind="sorted")

    @property
    def routed_experts(self) -> int:
        """How many routed experts are built: num_experts * granularity."""
        return self.num_experts * self.granularity

    @property
    def routed_top_k(self) -> int:
        """How many routed experts each token goes to: top_k * granularity."""
        return self.top_k * self.granularity

    @property
    def routed_d_ff(self) -> int:
        """The hidden size of each built routed expert: experts.d_ff / granularity."""
        return self.experts.d_ff // self.granularity

    @model_validator(mode="after")
    def _cross(self) -> MoESpec:
        problems = []
        if self.experts.d_ff % self.granularity:
            problems.append(
                (
                    "granularity",
                    f"experts.d_ff ({self.experts.d_ff}) must be divisible by granularity ({self.granularity})",
                )
            )
        if self.top_k > self.num_experts:  # the same as top_k * m <= num_experts * m
            problems.append(("top_k", f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"))
        else:
            dropless = isinstance(self.capacity, Dropless)
            has_losses = any(v is not None for v in self.losses.model_dump().values())
            E, K = self.routed_experts, self.routed_top_k  # the router sees the segmented experts
            problems += router_problems(self.router, E, K, dropless, has_losses)
        if self.losses.load is not None and self.router.kind != "noisy_topk":
            problems.append(("losses.load", "the load loss needs the noise of router kind 'noisy_topk'"))
        return check(problems) or self


# --- the model -------------------------------------------------------------------------------


# The FFN of non-MoE layers (and of the whole model when `moe` is null): an MLP of the same kinds
# as the experts (swiglu, geglu, gelu, relu).
DenseFFN = MLP


class ModelSpec(Strict):
    vocab_size: Annotated[int, Field(ge=2)] = 256
    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt | None = Field(None, description="Grouped-query attention; null = n_heads.")
    max_seq_len: PositiveInt
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    norm_eps: Annotated[float, Field(gt=0)] = 1e-5
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    tie_embeddings: bool = True
    init_std: Annotated[float, Field(gt=0)] = 0.02
    dense_ffn: DenseFFN | None = None
    moe: MoESpec | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def moe_layers(self) -> list[int]:
        return moe_layer_indices(self.moe.layers, self.n_layers) if self.moe else []

    @model_validator(mode="after")
    def _cross(self) -> ModelSpec:
        problems = []
        if self.d_model % self.n_heads:
            problems.append(
                ("n_heads", f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
            )
        elif (self.d_model // self.n_heads) % 2:
            head_dim = self.d_model // self.n_heads
            problems.append(
                ("n_heads", f"head dim d_model/n_heads = {head_dim} must be even for rotary embeddings")
            )
        if self.n_heads % self.kv_heads:
            problems.append(
                ("n_kv_heads", f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
            )
        if self.moe is not None:
            bad = [i for i in self.moe_layers if i >= self.n_layers]
            if bad:
                problems.append(
                    ("moe.layers", f"layer indices {bad} do not exist (n_layers={self.n_layers})")
                )
            elif not self.moe_layers:
                problems.append(("moe.layers", "selects no layer; set model.moe: null for a dense model"))
        if len(self.moe_layers) < self.n_layers and self.dense_ffn is None:
            problems.append(("dense_ffn", "some layers are dense: set dense_ffn (kind: swiglu, d_ff: ...)"))
        if len(self.moe_layers) == self.n_layers and self.dense_ffn is not None:
            problems.append(
                ("dense_ffn", "every layer is MoE, so dense_ffn is unused: remove it or set it to null")
            )
        return check(problems) or self
