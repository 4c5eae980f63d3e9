"""The `model` section: a decoder-only transformer whose FFN layers may be MoE layers
(`model.moe`: moeplat.spec.moe)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt, model_validator

from moeplat.spec.attention import GQA, Attention, attention_problems
from moeplat.spec.base import Strict, check
from moeplat.spec.ffn import MLP
from moeplat.spec.moe import MoESpec, moe_layer_indices

# --- the model -------------------------------------------------------------------------------


# The FFN of non-MoE layers (and of the whole model when `moe` is null): an MLP of the same kinds
# as the experts (swiglu, geglu, gelu, relu).
DenseFFN = MLP


class ModelSpec(Strict):
    vocab_size: Annotated[int, Field(ge=2)] | Literal["auto"] = Field(
        "auto",
        description="Embedding and output rows; auto = the tokenizer's vocabulary padded up to "
        "vocab_multiple (resolved at validation: show and plan print the number).",
    )
    vocab_multiple: PositiveInt = Field(
        128, description="vocab_size: auto pads up to a multiple of this (Megatron's 128, for speed)."
    )
    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt | None = Field(None, description="Grouped-query attention; null = n_heads.")
    attention: Attention = GQA(kind="gqa")
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
        problems = attention_problems(self.attention, self.d_model, self.n_heads, self.n_kv_heads)
        if self.moe is not None:
            bad = [i for i in self.moe_layers if i >= self.n_layers]
            per_layer = self.moe.per_layer
            if per_layer is not None and not bad and per_layer != len(self.moe_layers):
                field = "num_experts" if isinstance(self.moe.num_experts, list) else "top_k"
                problems.append(
                    (
                        f"moe.{field}",
                        f"has {per_layer} entries but moe.layers selects {len(self.moe_layers)} MoE layers: "
                        "give one entry per MoE layer, or a single number",
                    )
                )
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
