"""End to end, as a user runs it: `moeplat serve` and `moeplat worker` as processes, the tiny spec
submitted with `moeplat submit --follow`, a real training run tagged in MLflow with the job id.

Two topologies: everything local (SQLite jobs DB, SQLite MLflow store), and the team one (jobs DB
on PostgreSQL, a real `mlflow server` on PostgreSQL, token auth on a non-loopback address).
The job latency from submit to start is printed (run with -s to see it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from postgres import postgres_url  # noqa: F401  (session fixture)
from server_helpers import free_port, wait_for, write_root

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MOEPLAT, MLFLOW = str(BIN / "moeplat"), str(BIN / "mlflow")


class Proc:
    """A subprocess in its own process group, its output in a file, killed with its children."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, env: dict | None = None):
        self.log = log
        with log.open("w") as out:
            self.p = subprocess.Popen(
                cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()


def _up(url: str, proc: Proc, timeout_s: float = 90) -> None:
    def healthy() -> bool:
        assert proc.alive(), proc.log.read_text()[-3000:]
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout_s, 0.2, url)


def _submit_and_follow(tmp: Path, url: str, env: dict) -> tuple[int, str, float]:
    t0 = time.time()
    out = subprocess.run(
        [MOEPLAT, "submit", "specs/tiny.yaml", "--server", url, "--follow", "--set", "train.max_steps=6"],
        cwd=tmp, capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = int(out.stdout.split()[1])  # "job N queued (run tiny)"
    return job_id, out.stdout, t0


def _check_job(url: str, job_id: int, tracking_uri: str, headers: dict, label: str) -> None:
    job = httpx.get(f"{url}/api/jobs/{job_id}", headers=headers).json()
    assert job["state"] == "succeeded" and job["exit_code"] == 0 and job["attempts"] == 1
    latency = datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(job["created_at"])
    print(f"\n[{label}] job {job_id}: submit -> start latency {latency.total_seconds():.3f} s")
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("tiny-tests")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`moeplat.job_id` = '{job_id}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6"
    runs = httpx.get(f"{url}/api/jobs/{job_id}/runs", headers=headers).json()["runs"]
    assert [r["run_id"] for r in runs] == [run.info.run_id]


def test_local_serve_worker_submit_follow(tmp_path):
    write_root(tmp_path / "specs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MOEPLAT_TOKEN": ""}
    server = Proc([MOEPLAT, "serve", "--port", str(port)], tmp_path, tmp_path / "serve.log", env)
    worker = None
    try:
        _up(f"{url}/api/health", server)
        worker = Proc(
            [MOEPLAT, "worker", "--server", url, "--poll", "0.2"], tmp_path, tmp_path / "w.log", env
        )
        job_id, out, _ = _submit_and_follow(tmp_path, url, env)
        assert f"job {job_id} succeeded" in out and "run finished: tiny" in out
        assert (tmp_path / "moeplat-jobs.db").is_file()  # the default SQLite jobs DB, in the cwd
        _check_job(url, job_id, env["MLFLOW_TRACKING_URI"], {}, "local")
        listing = subprocess.run(
            [MOEPLAT, "jobs", "--server", url], capture_output=True, text=True, timeout=60
        )
        assert f"{job_id}  succeeded" in listing.stdout
    finally:
        for p in (worker, server):
            if p:
                p.stop()


def _create_database(pg_url: str, name: str) -> str:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(pg_url)
    conn = psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return u.set(database=name).render_as_string(hide_password=False)


def test_team_topology_postgres_and_mlflow_server(tmp_path, postgres_url):  # noqa: F811
    write_root(tmp_path / "specs")
    jobs_db = _create_database(postgres_url, "moeplat_jobs_e2e")
    mlflow_db = _create_database(postgres_url, "moeplat_mlflow_e2e")
    mlflow_port, port = free_port(), free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    mlflow = Proc(
        [MLFLOW, "server", "--backend-store-uri", mlflow_db, "--artifacts-destination",
         (tmp_path / "artifacts").as_uri(), "--serve-artifacts", "--host", "127.0.0.1",
         "--port", str(mlflow_port), "--workers", "1"],
        tmp_path, tmp_path / "mlflow.log",
    )  # fmt: skip
    token = "team-token"
    env = {"MOEPLAT_TOKEN": token, "MLFLOW_TRACKING_URI": tracking, "MOEPLAT_DB_URL": jobs_db}
    # beyond loopback (all interfaces), so the token is required; clients use 127.0.0.1
    server = Proc(
        [MOEPLAT, "serve", "--host", "0.0.0.0", "--port", str(port)], tmp_path, tmp_path / "s.log", env
    )
    url = f"http://127.0.0.1:{port}"
    worker = None
    try:
        _up(f"{tracking}/health", mlflow, 120)
        _up(f"{url}/api/health", server)
        assert httpx.get(f"{url}/api/jobs").status_code == 401
        worker_dir = tmp_path / "elsewhere"  # the worker's own directory, as on another machine
        worker_dir.mkdir()
        worker = Proc(
            [MOEPLAT, "worker", "--server", url, "--poll", "0.2", "--name", "gpu-box"],
            worker_dir, tmp_path / "w.log", {"MOEPLAT_TOKEN": token},
        )  # fmt: skip
        no_token = subprocess.run(
            [MOEPLAT, "jobs", "--server", url], capture_output=True, text=True, timeout=60,
            env={**os.environ, "MOEPLAT_TOKEN": ""},
        )  # fmt: skip
        assert no_token.returncode == 1 and "401" in no_token.stderr
        job_id, out, _ = _submit_and_follow(tmp_path, url, {"MOEPLAT_TOKEN": token})
        assert f"job {job_id} succeeded" in out
        headers = {"Authorization": f"Bearer {token}"}
        _check_job(url, job_id, tracking, headers, "team")
        assert httpx.get(f"{url}/api/jobs/{job_id}", headers=headers).json()["worker"] == "gpu-box"
        runs = worker_dir / ".moeplat" / "worker" / "runs"
        assert (runs / f"job-{job_id}" / "tiny").is_dir()  # one runs directory per job
    finally:
        for p in (worker, server, mlflow):
            if p:
                p.stop()
