"""The `model.moe` section: which layers are MoE, and each MoE layer's router, experts,
capacity, losses and dispatch."""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

from pydantic import Field, PositiveInt, model_validator

from moeplat.spec.base import Strict, check
from moeplat.spec.ffn import Experts
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


# --- experts, capacity, losses, dispatch ------------------------------------------------------


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
    residual_coefficient: bool = Field(
        False,
        description="Mix routed and shared output as c0 * routed + c1 * shared, c = softmax(x W + b) "
        "per token (DeepSpeed-MoE Residual MoE, Rajbhandari et al. 2022, sec. 4.1.1); "
        "adds 2 * d_model + 2 parameters per MoE layer.",
    )

    @model_validator(mode="after")
    def _cross(self) -> SharedExperts:
        problems = []
        for name in ("gate", "residual_coefficient"):
            if getattr(self, name) and self.count == 0:
                problems.append(
                    (name, f"needs a shared expert, but count is 0: set count >= 1 or {name}: false")
                )
        if self.gate and self.residual_coefficient:
            problems.append(("residual_coefficient", "choose one of gate and residual_coefficient"))
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


class LoadBalancing(LossCoef):
    """The Switch loss E * sum_i f_i * P_i, and over which tokens f_i (the routed fraction) counts."""

    scope: Literal["micro_batch", "global_batch", "sequence"] = Field(
        "micro_batch",
        description="micro_batch: f and P over each forward's tokens (Switch, GShard). "
        "global_batch: f over the whole optimizer step, every data-parallel rank and every "
        "train.grad_accum micro-batch (Qiu et al. 2025, 'Demons in the Detail'); exact, and with "
        "grad_accum > 1 it routes the step's micro-batches once more without gradients first. "
        "sequence: f and P per sequence, averaged (the same loss as sequence_balance).",
    )


class Losses(Strict):
    """Auxiliary router losses, combinable, each with its coefficient; omit one (or null) to switch it off.

    load_balancing: Switch Transformer eq. 4, E * sum_i f_i * P_i (1.0 at perfect balance); its
        `scope` (micro_batch | global_batch | sequence) is the set of tokens f_i is counted over.
    z_loss: ST-MoE eq. 5, mean over tokens of logsumexp(logits)^2.
    importance: Shazeer et al. 2017 eq. 6-7, CV^2 of each expert's summed gate values.
    load: Shazeer et al. 2017 eq. 8-11, CV^2 of the smooth load estimate (router kind noisy_topk).
    sequence_balance: DeepSeek-V3 eq. 17-20, the Switch-style loss per sequence, averaged.
    variance: E^2 * the variance over experts of the mean router probability (0 at balance).
    device_balance: DeepSeek-V2 eq. 26-27, the Switch-style loss over `devices` groups of experts.
    communication_balance: DeepSeek-V2 eq. 28-30, balances the tokens each device receives.
    dynamic: Huang et al. 2024, the router entropy -sum_i P_i log P_i averaged over tokens: sharpens
        the distributions so top-p routing (router kind top_p) needs fewer experts.

    `devices` (D) splits the experts into D contiguous groups for the last two; null takes the
    router's n_groups (group-limited routing puts a group on a device). `max_devices` (M, the most
    devices one token reaches) defaults to the router's topk_groups, else min(top_k, D).
    """

    load_balancing: LoadBalancing | None = None
    z_loss: LossCoef | None = None
    importance: LossCoef | None = None
    load: LossCoef | None = None
    sequence_balance: LossCoef | None = None
    variance: LossCoef | None = None
    device_balance: LossCoef | None = None
    communication_balance: LossCoef | None = None
    dynamic: LossCoef | None = None
    devices: PositiveInt | None = None
    max_devices: PositiveInt | None = None

    @property
    def switched_on(self) -> bool:
        return any(getattr(self, name) is not None for name in LOSS_NAMES)

    @property
    def per_device(self) -> bool:
        return self.device_balance is not None or self.communication_balance is not None


LOSS_NAMES = (
    "load_balancing",
    "z_loss",
    "importance",
    "load",
    "sequence_balance",
    "variance",
    "device_balance",
    "communication_balance",
    "dynamic",
)


class LoopDispatch(Strict):
    """Reference dispatch: one expert at a time. Slow and obviously correct."""

    kind: Literal["loop"]


class SortedDispatch(Strict):
    """Sort token-slots by expert, one gather, contiguous per-expert matmuls, one scatter-add."""

    kind: Literal["sorted"]


class CapacityDispatch(Strict):
    """Fixed-capacity buffers [E, C, d_model] and one batched matmul per expert matrix (GShard,
    Switch): static shapes, padding rows computed too. Needs `capacity: {kind: factor}` (C comes
    from it); which slots are dropped is the capacity's drop policy, exactly as with the others."""

    kind: Literal["capacity"]


class AutoDispatch(Strict):
    """Pick per spec (see `resolve_dispatch`): `capacity` when the capacity is a factor and
    `train.compile` is on (static shapes compile to one graph), else `sorted` (no padding FLOPs;
    the only choice when dropless). `moeplat plan` prints the choice; `moeplat run` logs it."""

    kind: Literal["auto"]


Dispatch = Annotated[
    LoopDispatch | SortedDispatch | CapacityDispatch | AutoDispatch, Field(discriminator="kind")
]


def resolve_dispatch(moe: MoESpec, compiled: bool) -> str:
    """The dispatcher actually built: the spec's kind, or auto's choice (sorted | capacity)."""
    if not isinstance(moe.dispatch, AutoDispatch):
        return moe.dispatch.kind
    return "capacity" if compiled and isinstance(moe.capacity, CapacityFactor) else "sorted"


PerLayer = Annotated[list[PositiveInt], Field(min_length=1)]


class LayerShape(NamedTuple):
    """One MoE layer's expert count and top-k, as written and as built (x granularity)."""

    num_experts: int
    top_k: int
    routed_experts: int  # num_experts * granularity
    routed_top_k: int  # top_k * granularity


class MoESpec(Strict):
    """One MoE layer's design. With `granularity: m` (DeepSeekMoE fine-grained expert segmentation,
    Dai et al. 2024, sec. 3.1, eq. 6-8) each of the num_experts experts is split into m experts of
    width d_ff / m, and top_k * m of them are chosen: the same expert parameters and per-token
    expert FLOPs as m = 1, with many more combinations of experts (the router grows to
    num_experts * m scores). `routed_d_ff` and `shape(j)` say what is built.

    Pyramid layouts (PR-MoE, DeepSpeed-MoE, Rajbhandari et al. 2022, sec. 4.1.2: more experts in
    the later layers): `num_experts` and/or `top_k` may be lists with one entry per MoE layer, in
    layer order (as DeepSpeed's `--num-experts 64 64 128 128`); a single number applies to all.
    """

    num_experts: (
        Annotated[int, Field(ge=2)] | Annotated[list[Annotated[int, Field(ge=2)]], Field(min_length=1)]
    )
    top_k: PositiveInt | PerLayer
    granularity: PositiveInt = 1
    layers: LayerSelection = AllLayers(kind="all")
    router: Router = TopKRouter(kind="topk")
    experts: Experts
    shared_experts: SharedExperts = SharedExperts()
    capacity: Capacity = Dropless(kind="dropless")
    losses: Losses = Losses()
    dispatch: Dispatch = SortedDispatch(kind="sorted")

    @property
    def per_layer(self) -> int | None:
        """The number of MoE layers the lists describe, or None when both are single numbers."""
        lengths = {len(v) for v in (self.num_experts, self.top_k) if isinstance(v, list)}
        return lengths.pop() if len(lengths) == 1 else None

    def shape(self, j: int) -> LayerShape:
        """The j-th MoE layer's shape (j counts MoE layers only, 0-based)."""
        E = self.num_experts[j] if isinstance(self.num_experts, list) else self.num_experts
        K = self.top_k[j] if isinstance(self.top_k, list) else self.top_k
        return LayerShape(E, K, E * self.granularity, K * self.granularity)

    def shapes(self, n_moe_layers: int) -> list[LayerShape]:
        return [self.shape(j) for j in range(n_moe_layers)]

    @property
    def routed_d_ff(self) -> int:
        """The hidden size of each built routed expert: experts.d_ff / granularity."""
        return self.experts.d_ff // self.granularity

    def devices(self, shape: LayerShape) -> tuple[int, int]:
        """(D, M) of the device-level losses: losses.devices / .max_devices or the router's groups."""
        groups = getattr(self.router, "n_groups", None), getattr(self.router, "topk_groups", None)
        D = self.losses.devices or groups[0] or 0
        M = self.losses.max_devices or groups[1] or min(shape.routed_top_k, D)
        return D, M

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
        lists = [v for v in (self.num_experts, self.top_k) if isinstance(v, list)]
        if len(lists) == 2 and len(lists[0]) != len(lists[1]):
            problems.append(
                (
                    "top_k",
                    f"has {len(self.top_k)} entries, num_experts {len(self.num_experts)}: one per MoE layer",
                )
            )
            return check(problems) or self
        n = self.per_layer or 1
        shapes = list(dict.fromkeys(self.shapes(n)))  # each distinct layer shape once
        problems += self._shape_problems(shapes)
        if isinstance(self.dispatch, CapacityDispatch) and isinstance(self.capacity, Dropless):
            problems.append(
                (
                    "dispatch",
                    "kind 'capacity' needs fixed capacity buffers: set capacity: {kind: factor} "
                    "or use dispatch kind 'sorted' (dropless)",
                )
            )
        if self.losses.load is not None and self.router.kind != "noisy_topk":
            problems.append(("losses.load", "the load loss needs the noise of router kind 'noisy_topk'"))
        return check(problems + _null_problems(self.router, self.losses)) or self

    def _shape_problems(self, shapes: list[LayerShape]) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        for s in shapes:
            if s.top_k > s.num_experts:  # the same as top_k * m <= num_experts * m
                problems.append(("top_k", f"top_k ({s.top_k}) must be <= num_experts ({s.num_experts})"))
                continue
            dropless = isinstance(self.capacity, Dropless)
            # the router sees the segmented experts
            problems += router_problems(
                self.router, s.routed_experts, s.routed_top_k, dropless, self.losses.switched_on
            )
            if self.losses.per_device:
                problems += self._device_problems(s)
        return list(dict.fromkeys(problems))

    def _device_problems(self, s: LayerShape) -> list[tuple[str, str]]:
        D, M = self.devices(s)
        if not D:
            return [("losses.devices", "the device and communication balance losses need losses.devices (D)")]
        if s.routed_experts % D:
            return [
                ("losses.devices", f"the {s.routed_experts} routed experts do not split into {D} devices")
            ]
        if M > D:
            return [("losses.max_devices", f"max_devices ({M}) must be <= devices ({D})")]
        return []


def _null_problems(router: Router, losses: Losses) -> list[tuple[str, str]]:
    """Null experts (MoE++) balance per micro-batch, and their tau only acts with null experts
    and the load-balancing loss."""
    nulls, lb = getattr(router, "null_experts", 0), losses.load_balancing
    if nulls and lb is not None and lb.scope != "micro_batch":
        return [
            (
                "losses.load_balancing.scope",
                "null experts (router.null_experts) balance per micro-batch: set scope: micro_batch",
            )
        ]
    if getattr(router, "null_balance_weight", None) is None:
        return []
    if not nulls:
        return [
            ("router.null_balance_weight", "weighs null experts: set router.null_experts >= 1 or drop it")
        ]
    if lb is None:
        return [
            ("router.null_balance_weight", "weighs the null experts in losses.load_balancing, which is off")
        ]
    return []
