"""scripts/gpu-check.sh: its CPU dry run goes through every step and writes its figures back
(issue 20, part 4); without a usable environment it says how to make one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["env", "bench", "dispatch", "eager", "compile", "runs", "parallel"]


def _run(out: Path, python: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MOEPLAT_VENV", "RANK", "LOCAL_RANK")}
    env["MOEPLAT_PYTHON"] = python
    return subprocess.run(
        [str(SCRIPT), *args, str(out)], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_without_moeplat_it_says_how_to_install(tmp_path):
    proc = _run(tmp_path / "out", "/bin/false")
    assert proc.returncode == 2
    assert "install-locked.sh" in proc.stderr and "MOEPLAT_VENV" in proc.stderr


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_its_figures(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, sys.executable, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"python {sys.executable} (MOEPLAT_PYTHON)" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == STEPS
    assert all(s["status"] == "ok" for s in results["steps"]), results["steps"]
    assert results["env"]["device"] == "cpu" and set(results["env"]["grouped_mm"]) == {"bfloat16", "float32"}
    assert results["dispatch"]["ok"] and results["dispatch"]["float32"]["max_rel_diff"] <= 1e-4
    bench = results["bench"]
    assert {r["candidate"] for r in bench["layers"]} >= {"dense", "moeplat:sorted"}
    (memory,) = bench["memory"]
    assert memory["spec"] == "tiny" and 0.75 <= memory["ratio"] <= 1.25
    assert bench["e2e"]["rows"][0]["candidate"] == "moeplat:moe" and bench["e2e"]["batch"] == [4, 32]
    runs = results["runs"]
    for name in ("eager", "compile"):
        assert runs[name]["status"] == "FINISHED" and runs[name]["tokens_per_s_median"] > 0
        assert len(runs[name]["train_loss"]) == 3  # 6 steps, logged every 2
    assert runs["compile_over_eager_tokens_per_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert "compile / eager tokens/s" in summary and "plan / measured memory" in summary
    assert "TORCH_COMPILE_DISABLE" in summary  # the dry run says it did not compile
