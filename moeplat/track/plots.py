"""MoE telemetry plots as PNG files, from plain numbers (no torch): what the run's MLflow page shows
under plots/.

`TelemetryHistory` keeps the moe/layerNN/* metrics of the logged steps in memory, bounded: past
`max_points` steps it keeps every other one (the stride doubles), so a long run costs a fixed
amount of memory and its plots still span the whole run. `render` writes

  load_heatmap_layers.png         layer x expert: mean load fraction over the last `window` points
  load_over_steps_layerNN.png     expert x step, one per MoE layer
  dropped_frac.png                dropped fraction of routed slots per layer, over steps
  router_entropy.png              router entropy per layer, over steps
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_LOAD = re.compile(r"^moe/layer(\d+)/load/e(\d+)$")
_SCALAR = re.compile(r"^moe/layer(\d+)/(dropped_frac|router_entropy)$")


class TelemetryHistory:
    """Per-step MoE telemetry: load fraction per (layer, expert), dropped fraction and router entropy
    per layer, for at most `max_points` steps spread over the run."""

    def __init__(self, max_points: int = 256):
        assert max_points >= 2, max_points
        self.max_points = max_points
        self.stride = 1  # keep steps whose index among the added ones is a multiple of this
        self._seen = 0
        self.steps: list[int] = []
        self.loads: list[dict[int, list[float]]] = []  # per point: layer -> load_E
        self.scalars: list[dict[str, dict[int, float]]] = []  # per point: name -> layer -> value

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Record the moe/layerNN/* metrics of one step (moeplat.nn.stats.moe_metrics names)."""
        seen, self._seen = self._seen, self._seen + 1
        if seen % self.stride:
            return
        loads: dict[int, dict[int, float]] = {}
        scalars: dict[str, dict[int, float]] = {}
        for key, value in metrics.items():
            if m := _LOAD.match(key):
                loads.setdefault(int(m[1]), {})[int(m[2])] = float(value)
            elif m := _SCALAR.match(key):
                scalars.setdefault(m[2], {})[int(m[1])] = float(value)
        if not loads:
            return
        self.steps.append(step)
        self.loads.append({layer: [e_v[e] for e in sorted(e_v)] for layer, e_v in loads.items()})
        self.scalars.append(scalars)
        if len(self.steps) > self.max_points:  # halve: keep every other point, and add half as often
            self.steps, self.loads, self.scalars = self.steps[::2], self.loads[::2], self.scalars[::2]
            self.stride *= 2

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for point in self.loads for layer in point})

    def load_SE(self, layer: int) -> np.ndarray:
        """Load fractions of one layer, steps x experts (NaN where the layer was not logged)."""
        width = max(len(p.get(layer, ())) for p in self.loads)
        out = np.full((len(self.loads), width), np.nan)
        for i, point in enumerate(self.loads):
            row = point.get(layer, [])
            out[i, : len(row)] = row
        return out

    def series(self, name: str, layer: int) -> np.ndarray:
        return np.array([p.get(name, {}).get(layer, np.nan) for p in self.scalars])


def render(history: TelemetryHistory, out_dir: str | Path, window: int = 10) -> list[Path]:
    """Write the plots of `history` into `out_dir`; returns the files written (none if empty)."""
    if not len(history):
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (also on headless cluster nodes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_layer_heatmap(history, out / "load_heatmap_layers.png", window)]
    for layer in history.layers:
        written.append(_steps_heatmap(history, layer, out / f"load_over_steps_layer{layer:02d}.png"))
    for name, label in (
        ("dropped_frac", "dropped fraction of routed slots"),
        ("router_entropy", "router entropy (nats)"),
    ):
        written.append(_curves(history, name, label, out / f"{name}.png"))
    return written


def _layer_heatmap(history: TelemetryHistory, path: Path, window: int) -> Path:
    import matplotlib.pyplot as plt

    layers = history.layers
    rows = [np.nanmean(history.load_SE(layer)[-window:], axis=0) for layer in layers]
    width = max(len(r) for r in rows)
    grid_LE = np.full((len(layers), width), np.nan)
    for i, r in enumerate(rows):
        grid_LE[i, : len(r)] = r
    n = min(window, len(history))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * width + 3.0), max(3.2, 0.4 * len(layers) + 2.0)))
    im = ax.imshow(grid_LE, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_title(
        f"Expert load by MoE layer\n(mean of the last {n} logged steps, to step {history.steps[-1]})"
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    _expert_ticks(ax, width, axis="x")
    fig.colorbar(im, ax=ax, label=f"load fraction (uniform = 1/{width})")
    return _save(fig, path)


def _steps_heatmap(history: TelemetryHistory, layer: int, path: Path) -> Path:
    import matplotlib.pyplot as plt

    load_ES = history.load_SE(layer).T
    steps = history.steps
    fig, ax = plt.subplots(figsize=(8.0, max(2.5, 0.25 * load_ES.shape[0] + 1.5)))
    half = max(0.5, (steps[-1] - steps[0]) / max(1, 2 * (len(steps) - 1)))  # cells centred on steps
    extent = (steps[0] - half, steps[-1] + half, load_ES.shape[0] - 0.5, -0.5)
    im = ax.imshow(load_ES, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest", extent=extent)
    ax.set_title(f"Expert load over training, MoE layer {layer}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("expert")
    _expert_ticks(ax, load_ES.shape[0], axis="y")
    fig.colorbar(im, ax=ax, label=f"load fraction (uniform = 1/{load_ES.shape[0]})")
    return _save(fig, path)


def _curves(history: TelemetryHistory, name: str, label: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for layer in history.layers:
        ax.plot(history.steps, history.series(name, layer), label=f"layer {layer}", linewidth=1.2)
    ax.set_title(label[0].upper() + label[1:] + " per MoE layer")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if len(history.layers) <= 12:
        ax.legend(fontsize="small", ncol=2 if len(history.layers) > 6 else 1)
    return _save(fig, path)


def _expert_ticks(ax, n: int, axis: str) -> None:
    ticks = range(0, n, max(1, n // 16))  # at most ~16 labels, readable for 64+ experts
    (ax.set_xticks if axis == "x" else ax.set_yticks)(list(ticks), [str(t) for t in ticks])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
