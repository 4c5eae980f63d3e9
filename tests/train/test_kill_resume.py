"""`kill -9` of `moeplat run` at a random step, then `--resume last`: the same MLflow run goes on,
FINISHED, with every metric step in its history exactly once (moeplat.track.logger holds a row until
a checkpoint covers its step). The step is drawn from a seeded RNG; the kill is sent once the run's
own metric journal shows it has trained past that step, so it lands anywhere between checkpoints."""

from __future__ import annotations

import json
import random
import signal

import pytest
from mlflow import MlflowClient
from parallel.cli_runs import finish, start_run  # tests/ is on sys.path (tests/conftest.py)
from resume_checks import assert_exact_history, newest_checkpoint_step, step_counts, wait_until_past

pytestmark = pytest.mark.slow
MAX_STEPS, VAL_EVERY = 24, 4
SETS = [
    f"train.max_steps={MAX_STEPS}",
    "train.checkpoint_every=2",
    "train.log_every=1",
    f"train.val_every={VAL_EVERY}",
    "data.val_tokens=128",
]


@pytest.fixture
def one_thread(monkeypatch):
    """The tiny model gains nothing from more threads; on a shared machine they slow it down."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("seed", [15, 2026])
def test_kill_9_at_a_random_step_then_resume_logs_every_step_once(tmp_path, one_thread, seed):
    kill_after = random.Random(seed).randint(2, MAX_STEPS - 8)
    proc = start_run(tmp_path, "k", SETS)
    try:
        run_dir = wait_until_past(
            lambda: list((tmp_path / "k" / "tiny").glob("*")), kill_after, lambda: proc.poll() is None
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'k'}.db")
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody closed it
    # nothing beyond the newest checkpoint reached MLflow: the resumed run logs those steps
    sent = step_counts(client, run_id).get("train/loss", {})
    assert max(sent, default=-1) < newest_checkpoint_step(run_dir), (sorted(sent), kill_after)

    out = finish(start_run(tmp_path, "k", SETS, "--resume", "last"), timeout=300)
    assert "resumed at step" in out
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    val_steps = list(range(VAL_EVERY - 1, MAX_STEPS, VAL_EVERY))
    assert_exact_history(client, run_id, MAX_STEPS, val_steps)


def test_a_finished_run_resumed_for_more_steps_logs_each_step_once(tmp_path, one_thread):
    """The first attempt ended by itself: it sent everything, its summary (perf/tokens_seen at its
    last step) included; the resumed attempt logs that step's loss but not the summary's metric again."""
    first = [s for s in SETS if not s.startswith("train.max_steps")] + ["train.max_steps=8"]
    finish(start_run(tmp_path, "f", first), timeout=300)
    out = finish(start_run(tmp_path, "f", SETS, "--resume", "last"), timeout=300)
    assert "resumed at step 8" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'f'}.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    assert run.info.status == "FINISHED"
    assert_exact_history(client, run.info.run_id, MAX_STEPS, list(range(VAL_EVERY - 1, MAX_STEPS, VAL_EVERY)))
