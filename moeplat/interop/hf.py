"""moeplat MoE layers <-> transformers MoE blocks, with the same weights and the same function.

    layer = from_hf(block)            # MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock,
                                      # OlmoeSparseMoeBlock, DeepseekV3MoE, SwitchTransformersSparseMLP
    block = to_hf(layer, config)      # the block transformers builds from `config`, with layer's weights

The layer computes what the block computes (in evaluation, for [B, S, D] inputs) to float64
round-off: tests/interop/test_hf.py checks outputs in float64 to 1e-10 and float32 to 1e-5, the
chosen experts and their weights, the round trip, and the balancing losses. What each family
computes is listed in moeplat.interop.hf_families. transformers is imported only here, lazily, by
to_hf; from_hf reads the block's attributes and never imports it.

Known differences, by design (documented rather than copied):

- Switch Transformers: transformers counts the fixed `expert_capacity` per sequence (each batch
  row its own queue); moeplat's capacity holds for the whole batch of tokens passed to the layer,
  as in the Switch paper (capacity = tokens per batch / E * capacity factor, sec. 2.2). For one
  sequence, or called per sequence, the two are equal; a [B, S, D] batch with B > 1 may drop more.
- Mixtral's `router_jitter_noise` multiplies the whole block input (so the experts see jittered
  activations too); moeplat's `jitter_eps` jitters the router input only (Switch sec. 2.4 /
  ST-MoE). Training only; evaluation is equal.
- transformers' `load_balancing_loss_func` (Mixtral, Qwen2-MoE, OLMoE) is K times moeplat's
  load_balancing loss (it divides the slot counts by T, moeplat by T * K so that balance is 1.0 for
  every K); `router_aux_loss_coef` is converted accordingly. For a model of several layers it pools
  the counts and probabilities of all layers before multiplying them, while moeplat sums per-layer
  losses: equal for one layer, not in general.
- DeepSeek-V3 adds 1e-20 to the normalising sum; moeplat does not (it changes nothing unless the K
  chosen sigmoid scores sum to below ~1e-13).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from moeplat.interop.hf_families import BLOCK_CLASSES, BLOCKS, build, weight_pairs
from moeplat.nn import MoELayer


def from_hf(
    block: nn.Module,
    *,
    router_aux_loss_coef: float = 0.0,
    router_z_loss_coef: float = 0.0,
    gamma: float = 0.0,
    dispatch: str = "sorted",
) -> MoELayer:
    """The moeplat MoELayer that computes what the transformers MoE `block` computes, with a copy
    of its weights (same dtype and device). It returns MoEOutput; `.y` is the block's output.

    router_aux_loss_coef / router_z_loss_coef: transformers' config values of those names; the
    layer's aux_loss then equals coef * transformers' loss for this one layer (Mixtral, Qwen2-MoE,
    OLMoE: balance_coef = coef * top_k; Switch: sequence_balance_coef = coef and z_loss_coef).
    gamma: DeepSeek-V3's aux-loss-free bias step; transformers never updates the bias, hence 0.
    dispatch: moeplat's dispatcher ("sorted" or the "loop" reference); both give the same output.
    """
    family = _family(block)
    layer = build(
        family,
        block,
        aux_coef=router_aux_loss_coef,
        z_coef=router_z_loss_coef,
        gamma=gamma,
        dispatch=dispatch,
    )
    ref = _reference_tensor(family, block)
    layer.to(device=ref.device, dtype=ref.dtype)
    _copy(weight_pairs(family, block, layer), to_moeplat=True)
    return layer.train(block.training)


def to_hf(layer: MoELayer, config) -> nn.Module:
    """The transformers MoE block that `config` describes (a MixtralConfig, Qwen2MoeConfig,
    OlmoeConfig, DeepseekV3Config or SwitchTransformersConfig) holding a copy of `layer`'s weights.

    The layer must have the structure the config describes (experts, top-k, sizes, activation,
    router options, shared experts, capacity); a mismatch is a ValueError naming each difference.
    The block gets the layer's dtype, device and training mode.
    """
    family = getattr(config, "model_type", None)
    if family not in BLOCK_CLASSES:
        raise ValueError(f"to_hf supports configs of {sorted(BLOCK_CLASSES)}, got model_type {family!r}")
    module, cls = BLOCK_CLASSES[family]
    block = getattr(importlib.import_module(module), cls)(config)
    # The block's structure as moeplat would convert it; gamma (moeplat-only) is taken from the layer.
    gamma = getattr(layer.router, "gamma", 0.0) if family == "deepseek_v3" else 0.0
    theirs = _structure(build(family, block, aux_coef=0.0, z_coef=0.0, gamma=gamma, dispatch=layer.dispatch))
    ours = _structure(layer)
    diff = [
        f"{key}: layer has {ours[key]}, config gives {theirs[key]}"
        for key in ours
        if ours[key] != theirs[key]
    ]
    if diff:
        raise ValueError(f"the layer does not match the {cls} this config describes:\n  " + "\n  ".join(diff))
    w = layer.experts.w_up
    block.to(device=w.device, dtype=w.dtype)
    _copy(weight_pairs(family, block, layer), to_moeplat=False)
    return block.train(layer.training)


def _family(block: nn.Module) -> str:
    name = type(block).__name__
    if name not in BLOCKS:
        raise ValueError(f"from_hf converts {sorted(BLOCKS)}, got {name}")
    return BLOCKS[name]


def _reference_tensor(family: str, block: nn.Module) -> torch.Tensor:
    """A tensor with the dtype and device the layer should get: the experts' (HF keeps DeepSeek-V3's
    router in float32 whatever the model's dtype; moeplat's router computes in float32 anyway)."""
    if family == "switch_transformers":
        return block.experts["expert_0"].wi.weight
    return block.experts.down_proj


def _structure(layer: MoELayer) -> dict[str, str]:
    """What decides the function a layer computes, apart from its weights (for to_hf's check)."""
    shared = "none"
    if layer.shared is not None:
        shared = f"hidden size {layer.shared.w_up.out_features}, activation {layer.shared.activation}"
    cf = (layer.capacity_factor_train, layer.capacity_factor_eval)
    return {
        "router": f"{type(layer.router).__name__}({layer.router.extra_repr()})",
        "experts": layer.experts.extra_repr(),
        "shared experts": shared,
        "shared gate": str(layer.shared_gate is not None),
        "residual coefficient": str(getattr(layer, "residual_coef", None) is not None),
        "capacity": f"factors {cf}, min_capacity {layer.min_capacity}, drop_policy {layer.drop_policy}",
    }


@torch.no_grad()
def _copy(pairs: list[tuple[str, torch.Tensor, torch.Tensor]], *, to_moeplat: bool) -> None:
    for name, hf, ours in pairs:
        if hf.shape != ours.shape:
            raise ValueError(f"{name}: transformers has shape {tuple(hf.shape)}, moeplat {tuple(ours.shape)}")
        if to_moeplat:
            ours.copy_(hf)
        else:
            hf.copy_(ours)
