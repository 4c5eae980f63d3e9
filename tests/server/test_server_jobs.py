"""The job store: atomic claims under contention (SQLite and PostgreSQL), leases, the reaper."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from postgres import postgres_url  # noqa: F401  (session fixture: a real PostgreSQL)
from sqlalchemy import text, update

from moeplat.server.jobs import Job, JobStore, Lease, LeaseLost, now


def _submit(store: JobStore, n: int) -> list[int]:
    return [
        store.submit(kind="run", name=f"job{i}", text="name: x\n", filename="x.yaml", overrides=[])["id"]
        for i in range(n)
    ]


def _race(store_factory, n_jobs: int = 30, n_workers: int = 6) -> dict[str, list[int]]:
    """n_workers threads, each with its own store (own connection pool, as separate processes
    would have), claim until the queue is empty; returns worker -> claimed ids."""
    seed = store_factory()
    _submit(seed, n_jobs)
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(n_workers)

    def work(name: str) -> None:
        store = store_factory()
        mine = claimed.setdefault(name, [])
        barrier.wait()
        while (job := store.claim(name)) is not None:
            mine.append(job["id"])
        store.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    jobs = {j["id"]: j for j in seed.list(limit=1000)}
    for name, ids in claimed.items():
        assert all(jobs[i]["worker"] == name and jobs[i]["attempts"] == 1 for i in ids)
    seed.close()
    return claimed


def _assert_each_claimed_once(claimed: dict[str, list[int]], n_jobs: int) -> None:
    every = [i for ids in claimed.values() for i in ids]
    assert sorted(every) == sorted(set(every)), "a job was claimed twice"
    assert len(every) == n_jobs
    assert sum(1 for ids in claimed.values() if ids) >= 2, "no contention happened"


def test_claim_is_atomic_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    _assert_each_claimed_once(_race(lambda: JobStore(url)), 30)


def test_claim_is_atomic_on_postgres(postgres_url):  # noqa: F811
    seed = JobStore(postgres_url)
    with seed.engine.begin() as conn:  # the session database is shared with other tests
        conn.execute(text("DELETE FROM moeplat_job_logs"))
        conn.execute(text("DELETE FROM moeplat_jobs"))
    seed.close()
    _assert_each_claimed_once(_race(lambda: JobStore(postgres_url)), 30)


def test_claim_takes_the_oldest_and_empty_queue_is_none(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    a, b = _submit(store, 2)
    assert store.claim("w")["id"] == a
    assert store.claim("w")["id"] == b
    assert store.claim("w") is None


def _age_heartbeat(store: JobStore, job_id: int, seconds: float) -> None:
    with store.session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=now() - timedelta(seconds=seconds)))


def test_silent_worker_requeued_then_failed(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", heartbeat_timeout_s=10, max_attempts=2)
    (job_id,) = _submit(store, 1)
    first = store.claim("dead")
    lease1 = Lease(job_id, "dead", first["attempts"])
    store.heartbeat(lease1)
    assert store.reap() == []  # fresh heartbeat: left alone

    _age_heartbeat(store, job_id, 11)
    assert store.reap() == [job_id]
    assert store.get(job_id)["state"] == "queued"
    with pytest.raises(LeaseLost):  # the presumed-dead worker comes back: refused
        store.heartbeat(lease1)
    second = store.claim("alive")
    assert second["id"] == job_id and second["attempts"] == 2
    with pytest.raises(LeaseLost):
        store.finish(lease1, 0)

    _age_heartbeat(store, job_id, 11)
    store.reap()
    failed = store.get(job_id)
    assert failed["state"] == "failed" and "sent no heartbeat" in failed["error"] and failed["finished_at"]
    log, _ = store.read_log(job_id)
    assert log.count("sent no heartbeat") == 2


def test_claim_reaps_first(tmp_path):
    """Whoever notices a dead worker requeues its job: a claiming worker does, without the server's reaper."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", heartbeat_timeout_s=5)
    (job_id,) = _submit(store, 1)
    store.claim("dead")
    _age_heartbeat(store, job_id, 6)
    assert store.claim("other")["id"] == job_id


def test_cancelled_silent_job_is_cancelled_not_requeued(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", heartbeat_timeout_s=5)
    (job_id,) = _submit(store, 1)
    store.claim("w")
    store.cancel(job_id)
    _age_heartbeat(store, job_id, 6)
    store.reap()
    assert store.get(job_id)["state"] == "cancelled"


def test_log_offsets_and_limit(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    (job_id,) = _submit(store, 1)
    job = store.claim("w")
    lease = Lease(job_id, "w", job["attempts"])
    for part in ("héllo ", "wörld\n", "x" * 50):
        store.append_log(lease, part, max_chars=40)
    text, offset = store.read_log(job_id)
    assert text.startswith("héllo wörld\nxxx") and "log limit reached" in text
    assert store.append_log(lease, "more", max_chars=40) == offset  # dropped
    assert store.read_log(job_id, 6) == (text[6:], offset)
    assert store.read_log(job_id, offset) == ("", offset)


def test_heartbeat_timestamps_are_utc(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    _submit(store, 1)
    before = time.time()
    job = store.claim("w")
    from datetime import datetime

    started = datetime.fromisoformat(job["started_at"])
    assert started.utcoffset() == timedelta(0)
    assert abs(started.timestamp() - before) < 5


def test_a_heartbeats_detail_is_stored_cleared_and_shown_only_while_running(tmp_path):
    """What an executor says of a running job (the SLURM bridge: its state and reason) comes with
    each heartbeat; a heartbeat without it (a local worker) clears it; a new claim starts without."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", heartbeat_timeout_s=10, max_attempts=2)
    (job_id,) = _submit(store, 1)
    assert store.get(job_id)["detail"] is None
    store.claim("bridge")
    lease = Lease(job_id, "bridge", 1)
    store.heartbeat(lease, "SLURM PENDING (Resources)")
    assert store.get(job_id)["detail"] == "SLURM PENDING (Resources)"
    assert store.list()[0]["detail"] == "SLURM PENDING (Resources)"
    store.heartbeat(lease, "SLURM RUNNING on node n1")
    assert store.get(job_id)["detail"] == "SLURM RUNNING on node n1"
    store.append_log(lease, "a line\n")  # also a heartbeat, but says nothing of the executor
    assert store.get(job_id)["detail"] == "SLURM RUNNING on node n1"
    store.heartbeat(lease)
    assert store.get(job_id)["detail"] is None
    store.heartbeat(lease, "SLURM PENDING (Priority)")
    _age_heartbeat(store, job_id, 11)
    assert store.reap() == [job_id]  # requeued: the old detail is not shown for a queued job
    assert store.get(job_id)["detail"] is None
    store.claim("local")
    assert store.get(job_id)["detail"] is None  # the new attempt starts without the old detail
    lease2 = Lease(job_id, "local", 2)
    store.heartbeat(lease2, "SLURM RUNNING on node n2")
    store.finish(lease2, 0)
    assert store.get(job_id)["detail"] is None  # a finished job shows how it ended, not the last beat
