"""`moeplat compare` rows of expert specialisation: the mean for runs that have it, per layer while short."""

from __future__ import annotations

from moeplat.track.compare import MAX_LAYER_ROWS, RunData, key_metrics


def _run(metrics: dict) -> RunData:
    return RunData("0123456789ab", "r", "e", "FINISHED", {}, {}, metrics, {}, [], [])


def test_the_score_and_its_layers_are_rows_only_runs_with_it_fill():
    mixed = _run({"val/loss": 3.0, "moe/specialization": 0.25, "moe/layer01/specialization": 0.5})
    mixed_too = _run({"val/loss": 3.1, "moe/specialization": 0.125, "moe/layer00/specialization": 0.125})
    single = _run({"val/loss": 2.0})
    m = key_metrics([mixed, mixed_too, single])
    assert m["moe/specialization (last)"] == [0.25, 0.125, None]
    assert m["moe/layer00/specialization"] == [None, 0.125, None]
    assert m["moe/layer01/specialization"] == [0.5, None, None]
    assert not [k for k in key_metrics([single]) if "specialization" in k]


def test_a_deep_model_shows_the_mean_only():
    deep = {f"moe/layer{i:02d}/specialization": 0.1 for i in range(MAX_LAYER_ROWS + 1)}
    m = key_metrics([_run({"moe/specialization": 0.1, **deep})])
    assert [k for k in m if "specialization" in k] == ["moe/specialization (last)"]
