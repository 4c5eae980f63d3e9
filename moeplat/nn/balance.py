"""Global-batch load balancing (Qiu et al. 2025, "Demons in the Detail: On Implementing Load
Balancing Loss for Training Specialized Mixture-of-Expert Models", eq. 3-4): the Switch loss
E * sum_i f_i * P_i with the expert frequencies f_i of the whole optimizer step -- every
data-parallel rank, every gradient-accumulation micro-batch -- and P_i of the micro-batch.

Why this is exact. f carries no gradient and the loss is linear in P given f, so with f the
step's frequencies the mean over micro-batches and ranks of E * sum_i f_i P_i^mb is the loss of
one process on the whole batch (equal-sized micro-batches), and so are its gradients. The only
difficulty is knowing f before the first backward of the step:

- one micro-batch per step (train.grad_accum = 1): f is this micro-batch's counts summed over the
  ranks (one all-reduce of E numbers per layer), taken inside the forward (StepLoad with
  `reduce`);
- several micro-batches: the later ones have not been routed when the first one's backward runs,
  so `count_step_load` routes all of them first, in a forward pass without gradients (the
  "routing pre-pass", about one more forward per micro-batch), and fixes f for the step.

Megatron-Core (0.13+, `moe_router_load_balancing_type: global_aux_loss`, router.py
`_apply_global_aux_loss`) instead all-reduces each micro-batch's counts over the data-parallel
group, adds them to a buffer reset at the end of the step, and uses the running mean of the
micro-batches seen so far: no extra forward, but micro-batch m's P meets only f of micro-batches
1..m, so its gradient is not the whole batch's. Ours costs the pre-pass and is exact.

Activation checkpointing: nothing here accumulates inside the model's forward. The pre-pass runs
without gradients (no checkpointing, no recomputation); with `reduce`, a layer's f is reduced
once per StepLoad and cached, so a recomputed forward reads the same f without a second count
or collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class StepLoad:
    """The expert frequencies f_E (fractions summing to 1) of one optimizer step, per MoE layer.

    `fixed`: layer index -> f_E, known up front (count_step_load). Otherwise a layer's f is its
    first micro-batch's routed counts, summed over the ranks by `reduce` (None: this process is
    the whole batch), normalised, and kept: a recomputed forward gets the same tensor.
    """

    def __init__(
        self,
        fixed: dict[int, torch.Tensor] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self._load_E: dict[int, torch.Tensor] = dict(fixed or {})
        self.reduce = reduce

    def of(self, layer: int, routed_E: torch.Tensor) -> torch.Tensor:
        """f_E of MoE layer `layer` (block index); `routed_E`: its routed counts in this forward."""
        if layer not in self._load_E:
            counts_E = routed_E.detach().float()
            if self.reduce is not None:
                counts_E = self.reduce(counts_E.clone())
            self._load_E[layer] = counts_E / counts_E.sum().clamp_min(1)
        return self._load_E[layer]

    def layer(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """What a layer's forward takes as `step_load`: routed counts [E] -> the step's f_E."""
        return lambda routed_E: self.of(layer, routed_E)

    @property
    def layers(self) -> dict[int, torch.Tensor]:
        return dict(self._load_E)


@torch.no_grad()
def count_step_load(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepLoad:
    """The routing pre-pass: f_E per MoE layer over all of a step's micro-batches `inputs` (token
    ids [B, S] each, in the order they will be trained), summed over the ranks by `reduce`.

    `model` (a TransformerLM) runs in its current mode without gradients. The random state is
    restored afterwards, so the training forwards draw exactly what the pre-pass drew: with
    dropout, jitter or sampled routing the pre-pass routes micro-batch m as its training forward
    will, because between training forwards nothing else draws (a checkpointed block replays its
    own state in backward). Routers with online state change only after the optimizer step.
    """
    device = next(model.parameters()).device
    counts: dict[int, torch.Tensor] = {}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        for idx_BS in inputs:
            for layer, out in model(idx_BS, stats=False).moe.items():  # routed_E only
                counts[layer] = counts[layer] + out.routed_E if layer in counts else out.routed_E.clone()
    fixed = {}
    for layer, counts_E in sorted(counts.items()):
        counts_E = counts_E.float() if reduce is None else reduce(counts_E.float())
        fixed[layer] = counts_E / counts_E.sum().clamp_min(1)
    return StepLoad(fixed)
