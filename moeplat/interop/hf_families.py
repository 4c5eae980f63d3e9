"""One builder and one weight map per transformers MoE family (transformers 5 modeling files).

A builder reads the hyper-parameters a transformers block carries and returns the moeplat MoELayer
that computes the same function (weights not yet copied); `weight_pairs` lists, for a block and a
layer of the same structure, every (name, transformers view, moeplat view) pair of equal shape and
layout, so that copying one into the other in either direction moves the weights exactly.

What each block computes (transformers 5.x, read from models/<name>/modeling_<name>.py):

- Mixtral (Jiang et al. 2024): logits x W^T in the activations' dtype, softmax in float32, top-k,
  the k weights renormalised; SwiGLU experts with fused [gate; up] weights [E, 2F, D].
- OLMoE (Muennighoff et al. 2024): as Mixtral, renormalised only if `norm_topk_prob`.
- Qwen2-MoE (Qwen Team 2024): as OLMoE, plus one shared SwiGLU expert scaled per token by
  sigmoid(x w_g) (`shared_expert_gate`).
- DeepSeek-V3 (DeepSeek-AI 2024, eq. 12-16): float32 logits, sigmoid scores; the
  `e_score_correction_bias` is added for the choice only; node-limited choice among the
  `topk_group` best of `n_group` groups by their top-2 sum; weights renormalised if
  `norm_topk_prob`, times `routed_scaling_factor`; n_shared_experts shared experts fused into one.
- Switch Transformers (Fedus et al. 2021): float32 logits and softmax, top-1 (argmax), weight = the
  chosen probability; a fixed `expert_capacity` per sequence, later tokens dropped (output 0);
  two-matrix ReLU experts (wi, wo) with dropout on the hidden activation.
"""

from __future__ import annotations

import torch
from torch import nn

from moeplat.nn import MoELayer, SigmoidBiasRouter, SwitchRouter, TopKRouter

# HF Switch has a fixed number of slots per expert; moeplat's capacity is
# max(min_capacity, ceil(factor * T * K / E)). With this factor the second term is 1 for any
# batch under 10^9 tokens, so the capacity is exactly min_capacity = expert_capacity.
FIXED_CAPACITY_FACTOR = 1e-9

# transformers block class name -> family (the config's model_type)
BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "OlmoeSparseMoeBlock": "olmoe",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "DeepseekV3MoE": "deepseek_v3",
    "SwitchTransformersSparseMLP": "switch_transformers",
}
# family -> (transformers module, block class)
BLOCK_CLASSES = {
    family: (f"transformers.models.{family}.modeling_{family}", cls) for cls, family in BLOCKS.items()
}


def _activation(act: nn.Module, gated: bool) -> str:
    """The moeplat expert kind of a transformers activation module (exact GELU only)."""
    name = type(act).__name__
    if name in ("SiLUActivation", "SiLU"):
        base = "silu"
    elif name == "GELUActivation" or (name == "GELU" and act.approximate == "none"):
        base = "gelu"
    elif name == "ReLU":
        base = "relu"
    else:
        raise ValueError(f"activation {name} has no moeplat expert kind (silu, exact gelu, relu)")
    kinds = {
        (True, "silu"): "swiglu",
        (True, "gelu"): "geglu",
        (False, "gelu"): "gelu",
        (False, "relu"): "relu",
    }
    if (gated, base) not in kinds:
        raise ValueError(f"{'gated' if gated else 'plain'} {base} experts have no moeplat kind")
    return kinds[gated, base]


def _balance(top_k: int, aux_coef: float) -> dict[str, float]:
    # transformers' load_balancing_loss_func divides the counts by T, moeplat's by T * K (so
    # that perfect balance gives 1.0 for every K): HF's loss = K * moeplat's.
    return {"balance_coef": aux_coef * top_k}


def build(family: str, block: nn.Module, *, aux_coef: float, z_coef: float, gamma: float, dispatch: str):
    """The moeplat layer of the structure `block` has (fresh weights)."""
    if family != "switch_transformers" and z_coef:
        raise ValueError(f"transformers' {family} block has no router z-loss: leave router_z_loss_coef at 0")
    if family == "deepseek_v3" and aux_coef:
        raise ValueError("transformers' DeepSeek-V3 has no balancing loss: leave router_aux_loss_coef at 0")
    if family != "deepseek_v3" and gamma:
        raise ValueError("gamma (the aux-loss-free bias step) applies to DeepSeek-V3 only")
    common = {"dispatch": dispatch}
    if family == "switch_transformers":
        return _switch(block, aux_coef, z_coef, common)
    gate, experts = block.gate, block.experts
    E, D = gate.weight.shape
    F, K = experts.down_proj.shape[-1], gate.top_k
    common["activation"] = _activation(experts.act_fn, gated=True)
    if family == "deepseek_v3":
        return _deepseek_v3(block, D, E, K, F, gamma, common)
    normalize = True if family == "mixtral" else gate.norm_topk_prob
    jitter = getattr(block, "jitter_noise", 0.0)  # Mixtral only (see from_hf's docstring)
    router = TopKRouter(D, E, K, normalize=normalize, jitter_eps=jitter, logits_precision="input")
    if family == "qwen2_moe":
        shared = block.shared_expert
        if _activation(shared.act_fn, gated=True) != common["activation"]:
            raise ValueError("the shared expert's activation differs from the routed experts'")
        common.update(n_shared_experts=1, shared_d_ff=shared.gate_proj.out_features, shared_gate=True)
    return MoELayer(D, E, K, F, router=router, **_balance(K, aux_coef), **common)


def _deepseek_v3(block: nn.Module, D: int, E: int, K: int, F: int, gamma: float, common: dict) -> MoELayer:
    gate, shared = block.gate, block.shared_experts
    router = SigmoidBiasRouter(
        D,
        E,
        K,
        gamma=gamma,
        n_groups=gate.num_group,
        topk_groups=gate.topk_group,
        normalize=gate.norm_topk_prob,
        scaling_factor=float(gate.routed_scaling_factor),
    )
    # The shared experts are one fused MLP of n_shared * moe_intermediate_size either way.
    n_shared = getattr(getattr(block, "config", None), "n_shared_experts", None) or 1
    shared_f = shared.gate_proj.out_features
    if shared_f % n_shared or _activation(shared.act_fn, gated=True) != common["activation"]:
        raise ValueError("the shared experts do not match n_shared_experts or the routed activation")
    return MoELayer(
        D, E, K, F, router=router, n_shared_experts=n_shared, shared_d_ff=shared_f // n_shared, **common
    )


def _switch(block: nn.Module, aux_coef: float, z_coef: float, common: dict) -> MoELayer:
    r = block.router
    E, D = r.classifier.weight.shape
    if r.classifier.bias is not None:
        raise ValueError("router_bias=True: moeplat routers have no bias; use router_bias=False")
    if r.dtype != torch.float32:
        raise ValueError(f"router_dtype={r.dtype}: moeplat's switch router computes in float32")
    e0 = block.experts["expert_0"]
    # Switch's balancing loss is computed per sequence (one group per batch row) = moeplat's
    # sequence_balance_loss for top-1; its z-loss is moeplat's router_z_loss.
    return MoELayer(
        D,
        E,
        1,
        e0.wi.out_features,
        router=SwitchRouter(D, E, jitter_eps=r.jitter_noise),
        capacity_factor_train=FIXED_CAPACITY_FACTOR,
        capacity_factor_eval=FIXED_CAPACITY_FACTOR,
        min_capacity=r.expert_capacity,
        drop_policy="position",
        sequence_balance_coef=aux_coef,
        z_loss_coef=z_coef,
        activation=_activation(e0.act, gated=False),
        expert_dropout=e0.dropout.p,
        **common,
    )


def weight_pairs(
    family: str, block: nn.Module, layer: MoELayer
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, transformers view, moeplat view) for every weight; views of equal shape and layout."""
    ex, pairs = layer.experts, []
    if family == "switch_transformers":
        pairs.append(("router.classifier.weight", block.router.classifier.weight, layer.router.weight))
        for e in range(ex.num_experts):
            hf = block.experts[f"expert_{e}"]  # Linear weights are [out, in]; moeplat's are [in, out]
            pairs.append((f"experts.expert_{e}.wi.weight", hf.wi.weight, ex.w_up[e].t()))
            pairs.append((f"experts.expert_{e}.wo.weight", hf.wo.weight, ex.w_down[e].t()))
        return pairs
    F = ex.d_ff
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj  # [E, 2F, D], [E, D, F]
    pairs += [
        ("gate.weight", block.gate.weight, layer.router.weight),
        ("experts.gate_up_proj[:, :F]", gate_up[:, :F], ex.w_gate.transpose(1, 2)),
        ("experts.gate_up_proj[:, F:]", gate_up[:, F:], ex.w_up.transpose(1, 2)),
        ("experts.down_proj", down, ex.w_down.transpose(1, 2)),
    ]
    if family == "deepseek_v3":
        pairs.append(
            ("gate.e_score_correction_bias", block.gate.e_score_correction_bias, layer.router.bias_E)
        )
    shared = {"qwen2_moe": "shared_expert", "deepseek_v3": "shared_experts"}.get(family)
    if shared is not None:
        mlp = getattr(block, shared)
        for hf_name, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
            pairs.append(
                (
                    f"{shared}.{hf_name}.weight",
                    getattr(mlp, hf_name).weight,
                    getattr(layer.shared, ours).weight,
                )
            )
    if family == "qwen2_moe":
        pairs.append(("shared_expert_gate.weight", block.shared_expert_gate.weight, layer.shared_gate.weight))
    return pairs
