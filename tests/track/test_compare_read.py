"""The pure parts of moeplat.track.compare, and its refusal to create a store it only reads."""

from __future__ import annotations

import pytest

from moeplat.track.compare import CompareError, RunData, _final_load, compare, differing_params, key_metrics


def _run(params: dict, metrics: dict | None = None, curves: dict | None = None) -> RunData:
    return RunData("0123456789ab", "r", "e", "FINISHED", params, {}, metrics or {}, curves or {}, [], [])


def test_differing_params_keeps_only_differences_and_missing_keys():
    a = _run({"model.moe.top_k": "2", "model.d_model": "32", "model.moe.router.normalize": "True"})
    b = _run({"model.moe.top_k": "1", "model.d_model": "32"})
    assert differing_params([a, b]) == {
        "model.moe.router.normalize": ["True", None],
        "model.moe.top_k": ["2", "1"],
    }
    assert differing_params([a]) == {}


def test_key_metrics_last_best_and_last_step():
    r = _run(
        {},
        metrics={"val/loss": 3.0, "train/loss": 2.5},
        curves={"val/loss": [(3, 2.8), (6, 3.0)], "train/loss": [(2, 4.0), (5, 2.5)]},
    )
    m = key_metrics([r])
    assert m["val/loss (final)"] == [3.0] and m["val/loss (best)"] == [2.8]
    assert m["train/loss (final)"] == [2.5] and m["last logged step"] == [6.0]
    assert "perf/tokens_per_s (last)" not in m  # rows no run has are left out


def test_key_metrics_has_a_row_per_eval_score_any_run_has():
    a = _run({}, metrics={"val/loss": 3.0, "eval/mc/acc": 0.5, "eval/mc/acc_stderr": 0.1})
    b = _run({}, metrics={"val/loss": 2.0, "eval/ppl/bits_per_byte": 4.2, "eval/gen/em_stderr/strict": 0.2})
    m = key_metrics([a, b])
    eval_rows = [k for k in m if k.startswith("eval/")]
    assert eval_rows == ["eval/mc/acc", "eval/ppl/bits_per_byte"]  # sorted, no standard errors
    assert m["eval/mc/acc"] == [0.5, None] and m["eval/ppl/bits_per_byte"] == [None, 4.2]
    assert list(m)[-2:] == eval_rows  # after the training metrics


def test_final_load_is_layer_by_expert_with_gaps_in_layers():
    metrics = {
        "moe/layer01/load/e00": 0.25,
        "moe/layer01/load/e01": 0.75,
        "moe/layer03/load/e00": 0.5,
        "moe/layer03/load/e01": 0.5,
        "moe/layer01/maxvio": 0.5,
    }
    assert _final_load(metrics) == ([[0.25, 0.75], [0.5, 0.5]], [1, 3])


def test_a_missing_sqlite_store_is_an_error_not_created(tmp_path):
    db = tmp_path / "absent.db"
    with pytest.raises(CompareError, match="no MLflow store"):
        compare(f"sqlite:///{db}", run_ids=["x"])
    assert not db.exists()
