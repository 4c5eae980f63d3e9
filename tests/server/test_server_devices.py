"""Workers that own devices (made-up ids on a CPU machine): jobs side by side on disjoint subsets,
claims that fit the free devices, and a reason for a job no live worker can run; the detail an
executor reports with a running job's heartbeat (the SLURM bridge's state and reason) in the job
JSON and `moeplat jobs`.

The job's "python" is a shell script that records what it saw (CUDA_VISIBLE_DEVICES, which jobs had
ended when it started) and waits for a release file, so the test decides when jobs end.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from postgres import postgres_url  # noqa: F401  (session fixture: a real PostgreSQL)
from server_helpers import live_server, settings_for, spec_root, wait_for  # noqa: F401

from moeplat.server.jobs import WAITING, JobStore, Lease
from moeplat.server.worker import Worker, parse_devices

DDP = ["parallel.strategy.kind=ddp"]


def _recorder(tmp: Path) -> tuple[str, Path]:
    rec = tmp / "rec"
    rec.mkdir()
    script = tmp / "fake-python"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$CUDA_VISIBLE_DEVICES" > {rec}/job-$MOEPLAT_JOB_ID.devices\n'
        f"ls {rec} > {rec}/job-$MOEPLAT_JOB_ID.saw\n"
        "i=0\n"  # the cap only keeps a broken test from hanging
        f"while [ ! -e {rec}/release ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n"
        f"touch {rec}/job-$MOEPLAT_JOB_ID.ended\n"
    )
    script.chmod(0o755)
    return str(script), rec


def _submit(url: str, devices: int) -> dict:
    overrides = [f"parallel.devices={devices}", *(DDP if devices > 1 else [])]
    r = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": overrides})
    assert r.status_code == 201, r.text
    return r.json()


def _job(url: str, job_id: int) -> dict:
    return httpx.get(f"{url}/api/jobs/{job_id}").json()


def test_jobs_share_a_workers_devices_side_by_side(tmp_path, spec_root):  # noqa: F811
    python, rec = _recorder(tmp_path)
    with live_server(settings_for(tmp_path)) as url:
        two, one, three = _submit(url, 2), _submit(url, 1), _submit(url, 3)
        assert two["devices"] == 2 and three["devices"] == 3
        assert _job(url, three["id"])["reason"] == WAITING  # no worker has been seen yet
        worker = Worker(
            url, name="gpus", work_dir=tmp_path / "w", poll_s=0.2, python=python, devices=["0", "1", "2"]
        )
        stop = threading.Event()
        thread = threading.Thread(target=worker.serve, kwargs={"stop": stop}, daemon=True)
        thread.start()
        try:
            seen = {j["id"]: rec / f"job-{j['id']}.saw" for j in (two, one)}
            wait_for(lambda: all(p.exists() for p in seen.values()), 60, 0.1, "the 2- and 1-device jobs")
            # both run at once (each waits for the release); the 3-device job waits for them
            assert [_job(url, j["id"])["state"] for j in (two, one, three)] == [
                "running",
                "running",
                "queued",
            ]
            assert _job(url, three["id"])["reason"] is None  # a live worker has 3 devices: it only waits
            got = {j: (rec / f"job-{j}.devices").read_text().split()[0].split(",") for j in seen}
            assert len(got[two["id"]]) == 2 and len(got[one["id"]]) == 1
            assert sorted(got[two["id"]] + got[one["id"]]) == ["0", "1", "2"]  # disjoint, all of them
            (rec / "release").touch()
            wait_for(lambda: _job(url, three["id"])["state"] == "succeeded", 60, 0.2, "the 3-device job")
        finally:
            (rec / "release").touch()
            stop.set()
            thread.join(timeout=60)
        saw = (rec / f"job-{three['id']}.saw").read_text().split()
        assert {f"job-{two['id']}.ended", f"job-{one['id']}.ended"} <= set(saw)  # it started after both
        assert (rec / f"job-{three['id']}.devices").read_text().split() == ["0,1,2"]
        assert all(_job(url, j["id"])["state"] == "succeeded" for j in (two, one))


def test_a_job_no_live_worker_can_run(tmp_path, spec_root):  # noqa: F811
    with live_server(settings_for(tmp_path)) as url:
        queued = _submit(url, 4)  # no worker known: accepted, waiting
        assert _job(url, queued["id"])["reason"] == WAITING
        claim = {"worker": "small", "free_devices": 2, "devices": 2}
        assert httpx.post(f"{url}/api/worker/claim", json=claim).json()["job"] is None  # 4 > 2 free
        reason = _job(url, queued["id"])["reason"]
        assert "parallel.devices is 4" in reason and "largest live worker has 2" in reason
        listed = httpx.get(f"{url}/api/jobs").json()["jobs"]
        assert listed[0]["reason"] == reason
        r = httpx.post(
            f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": ["parallel.devices=3", *DDP]}
        )
        assert r.status_code == 422 and "parallel.devices is 3" in r.json()["detail"]
        assert _submit(url, 2)["reason"] is None  # fits the live worker
        # the CLI shows the reason in its list
        out = subprocess.run(
            [sys.executable, "-m", "moeplat.cli.main", "jobs", "--server", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "largest live worker has 2" in out


def _beat(url: str, job_id: int, **body) -> httpx.Response:
    return httpx.post(
        f"{url}/api/worker/jobs/{job_id}/heartbeat", json={"worker": "bridge", "attempt": 1, **body}
    )


def _jobs_cli(url: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "moeplat.cli.main", "jobs", "--server", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_a_running_jobs_detail_in_the_job_json_and_moeplat_jobs(tmp_path, spec_root):  # noqa: F811
    with live_server(settings_for(tmp_path)) as url:
        job = _submit(url, 1)
        assert job["detail"] is None
        claimed = httpx.post(f"{url}/api/worker/claim", json={"worker": "bridge"}).json()
        assert claimed["job"]["id"] == job["id"]
        assert _beat(url, job["id"], detail="SLURM PENDING (Resources)").json()["cancel"] is False
        assert _job(url, job["id"])["detail"] == "SLURM PENDING (Resources)"
        line = next(ln for ln in _jobs_cli(url).splitlines() if ln.split()[:1] == [str(job["id"])])
        assert "running" in line and line.endswith("bridge (SLURM PENDING (Resources))"), line
        # bad input is refused, naming the field; the stored detail stays
        too_long = _beat(url, job["id"], detail="x" * 501)
        assert too_long.status_code == 422 and "detail" in too_long.text
        assert _beat(url, job["id"], detail=7).status_code == 422
        assert _job(url, job["id"])["detail"] == "SLURM PENDING (Resources)"
        # a heartbeat without one (a local worker's) clears it
        assert _beat(url, job["id"]).status_code == 200
        assert _job(url, job["id"])["detail"] is None
        assert "(SLURM" not in _jobs_cli(url)


def test_a_cpu_worker_takes_a_job_of_any_width(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    wide = store.submit(kind="run", name="w", text="", filename="a.yaml", overrides=[], devices=8)["id"]
    assert store.claim("gpu2", free=2, devices=2) is None
    assert store.get(wide)["reason"].startswith("parallel.devices is 8")
    assert store.claim("cpu")["id"] == wide  # a CPU worker (no device count) takes any job


OLD_JOBS_TABLE = (  # moeplat_jobs as an older moeplat made it (no devices, no group columns)
    "CREATE TABLE moeplat_jobs (id {pk}, kind VARCHAR(16), name VARCHAR(200), "
    "state VARCHAR(16), text TEXT, filename VARCHAR(500), root_index INTEGER, overrides JSON, "
    "created_at {ts}, started_at {ts}, finished_at {ts}, heartbeat_at {ts}, "
    "worker VARCHAR(200), exit_code INTEGER, error TEXT, cancel_requested BOOLEAN, "
    "attempts INTEGER, study VARCHAR(200), storage TEXT, log_size INTEGER)"
)
OLD_JOB = (
    "INSERT INTO moeplat_jobs (kind, name, state, text, filename, root_index, overrides, "
    "cancel_requested, attempts, log_size) VALUES ('run', 'old', 'queued', '', 'a.yaml', 0, '[]', false, 0, 0)"
)


def _old_database(url: str, pk: str, ts: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(OLD_JOBS_TABLE.format(pk=pk, ts=ts)))
        conn.execute(text(OLD_JOB))
    engine.dispose()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_an_old_jobs_database_gets_the_new_columns(dialect, tmp_path, request):
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        _old_database(url, "INTEGER PRIMARY KEY", "DATETIME")
    else:  # a database of its own in the test PostgreSQL server
        from sqlalchemy import create_engine, text

        base = request.getfixturevalue("postgres_url")
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS moeplat_upgrade"))
            conn.execute(text("CREATE DATABASE moeplat_upgrade"))
        admin.dispose()
        url = base.rsplit("/", 1)[0] + "/moeplat_upgrade"
        _old_database(url, "SERIAL PRIMARY KEY", "TIMESTAMP WITH TIME ZONE")
    store = JobStore(url)
    assert store.get(1)["devices"] == 1 and store.get(1)["group"] is None
    assert store.get(1)["detail"] is None
    assert store.claim("w", free=1, devices=1)["name"] == "old"
    store.heartbeat(Lease(1, "w", 1), "SLURM PENDING (Resources)")  # the new detail column
    assert store.get(1)["detail"] == "SLURM PENDING (Resources)"
    store.close()


@pytest.mark.parametrize(
    ("text", "visible", "want"),
    [
        ("0,1,2", None, ["0", "1", "2"]),
        ("cpu", None, None),
        ("auto", None, ["0", "1"]),  # the fake count below
        ("auto", "3,5", ["3", "5"]),  # what this worker was handed
        ("auto", "", None),
        ("auto", "-1", None),
    ],
)
def test_parse_devices(text, visible, want, monkeypatch):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert parse_devices(text, lambda: 2) == want


@pytest.mark.parametrize("text", ["0,0", "0,,1", "a b", ""])
def test_bad_devices_are_refused_naming_the_flag(text, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeplat.cli.main",
            "worker",
            "--devices",
            text,
            "--server",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "--devices" in out.stderr and "Traceback" not in out.stderr
