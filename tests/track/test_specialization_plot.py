"""plots/specialization.png from plain numbers: each source's share of its routed slots per expert."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from moeplat.track.specialization_plot import load_shares, render_specialization


def test_load_shares_are_each_sources_row_fractions():
    got = load_shares([[2, 1, 1], [0, 2, 2], [0, 0, 0]])
    assert got.tolist() == [[0.5, 0.25, 0.25], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("n_layers", [1, 3])
def test_one_panel_per_layer_in_one_png(tmp_path, n_layers):
    counts_SLE = np.arange(2 * n_layers * 8, dtype=float).reshape(2, n_layers, 8)
    scores = {2 * i: 0.1 * i for i in range(n_layers)}
    path = render_specialization(["code", "prose"], list(scores), counts_SLE, scores, 7, tmp_path)
    assert path == tmp_path / "specialization.png"
    height, width, _ = imread(path).shape
    assert width > 300 and height > 150
