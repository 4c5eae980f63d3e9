"""Workers against a live server (uvicorn in a thread): a real cancelled training run, SIGKILL
after the grace period, and a worker killed mid-job whose job is requeued and finished by another.

Where a test is about the worker's reaction to a misbehaving job, the job's "python" is a small
shell script (one that ignores SIGINT, one that just sleeps); the cancel test runs real training.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from resume_checks import assert_exact_history, trained_through, wait_until_past
from server_helpers import live_server, settings_for, spec_root, wait_for  # noqa: F401

from moeplat.server.worker import Worker


def _script(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def _mlflow_runs(db: Path) -> int:
    """Runs in the MLflow SQLite store, read-only: opening it with MLflow while the job's process
    creates its tables races on the table creation (MLflow's, seen as a 502 from /runs)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        return 0


def _job(url: str, job_id: int) -> dict:
    return httpx.get(f"{url}/api/jobs/{job_id}").json()


def _worker_thread(worker: Worker) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve, kwargs={"stop": stop}, daemon=True)
    thread.start()
    return thread, stop


def test_cancel_a_running_training_job(tmp_path, spec_root):  # noqa: F811
    s = settings_for(tmp_path)
    with live_server(s) as url:
        job = httpx.post(
            f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": ["train.max_steps=100000"]}
        ).json()
        worker = Worker(url, name="w-cancel", work_dir=tmp_path / "worker", poll_s=0.2, grace_s=30)
        thread, stop = _worker_thread(worker)
        try:  # the MLflow run exists once training has started
            wait_for(lambda: _mlflow_runs(tmp_path / "mlflow.db"), 120, 0.5, "the run")
            assert _job(url, job["id"])["state"] == "running"
            httpx.post(f"{url}/api/jobs/{job['id']}/cancel")
            done = wait_for(
                lambda: (j := _job(url, job["id"]))["state"] != "running" and j, 60, 0.3, "the end"
            )
        finally:
            stop.set()
            thread.join(timeout=60)
        log_tail = httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"][-4000:]
        # 130: the CLI's answer to SIGINT (not -9: the job did not ignore it until SIGKILL)
        assert done["state"] == "cancelled" and done["exit_code"] == 130, log_tail
        (run,) = MlflowClient(s.tracking_uri).search_runs(
            [MlflowClient(s.tracking_uri).get_experiment_by_name("tiny-tests").experiment_id],
            f"tags.`moeplat.job_id` = '{job['id']}'",
        )
        assert run.info.status == "KILLED"
        assert "interrupted" in httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"]


def test_sigkill_after_the_grace_period(tmp_path, spec_root):  # noqa: F811
    stubborn = _script(tmp_path, "stubborn", "trap '' INT\necho started\nsleep 60 & wait\nsleep 60")
    with live_server(settings_for(tmp_path)) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml"}).json()
        worker = Worker(
            url, name="w-kill", work_dir=tmp_path / "worker", poll_s=0.2, grace_s=1, python=stubborn
        )
        thread, stop = _worker_thread(worker)
        try:
            wait_for(lambda: "started" in httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"], 30)
            httpx.post(f"{url}/api/jobs/{job['id']}/cancel")
            done = wait_for(
                lambda: (j := _job(url, job["id"]))["state"] != "running" and j, 30, 0.2, "the kill"
            )
        finally:
            stop.set()
            thread.join(timeout=30)
        assert done["state"] == "cancelled" and done["exit_code"] == -signal.SIGKILL


def test_a_killed_worker_leaves_its_job_requeued_and_another_finishes_it(tmp_path, spec_root):  # noqa: F811
    sleeper = _script(tmp_path, "sleeper", "echo working\nexec sleep 30")
    ok = _script(tmp_path, "ok", 'echo "ran $*"')
    s = settings_for(tmp_path, heartbeat_timeout_s=2.0, reap_every_s=0.3)
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml"}).json()
        # a worker process whose job runs the sleeper (moeplat worker has no --python): kill -9 it mid-job
        code = (
            "from moeplat.server.worker import Worker;"
            f"Worker({url!r}, name='doomed', work_dir={str(tmp_path / 'doomed')!r}, poll_s=0.2,"
            f" python={sleeper!r}).serve()"
        )
        doomed = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(lambda: _job(url, job["id"])["worker"] == "doomed", 30, 0.2, "the claim")
            wait_for(lambda: "working" in httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"], 30)
            doomed.kill()
            requeued = wait_for(
                lambda: (j := _job(url, job["id"]))["state"] == "queued" and j, 30, 0.2, "requeue"
            )
            assert requeued["attempts"] == 1 and requeued["worker"] is None
        finally:
            doomed.kill()
            doomed.wait()
        rescuer = Worker(url, name="rescuer", work_dir=tmp_path / "rescuer", poll_s=0.2, python=ok)
        assert rescuer.serve(once=True) == 1
        done = _job(url, job["id"])
        assert done["state"] == "succeeded" and done["worker"] == "rescuer" and done["attempts"] == 2
        log = httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"]
        assert "worker doomed sent no heartbeat" in log
        assert f"ran -m moeplat.cli.main run {tmp_path}/rescuer/jobs/{job['id']}-2/tiny.yaml" in log
        assert f"--as-path {spec_root}/tiny.yaml" in log


def _job_processes(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (the job's own spec file path)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow
def test_a_killed_workers_training_job_resumes_from_its_checkpoint(tmp_path, spec_root, monkeypatch):  # noqa: F811
    """kill -9 of a worker while its job trains (past a step drawn from a seeded RNG): the job's
    run dies with it, the job is requeued, and a worker with the same work directory resumes it
    from its last checkpoint into the same MLflow run, whose history has each step once."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tiny model: more threads only contend
    max_steps, val_every = 24, 4
    overrides = [
        f"train.max_steps={max_steps}", "train.checkpoint_every=2", "train.log_every=1",
        f"train.val_every={val_every}", "data.val_tokens=128",
    ]  # fmt: skip
    kill_after = random.Random(15).randint(2, max_steps - 8)
    work = tmp_path / "worker"
    s = settings_for(tmp_path, heartbeat_timeout_s=2.0, reap_every_s=0.3)
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": overrides}).json()
        code = f"from moeplat.server.worker import Worker; Worker({url!r}, name='doomed', work_dir={str(work)!r}, poll_s=0.2).serve()"
        doomed = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            runs = work / "runs"  # the run directory: runs/job-<id>/tiny/<timestamp>
            run_dir = wait_until_past(
                lambda: list(runs.glob("**/tiny/*")), kill_after, lambda: doomed.poll() is None
            )
            doomed.kill()
            doomed.wait()
        finally:
            doomed.kill()
        # the run dies with its worker: it cannot race the attempt that resumes it
        marker = str(work / "jobs" / f"{job['id']}-1")
        wait_for(lambda: not _job_processes(marker), 30, 0.2, "the orphaned run to die")
        assert trained_through(run_dir) < max_steps - 1  # it did not train on to the end unwatched
        requeued = wait_for(
            lambda: (j := _job(url, job["id"]))["state"] == "queued" and j, 30, 0.2, "requeue"
        )
        assert requeued["attempts"] == 1
        rescuer = Worker(url, name="rescuer", work_dir=work, poll_s=0.2)
        assert rescuer.serve(once=True) == 1
        done = _job(url, job["id"])
        log = httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"]
    assert done["state"] == "succeeded" and done["attempts"] == 2, log[-3000:]
    resumed_at = int(re.search(r"resumed at step (\d+)", log).group(1))
    assert 2 <= resumed_at <= kill_after + 2 and resumed_at % 2 == 0, log[-3000:]
    client = MlflowClient(s.tracking_uri)
    exp = client.get_experiment_by_name("tiny-tests")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`moeplat.job_id` = '{job['id']}'")
    assert run.info.status == "FINISHED"
    assert_exact_history(client, run.info.run_id, max_steps, list(range(val_every - 1, max_steps, val_every)))


def test_a_requeued_job_resumes_where_its_earlier_attempt_left_its_runs(tmp_path):
    """The command a worker runs: each job has one runs directory for all its attempts; a run job
    resumes when an earlier attempt left a run there, a sweep job continues its study."""
    worker = Worker("http://127.0.0.1:9", name="w", work_dir=tmp_path)
    claim = {
        "job": {"id": 7, "kind": "run", "name": "tiny"},
        "attempt": 2,
        "filename": "tiny.yaml",
        "spec_root": str(tmp_path / "specs"),
        "overrides": ["train.max_steps=4"],
        "tracking_uri": "sqlite:///m.db",
        "sweep_storage": "sqlite:///o.db",
    }
    runs = tmp_path / "runs" / "job-7"
    cmd = worker.command(claim, tmp_path / "tiny.yaml")
    assert (
        cmd[cmd.index("--runs-dir") + 1] == str(runs) and "--resume" not in cmd
    )  # it died before its run began
    (runs / "tiny" / "20260101-000000-000000").mkdir(parents=True)
    (runs / "tiny" / "20260101-000000-000000" / "run.json").write_text("{}")
    assert worker.command(claim, tmp_path / "tiny.yaml")[-2:] == ["--resume", "last"]
    sweep = {**claim, "job": {**claim["job"], "kind": "sweep"}}
    assert worker.command(sweep, tmp_path / "s.yaml")[-1] == "--resume"
    assert "--resume" not in worker.command({**sweep, "attempt": 1}, tmp_path / "s.yaml")
