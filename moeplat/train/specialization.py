"""Expert load per validation source, and the specialisation score it gives (moeplat.nn.specialization).

A run whose validation is split by source (a mixture: one validation set per source) counts, over
one validation pass, the token-slots each MoE layer routes to each expert from each source's
scored sequences; LMSystem logs the scores with the validation metrics and keeps the counts for
the heatmap (moeplat.track.specialization_plot, drawn by moeplat.train.plots.MoEPlots):

  moe/specialization                       mean over MoE layers of the layer scores (bits)
  moe/layerNN/specialization               layer NN's generalised Jensen-Shannon divergence (bits)
  moe/layerNN/load_entropy/<source>        entropy of the source's expert load in layer NN (bits)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeplat.nn.specialization import entropy_bits, source_distributions, specialization_bits


@dataclass(frozen=True)
class SourceLoad:
    """One validation pass's routed counts per source, MoE layer and expert (whole world's)."""

    step: int
    names: list[str]  # validation sources, in the datamodule's order
    layers: list[int]  # model layer index of each MoE layer
    counts_SLE: list[list[list[float]]]  # routed token-slots [source][layer][expert]
    scores: dict[int, float]  # layer -> specialisation in bits


class SourceRouting:
    """Accumulates MoEOutput.routed_E per (validation source, MoE layer) over a validation pass."""

    def __init__(self) -> None:
        self._counts: dict[tuple[int, int], torch.Tensor] = {}  # (source, layer) -> float64 [E]

    def add(self, source: int, moe: dict, scored: bool = True) -> None:
        """Add one batch's routed counts; `scored` False (a batch of padding only) adds zeros, so
        every rank holds the same (source, layer) cells for the all-reduce."""
        for layer, out in moe.items():
            if out.routed_E is None:
                continue
            routed_E = out.routed_E.detach().double()
            prev = self._counts.get((source, layer))
            routed_E = routed_E if scored else torch.zeros_like(routed_E)
            self._counts[(source, layer)] = routed_E if prev is None else prev + routed_E

    def counts(
        self, n_sources: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[list[int], torch.Tensor] | None:
        """(MoE layers, float64 counts [S, L, E] on CPU), summed over ranks by `reduce` (a sum
        all-reduce; None on one process or when routed_E is already the world's); None without
        MoE layers. A (source, layer) never seen counts zero."""
        layers = sorted({layer for _, layer in self._counts})
        if not layers:
            return None
        some = next(iter(self._counts.values()))
        counts_SLE = torch.zeros(
            n_sources, len(layers), some.numel(), dtype=torch.float64, device=some.device
        )
        for (source, layer), routed_E in self._counts.items():
            counts_SLE[source, layers.index(layer)] = routed_E
        if reduce is not None:
            counts_SLE = reduce(counts_SLE)
        return layers, counts_SLE.cpu()


def specialization_metrics(names: list[str], layers: list[int], counts_SLE: torch.Tensor) -> dict[str, float]:
    """The logged metrics of one validation pass (module doc); empty with fewer than two sources
    that routed anything (a single-source run logs none of this, not zeros)."""
    if len(names) < 2 or int((counts_SLE.sum(dim=(1, 2)) > 0).sum()) < 2:
        return {}
    metrics: dict[str, float] = {}
    for j, layer in enumerate(layers):
        counts_SE = counts_SLE[:, j]
        metrics[f"moe/layer{layer:02d}/specialization"] = specialization_bits(counts_SE)
        p_SE, _ = source_distributions(counts_SE)
        for name, n, h in zip(names, counts_SE.sum(dim=1).tolist(), entropy_bits(p_SE).tolist(), strict=True):
            if n > 0:
                metrics[f"moe/layer{layer:02d}/load_entropy/{name}"] = h
    scores = [metrics[f"moe/layer{layer:02d}/specialization"] for layer in layers]
    metrics["moe/specialization"] = sum(scores) / len(scores)
    return metrics


def source_load(step: int, names: list[str], layers: list[int], counts_SLE: torch.Tensor) -> SourceLoad:
    scores = {layer: specialization_bits(counts_SLE[:, j]) for j, layer in enumerate(layers)}
    return SourceLoad(step, list(names), list(layers), counts_SLE.tolist(), scores)
