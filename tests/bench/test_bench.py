"""`moeplat bench` smoke tests: the table and the JSON have every candidate and ratio. No timing
assertions (house rule: speed is shown by benchmarks that print ratios, never by timed asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeplat.cli.main import main

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
QUICK = [
    "bench",
    "--grid",
    "quick",
    "--tokens",
    "64",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--no-memory",
    "--no-step",
    "--no-data",
    "--no-generate",
    "--no-e2e",
]
MOEPLAT = {"moeplat:loop", "moeplat:sorted", "moeplat:capacity"}


def test_bench_json_has_every_candidate_with_ratios(capsys):
    assert main([*QUICK, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and "step" not in result
    by_point: dict[str, dict] = {}
    for row in result["layers"]:
        by_point.setdefault(row["point"], {})[row["candidate"]] = row
    assert len(by_point) == 2
    for point, rows in by_point.items():
        assert "T=64" in point
        family = "mixtral" if "S=" not in point else "qwen2_moe"
        assert set(rows) == {"dense", f"hf:{family}:eager", f"hf:{family}:grouped_mm", *MOEPLAT}
        assert rows["dense"]["vs_dense"] is None
        for name in MOEPLAT:
            r = rows[name]
            assert r["median_ms"] > 0 and len(r["times_ms"]) == 1
            assert r["vs_dense"] == pytest.approx(r["median_ms"] / rows["dense"]["median_ms"])
            best_hf = min(rows[n]["median_ms"] for n in rows if n.startswith("hf:"))
            assert r["hf_over_this"] == pytest.approx(best_hf / r["median_ms"])
            assert r["peak_mib"] is None or r["peak_mib"] > 0
        assert "dropped" in rows["moeplat:capacity"]["note"]  # drops are reported, never silent


def test_bench_table_and_spec_option(capsys):
    assert main([*QUICK, "--spec", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "== d=32 f=32 E=4 k=2 T=64  float32" in out
    for name in ("dense", "hf:mixtral:eager", "moeplat:sorted", "moeplat:capacity", "/dense", "hf/this"):
        assert name in out


@pytest.mark.slow
def test_step_overhead_and_validate_time_are_reported(capsys):
    argv = [*(a for a in QUICK if a != "--no-step"), "--step-spec", str(TINY), "--steps", "2", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    step = result["step"]
    for key in ("plain_s_per_step", "lightning_s_per_step", "tracked_s_per_step"):
        assert step[key] > 0
    assert step["lightning_overhead"] == pytest.approx(
        step["lightning_s_per_step"] / step["plain_s_per_step"] - 1
    )
    assert result["validate_s"] > 0
