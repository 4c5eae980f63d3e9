"""The job queue: jobs and their logs in a SQL database (SQLAlchemy 2; SQLite or PostgreSQL).

States: queued -> running -> succeeded | failed | cancelled. A worker claims the oldest queued job
atomically: on PostgreSQL `SELECT ... FOR UPDATE SKIP LOCKED` inside the claiming transaction; on
SQLite (one writer at a time) a conditional `UPDATE ... WHERE id = :id AND state = 'queued'` whose
rowcount says whether this claim won. A claim bumps `attempts`; the claiming worker and attempt
are the job's `lease`: heartbeats, log appends and the final report of any other lease are refused,
so a worker that was presumed dead and comes back cannot overwrite its successor's work.
`reap` requeues (attempts < max_attempts) or fails running jobs whose heartbeat is too old.

Devices: a job needs `devices` (its spec's parallel.devices, stored at submit). A worker that owns
devices claims with its free count and gets the oldest queued job that fits; one without (a CPU
worker: one job at a time, any width) claims with none. Claims and heartbeats record each worker
and its device count (moeplat_workers), so a queued job that no live worker can run shows why
(`reason`). A running job's heartbeats carry what its executor says of it (`detail`: the SLURM
bridge's "SLURM PENDING (Resources)"). New columns reach an existing database through `_upgrade` (ALTER TABLE ADD COLUMN).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy import text as sql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


def now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "moeplat_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # run | sweep | route (moeplat.server.routing)
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    text: Mapped[str] = mapped_column(Text)  # the exact submitted spec
    filename: Mapped[str] = mapped_column(String(500))  # its virtual place, relative to its spec root
    root_index: Mapped[int] = mapped_column(Integer, default=0)  # which of settings.spec_roots
    overrides: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(200))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    study: Mapped[str | None] = mapped_column(String(200))
    storage: Mapped[str | None] = mapped_column(Text)
    log_size: Mapped[int] = mapped_column(Integer, default=0)  # characters in the log so far
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # parallel.devices
    group_id: Mapped[int | None] = mapped_column(Integer, index=True)  # JobGroup.id
    group_index: Mapped[int | None] = mapped_column(Integer)  # 0..size-1 within its group
    # what the executor says of a running job, sent with each heartbeat (the SLURM bridge: "SLURM
    # PENDING (Resources)"); a local worker sends none. Shown only while the job runs.
    detail: Mapped[str | None] = mapped_column(String(500))


class JobGroup(Base):
    """Jobs that are one piece of work: a sweep spread over `size` sweep-worker jobs that join one
    Optuna study. A local executor queues `size` jobs; a batch executor (SLURM) may run the same
    workers as one job array of `size` tasks (`executor` says which ran it: "slurm" once a bridge
    claimed jobs of it as an array; moeplat.server.groups.claim_rest)."""

    __tablename__ = "moeplat_job_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # sweep
    name: Mapped[str] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(Integer)
    study: Mapped[str | None] = mapped_column(String(200))
    storage: Mapped[str | None] = mapped_column(Text)
    n_trials: Mapped[int | None] = mapped_column(Integer)
    executor: Mapped[str] = mapped_column(String(32), default="local", server_default="local")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    # the whole group was cancelled (not one job): a job array is then scancelled as one
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")


class WorkerSeen(Base):
    """A worker as its last claim or heartbeat described it; `devices` null: a CPU worker (takes
    one job at a time, of any width)."""

    __tablename__ = "moeplat_workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    devices: Mapped[int | None] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LogChunk(Base):
    """One appended piece of a job's log; `start` is its character offset in the whole log."""

    __tablename__ = "moeplat_job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("moeplat_jobs.id"), index=True)
    start: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)


def _utc(t: datetime | None) -> str | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()


def job_dict(job: Job, reason: str | None = None) -> dict:
    return {
        "id": job.id,
        "kind": job.kind,
        "name": job.name,
        "state": job.state,
        "created_at": _utc(job.created_at),
        "started_at": _utc(job.started_at),
        "finished_at": _utc(job.finished_at),
        "heartbeat_at": _utc(job.heartbeat_at),
        "worker": job.worker,
        "exit_code": job.exit_code,
        "error": job.error,
        "cancel_requested": bool(job.cancel_requested),
        "attempts": job.attempts,
        "study": job.study,
        "storage": job.storage,
        "devices": job.devices,
        "reason": reason,
        "detail": job.detail if job.state == "running" else None,
        "group": job.group_id,
        "group_index": job.group_index,
    }


def group_dict(group: JobGroup, jobs: list[dict]) -> dict:
    return {
        "id": group.id,
        "kind": group.kind,
        "name": group.name,
        "size": group.size,
        "study": group.study,
        "storage": group.storage,
        "n_trials": group.n_trials,
        "executor": group.executor,
        "created_at": _utc(group.created_at),
        "state": group_state([j["state"] for j in jobs]),
        "jobs": jobs,
    }


def group_state(states: list[str]) -> str:
    """One state for a group: running while any job runs, queued while any waits; then succeeded
    when a worker saw the study through (another may have died on the way), else how it ended."""
    for state in ("running", "queued", "succeeded", "cancelled"):
        if state in states:
            return state
    return "failed"


WAITING = "waiting for a worker"
SEEN_EVERY_S = 2.0  # how often a worker's claims and heartbeats are written down


def too_big(need: int, live: list[int | None]) -> str | None:
    """Why no live worker can run a job needing `need` devices; None when one can (or may)."""
    if not live or None in live or need <= max(d for d in live if d is not None):
        return None
    most = max(d for d in live if d is not None)
    return (
        f"parallel.devices is {need} but the largest live worker has {most} device"
        f"{'s' if most != 1 else ''}: lower parallel.devices or start a worker with more "
        "(moeplat worker --devices)"
    )


def queued_reason(need: int, live: list[int | None]) -> str | None:
    return WAITING if not live else too_big(need, live)


@dataclass(frozen=True)
class Lease:
    """Who may report on a running job: the worker that claimed it, on that attempt."""

    job_id: int
    worker: str
    attempt: int


class LeaseLost(Exception):
    """The job is no longer this worker's (reaped, requeued, or finished)."""


def make_engine(url: str):
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class JobStore:
    def __init__(self, url: str, heartbeat_timeout_s: float = 60.0, max_attempts: int = 2):
        self.engine = make_engine(url)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_attempts = max_attempts
        Base.metadata.create_all(self.engine)
        _upgrade(self.engine)
        self._last_seen: dict[tuple[str, int | None], float] = {}
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self.postgres = self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    # --- submit and read ----------------------------------------------------------------------

    def submit(self, **fields) -> dict:
        with self.session.begin() as s:
            job = Job(**fields, state="queued", created_at=now())
            s.add(job)
            s.flush()
            return job_dict(job)

    def submit_group(self, group_kind: str, size: int, n_trials: int | None = None, **fields) -> dict:
        """A group and its `size` jobs (each a copy of `fields` with its group_index), queued in
        one transaction: no worker sees half a group."""
        with self.session.begin() as s:
            group = JobGroup(
                kind=group_kind,
                name=fields["name"],
                size=size,
                study=fields.get("study"),
                storage=fields.get("storage"),
                n_trials=n_trials,
                created_at=now(),
            )
            s.add(group)
            s.flush()
            t = now()
            jobs = [
                Job(**fields, state="queued", created_at=t, group_id=group.id, group_index=i)
                for i in range(size)
            ]
            s.add_all(jobs)
            s.flush()
            live = self._live(s)
            return group_dict(group, [self._dict(s, j, live) for j in jobs])

    def group(self, group_id: int) -> dict | None:
        with self.session() as s:
            group = s.get(JobGroup, group_id)
            if group is None:
                return None
            live = self._live(s)
            jobs = s.scalars(select(Job).where(Job.group_id == group_id).order_by(Job.id))
            return group_dict(group, [self._dict(s, j, live) for j in jobs])

    def groups(self, limit: int = 20) -> list[dict]:
        """The newest groups, newest first."""
        with self.session() as s:
            ids = s.scalars(select(JobGroup.id).order_by(JobGroup.id.desc()).limit(limit)).all()
        return [g for i in ids if (g := self.group(i)) is not None]

    def cancel_group(self, group_id: int) -> dict | None:
        """Cancel every job of the group (queued ones at once, running ones by request); the group
        remembers it, so an executor running it as one job array cancels the array as one."""
        with self.session.begin() as s:
            s.execute(update(JobGroup).where(JobGroup.id == group_id).values(cancel_requested=True))
            ids = s.scalars(select(Job.id).where(Job.group_id == group_id)).all()
        for job_id in ids:
            self.cancel(job_id)
        return self.group(group_id)

    def get(self, job_id: int) -> dict | None:
        with self.session() as s:
            job = s.get(Job, job_id)
            return self._dict(s, job) if job else None

    def _dict(self, s: Session, job: Job, live: list[int | None] | None = None) -> dict:
        if job.state != "queued":
            return job_dict(job)
        return job_dict(job, queued_reason(job.devices, self._live(s) if live is None else live))

    def _live(self, s: Session) -> list[int | None]:
        cutoff = now() - timedelta(seconds=max(self.heartbeat_timeout_s, 10.0))
        return list(s.scalars(select(WorkerSeen.devices).where(WorkerSeen.seen_at >= cutoff)))

    def live_workers(self) -> list[int | None]:
        """Device counts of the workers seen within the heartbeat timeout (None: a CPU worker)."""
        with self.session() as s:
            return self._live(s)

    def _seen(self, worker: str, devices: int | None = None, claim: bool = False) -> None:
        """Record a worker's claim (with its device count) or heartbeat (time only)."""
        key, t = (worker, devices if claim else None), time.monotonic()
        if t - self._last_seen.get(key, -SEEN_EVERY_S) < SEEN_EVERY_S:
            return  # seen a moment ago: spare the database a write per claim (SQLite has one writer)
        self._last_seen[key] = t
        values = {"seen_at": now(), **({"devices": devices} if claim else {})}
        with self.session.begin() as s:
            done = s.execute(update(WorkerSeen).where(WorkerSeen.name == worker).values(**values)).rowcount
        if done or not claim:
            return
        with contextlib.suppress(IntegrityError), self.session.begin() as s:  # another thread won
            s.add(WorkerSeen(name=worker, **values))

    def spec_of(self, job_id: int) -> dict | None:
        """What a worker needs to run the job: its text, virtual place and overrides."""
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None
            keys = ("text", "filename", "root_index", "overrides", "attempts")
            return {k: getattr(job, k) for k in keys}

    def list(self, state: str | None = None, limit: int = 100) -> list[dict]:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            q = q.where(Job.state == state)
        with self.session() as s:
            live = self._live(s)
            return [self._dict(s, j, live) for j in s.scalars(q)]

    # --- the worker's side --------------------------------------------------------------------

    def claim(self, worker: str, free: int | None = None, devices: int | None = None) -> dict | None:
        """The oldest queued job, now running for `worker`; None when the queue is empty. With
        `free` (the worker's free devices), the oldest whose devices fit; `devices` is the
        worker's total, recorded for the reasons of jobs no worker can run."""
        self._seen(worker, devices, claim=True)
        self.reap()
        for _ in range(20):  # SQLite: another claimer won the candidate; take the next one
            with self.session.begin() as s:
                q = select(Job.id).where(Job.state == "queued").order_by(Job.id).limit(1)
                if free is not None:
                    q = q.where(Job.devices <= free)
                if self.postgres:
                    q = q.with_for_update(skip_locked=True)
                job_id = s.scalar(q)
                if job_id is None:
                    return None
                t = now()
                won = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "queued")
                    .values(
                        state="running",
                        worker=worker,
                        started_at=t,
                        heartbeat_at=t,
                        attempts=Job.attempts + 1,
                        detail=None,
                    )
                ).rowcount
            if won == 1:
                job = self.get(job_id)
                assert job is not None
                return job
        return None

    def _owned(self, s: Session, lease: Lease) -> Job:
        job = s.get(Job, lease.job_id, with_for_update=self.postgres)
        if (
            job is None
            or job.state != "running"
            or job.worker != lease.worker
            or job.attempts != lease.attempt
        ):
            raise LeaseLost(f"job {lease.job_id} is not running for {lease.worker} (attempt {lease.attempt})")
        return job

    def heartbeat(self, lease: Lease, detail: str | None = None) -> bool:
        """Record that the worker is alive, and what its executor says of the job (`detail`; None
        clears it); True when a cancel was asked for."""
        with self.session.begin() as s:
            job = self._owned(s, lease)
            job.heartbeat_at, job.detail = now(), detail
            cancel = bool(job.cancel_requested)
        self._seen(lease.worker)
        return cancel

    def append_log(self, lease: Lease, text: str, max_chars: int = 20 << 20) -> int:
        """Append the worker's output to the job's log (also a heartbeat); returns the log's size.
        Beyond `max_chars` the output is dropped, with one note saying so."""
        with self.session.begin() as s:
            job = self._owned(s, lease)
            job.heartbeat_at = now()
            if job.log_size >= max_chars:
                return job.log_size
            if job.log_size + len(text) > max_chars:
                text = text[: max_chars - job.log_size] + "\n[moeplat: log limit reached, output dropped]\n"
            _append(s, job, text)
            return job.log_size

    def note(self, job_id: int, text: str) -> None:
        """A line from the server itself (requeue, cancel) in the job's log."""
        with self.session.begin() as s:
            job = s.get(Job, job_id, with_for_update=self.postgres)
            if job is not None:
                _append(s, job, text)

    def finish(self, lease: Lease, exit_code: int, error: str | None = None) -> dict:
        with self.session.begin() as s:
            job = self._owned(s, lease)
            if job.cancel_requested:
                job.state = "cancelled"
            else:
                job.state = "succeeded" if exit_code == 0 else "failed"
            job.exit_code, job.error, job.finished_at = exit_code, error, now()
            return job_dict(job)

    # --- log, cancel, reaper ------------------------------------------------------------------

    def read_log(self, job_id: int, offset: int = 0, max_chars: int = 1 << 20) -> tuple[str, int]:
        """Log text from character `offset` (at most `max_chars`) and the next offset."""
        offset = max(0, offset)
        with self.session() as s:
            chunks = s.scalars(
                select(LogChunk)
                .where(LogChunk.job_id == job_id, LogChunk.start + func.length(LogChunk.text) > offset)
                .order_by(LogChunk.start)
            ).all()
        if not chunks:
            return "", offset
        text = "".join(c.text for c in chunks)[offset - chunks[0].start :][:max_chars]
        return text, offset + len(text)

    def cancel(self, job_id: int) -> dict | None:
        """Queued: cancelled at once. Running: cancel_requested (the worker sees it on its next
        heartbeat and interrupts the run). Finished: unchanged."""
        with self.session.begin() as s:
            job = s.get(Job, job_id, with_for_update=self.postgres)
            if job is None:
                return None
            if job.state == "queued":
                job.state, job.finished_at = "cancelled", now()
            elif job.state == "running":
                job.cancel_requested = True
            return job_dict(job)

    def reap(self) -> list[int]:
        """Running jobs silent for longer than the heartbeat timeout: requeued while attempts are
        left (and no cancel was asked for), else failed (or cancelled). Returns their ids."""
        cutoff = now() - timedelta(seconds=self.heartbeat_timeout_s)
        reaped = []
        with self.session.begin() as s:
            q = select(Job).where(Job.state == "running", Job.heartbeat_at < cutoff)
            if self.postgres:
                q = q.with_for_update(skip_locked=True)
            for job in s.scalars(q):
                silent = f"worker {job.worker} sent no heartbeat for {self.heartbeat_timeout_s:g}s"
                if job.cancel_requested:
                    job.state, job.error = "cancelled", silent
                elif job.attempts < self.max_attempts:
                    job.state, job.worker = "queued", None
                else:
                    job.state, job.error = (
                        "failed",
                        f"{silent} (attempt {job.attempts} of {self.max_attempts})",
                    )
                if job.state != "queued":
                    job.finished_at = now()
                _append(s, job, f"\n[moeplat: {silent}; job {job.state}]\n")
                reaped.append(job.id)
        return reaped


def _upgrade(engine) -> None:
    """Add the columns a database made by an older moeplat lacks (create_all adds only tables)."""
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(engine.dialect)}"
            if col.server_default is not None:  # a text default, quoted (SQL also takes '1' for 1)
                ddl += " DEFAULT '{}'".format(str(col.server_default.arg).replace("'", "''"))
            with engine.begin() as conn:
                conn.execute(sql(ddl))


def _append(s: Session, job: Job, text: str) -> None:
    """Add `text` at the end of the job's log (in the caller's transaction, on the locked row)."""
    s.add(LogChunk(job_id=job.id, start=job.log_size, text=text))
    job.log_size += len(text)
