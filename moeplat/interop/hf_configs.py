"""transformers configs of the same shape as a moeplat MoE layer, for `moeplat bench`'s peers.

`hf_peer(layer, impl)` is the transformers block computing what `layer` computes (moeplat.interop
.hf.to_hf checks the structure and copies the weights), with transformers' experts implementation
`impl` ("eager": a loop over experts; "grouped_mm": torch._grouped_mm) set on the config.
"""

from __future__ import annotations

import copy

from torch import nn

from moeplat.interop.hf import to_hf
from moeplat.nn import MoELayer, TopKRouter

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm")


def all_experts_implementations() -> list[str]:
    """Every experts implementation the installed transformers has: eager and each registered
    kernel (transformers 5: batched_mm, grouped_mm, and the CUDA-only deepgemm and sonicmoe)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def peer_family(layer: MoELayer) -> str | None:
    """The transformers family whose block has this layer's structure: Mixtral (no shared experts)
    or Qwen2-MoE (one gated shared expert), both softmax top-k; None for anything else."""
    if not isinstance(layer.router, TopKRouter) or layer.residual_coef is not None:
        return None
    if layer.shared is None:
        return "mixtral"
    return "qwen2_moe" if layer.shared_gate is not None else None


def hf_peer(layer: MoELayer, experts_implementation: str) -> nn.Module:
    """The transformers block of `layer`'s family and shape with a copy of its weights."""
    import transformers

    family = peer_family(layer)
    if family is None:
        raise ValueError("no transformers block has this layer's structure (see peer_family)")
    E, K, D, Fh = layer.num_experts, layer.top_k, layer.experts.d_model, layer.experts.d_ff
    common = {"hidden_size": D, "num_experts_per_tok": K, "experts_implementation": experts_implementation}
    if family == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=Fh, num_local_experts=E, **common)
    else:
        config = transformers.Qwen2MoeConfig(
            moe_intermediate_size=Fh,
            shared_expert_intermediate_size=layer.shared.w_up.out_features,
            num_experts=E,
            norm_topk_prob=layer.router.normalize,
            **common,
        )
    # transformers computes these routers' logits in the activations' dtype, moeplat in float32 by
    # default: the same function in float32, so the peer is built from a copy that says "input".
    twin = copy.deepcopy(layer)
    twin.router.logits_precision = "input"
    return to_hf(twin, config)
