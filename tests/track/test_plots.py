"""MoE telemetry plots from plain numbers: bounded history and readable PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from moeplat.track.plots import TelemetryHistory, render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(step: int, experts: dict[int, int]) -> dict[str, float]:
    """moe_metrics-style names; layer 1 sends everything to expert (step mod E)."""
    m = {}
    for layer, n in experts.items():
        for e in range(n):
            hot = layer == 1 and e == step % n
            m[f"moe/layer{layer:02d}/load/e{e:02d}"] = (1.0 if hot else 0.0) if layer == 1 else 1.0 / n
        m[f"moe/layer{layer:02d}/dropped_frac"] = 0.01 * step
        m[f"moe/layer{layer:02d}/router_entropy"] = 1.0 + layer
        m[f"moe/layer{layer:02d}/maxvio"] = 0.5  # other names are ignored
    m["moe/all/maxvio"] = 0.5
    return m


def test_history_keeps_loads_and_scalars_per_layer():
    h = TelemetryHistory()
    for step in (0, 5, 10):
        h.add(step, _metrics(step, {1: 4, 3: 8}))
    h.add(15, {"train/loss": 1.0})  # no MoE telemetry: not a point
    assert h.steps == [0, 5, 10] and h.layers == [1, 3]
    load_SE = h.load_SE(1)
    assert load_SE.shape == (3, 4)
    assert load_SE[1].tolist() == [0.0, 1.0, 0.0, 0.0]  # step 5 -> expert 1
    np.testing.assert_allclose(h.load_SE(3), np.full((3, 8), 1 / 8))
    np.testing.assert_allclose(h.series("dropped_frac", 3), [0.0, 0.05, 0.1])
    np.testing.assert_allclose(h.series("router_entropy", 1), [2.0, 2.0, 2.0])


def test_history_is_bounded_and_still_spans_the_run():
    h = TelemetryHistory(max_points=8)
    for step in range(0, 1000, 10):  # 100 logged steps
        h.add(step, _metrics(step, {0: 2}))
        assert len(h) <= 8
    assert h.steps[0] == 0 and h.steps[-1] >= 1000 - 10 * h.stride
    assert h.steps == sorted(h.steps) and len(set(np.diff(h.steps))) == 1  # evenly spaced
    assert len(h) >= 4


def test_history_rejects_a_useless_bound():
    with pytest.raises(AssertionError):
        TelemetryHistory(max_points=1)


def test_render_writes_readable_pngs(tmp_path):
    h = TelemetryHistory()
    for step in range(0, 40, 4):
        h.add(step, _metrics(step, {1: 4, 3: 8}))  # layers of different widths (pyramid MoE)
    files = render(h, tmp_path / "plots")
    names = sorted(f.name for f in files)
    assert names == [
        "dropped_frac.png",
        "load_heatmap_layers.png",
        "load_over_steps_layer01.png",
        "load_over_steps_layer03.png",
        "router_entropy.png",
    ]
    for f in files:
        assert f.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = imread(f).shape
        assert 200 <= height <= 2000 and 400 <= width <= 3000, (f.name, height, width)
        img = imread(f)[..., :3]
        assert img.std() > 0.05, f"{f.name} is blank"


def test_render_of_nothing_writes_nothing(tmp_path):
    assert render(TelemetryHistory(), tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def test_render_of_a_single_step(tmp_path):
    h = TelemetryHistory()
    h.add(0, _metrics(0, {0: 4}))
    files = render(h, tmp_path)
    assert len(files) == 4 and all(f.read_bytes()[:8] == PNG_SIGNATURE for f in files)
