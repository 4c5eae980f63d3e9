"""Workers against a live server (uvicorn in a thread): a real cancelled training run, SIGKILL
after the grace period, and a worker killed mid-job whose job is requeued and finished by another.

Where a test is about the worker's reaction to a misbehaving job, the job's "python" is a small
shell script (one that ignores SIGINT, one that just sleeps); the cancel test runs real training.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from mlflow import MlflowClient
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
