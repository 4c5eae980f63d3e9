"""For the kill -9 tests (a run, a sweep trial, a server job): wait until a run has trained past a
step, by the metric rows its logger journals as they are logged (moeplat.track.logger), and check an
MLflow metric history is exact."""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from pathlib import Path

from moeplat.train.run import METRICS_JOURNAL

# logged at every step with train.log_every=1 (moe/*: moe_log_every defaults to log_every)
PER_STEP = (
    "train/loss",
    "train/aux_loss",
    "train/lr",
    "perf/tokens_per_s",
    "perf/flops_per_s",
    "moe/all/maxvio",
    "moe/layer00/load/e00",
    "moe/layer01/dropped_frac",
)


def trained_through(run_dir: Path) -> int:
    """The highest step whose train/loss the run in `run_dir` has logged (-1 before the first)."""
    try:
        lines = (run_dir / METRICS_JOURNAL).read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = [row[2] for line in lines if line.strip() for row in [json.loads(line)] if row[0] == "train/loss"]
    return max(steps, default=-1)


def wait_until_past(
    run_dirs: Callable[[], list[Path]], step: int, alive: Callable[[], bool], timeout_s: float = 180
) -> Path:
    """Poll until one of `run_dirs()` has logged train/loss beyond `step`; that run directory.
    Fails if `alive()` turns false first (the run ended before it could be killed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert alive(), f"the run ended before it passed step {step}"
        for d in run_dirs():
            if trained_through(d) > step:
                return d
        time.sleep(0.02)
    raise AssertionError(f"no run passed step {step} within {timeout_s}s")


def newest_checkpoint_step(run_dir: Path) -> int:
    """The step of the newest per-step checkpoint file (train.checkpoint_every), 0 if none."""
    return max(
        (int(p.stem.removeprefix("step")) for p in (run_dir / "checkpoints").glob("step*.ckpt")), default=0
    )


def step_counts(client, run_id: str) -> dict[str, collections.Counter]:
    """Metric key -> how many rows the MLflow history has at each step."""
    keys = client.get_run(run_id).data.metrics
    return {k: collections.Counter(m.step for m in client.get_metric_history(run_id, k)) for k in keys}


def assert_exact_history(client, run_id: str, max_steps: int, val_steps: list[int]) -> None:
    """Every metric has each of its steps once; the per-step ones every step of the run."""
    counts = step_counts(client, run_id)
    twice = {k: sorted(s for s, n in c.items() if n > 1) for k, c in counts.items()}
    assert not any(twice.values()), {k: v for k, v in twice.items() if v}
    for key in PER_STEP:
        assert sorted(counts[key]) == list(range(max_steps)), key
    assert sorted(counts["val/loss"]) == sorted(counts["val/ppl"]) == val_steps
    assert sorted(counts["perf/tokens_seen"]) == list(range(max_steps + 1))  # the summary at the end
