"""The expert-specialisation heatmap, from plain numbers (no torch): plots/specialization.png of a
run whose validation is split by source (a mixture).

One panel per MoE layer: sources (rows) x experts (columns), each cell the share of the source's
routed token-slots that went to the expert (rows sum to 1), on one colour scale for all panels;
each panel's title carries the layer's specialisation score (generalised Jensen-Shannon divergence
of the rows, in bits: moeplat.nn.specialization). Rows that look alike mean the sources share the
experts; bright cells in different columns per row mean experts specialised by source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILE = "specialization.png"


def load_shares(counts_SE) -> np.ndarray:
    """Each source's share of its routed slots per expert (a row of zeros for a source with none)."""
    counts_SE = np.asarray(counts_SE, dtype=np.float64)
    n_S = counts_SE.sum(axis=1, keepdims=True)
    return np.divide(counts_SE, n_S, out=np.zeros_like(counts_SE), where=n_S > 0)


def render_specialization(
    names: list[str],
    layers: list[int],
    counts_SLE,
    scores: dict[int, float],
    step: int,
    out_dir: str | Path,
) -> Path:
    """Write out_dir/specialization.png (module doc) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    counts_SLE = np.asarray(counts_SLE, dtype=np.float64)
    shares = [load_shares(counts_SLE[:, j]) for j in range(len(layers))]
    vmax = max(float(s.max()) for s in shares) or 1.0
    E, cols = counts_SLE.shape[2], min(2, len(layers))
    rows = -(-len(layers) // cols)
    panel_w, panel_h = max(4.0, 0.3 * E + 2.0), max(2.2, 0.35 * len(names) + 1.2)
    size = (panel_w * cols + 1.2, panel_h * rows + 0.8)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    for ax, layer, share_SE in zip(axes.flat, layers, shares, strict=False):
        im = ax.imshow(share_SE, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"MoE layer {layer}: JSD = {scores[layer]:.3g} bits", fontsize="medium")
        ax.set_yticks(range(len(names)), names)
        ticks = range(0, E, max(1, E // 16))  # at most ~16 labels
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
        ax.set_xlabel("expert")
    mean = sum(scores.values()) / max(1, len(scores))
    fig.suptitle(f"Expert load by validation source after {step} steps (mean specialisation {mean:.3g} bits)")
    fig.colorbar(im, ax=axes.ravel().tolist(), label=f"share of the source's slots (even: 1/{E})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
