"""Pruning under DDP: rank 0 decides and broadcasts, so every rank stops at the same step and
no rank is left waiting in a collective (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("ddp_prune_script.py")


def test_rank_zero_decides_and_every_rank_stops_at_the_same_step(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=180
    )  # a rank left training would hang at its next all-reduce: the timeout turns that into a failure
    assert out.returncode == 0, out.stderr[-2000:]
    ranks = [json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert {r["step"] for r in ranks} == {4}  # pruned at the first validation, not max_steps=40
    logs = [p.read_text().split("\n") for p in tmp_path.glob("*.log")]
    assert len(logs) == 1  # only one process (rank 0) ever talked to the trial
    assert logs[0][:2] == ["report 4", "should_prune"]
