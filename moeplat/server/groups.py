"""Sweeps spread over several workers: `POST /api/jobs` with `parallel: N` for a sweep, and the
/api/groups endpoints that show and cancel such a sweep as one.

The server creates the Optuna study once (in its sweep storage, as for one-job sweeps) and queues
N `sweep-worker` jobs in one group; each joins the study and runs trials until it has n_trials
finished ones (moeplat.sweep.study.surplus keeps the count exact when workers race for the last
trial; a trial whose worker died stops beating and is retried by another). The group records N,
so an executor that runs batches (SLURM) can start the same N workers as one job array.

Job arrays (`claim_rest`): a worker that claims with `array_executor` (the SLURM bridge) and gets
a job of a group gets, with it, every job of that group still queued, claimed in the same way
(one conditional UPDATE each), and the group records the executor. Nothing is reserved and no
claim waits: local workers keep claiming one job at a time, and in a mixed team a local worker
that got there first runs its jobs while the bridge runs the rest as a smaller array (the array's
task ids are the jobs' group indices, so `--array=1,3` when jobs 0 and 2 went elsewhere).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import select, update

from moeplat.server import results
from moeplat.server.jobs import Job, JobGroup, JobStore, now
from moeplat.server.settings import ServerSettings
from moeplat.spec.sweep import LoadedSweep

GroupId = Annotated[int, Path(ge=1, le=2**62)]
MAX_PARALLEL = 256


class Progress(BaseModel):
    """The study's trials, counted as the workers count them (a retried trial once, through its
    last attempt; a surplus trial not at all), against the sweep's n_trials."""

    n_trials: int
    finished: int
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int


class Group(BaseModel):
    id: int
    kind: str
    name: str
    size: int = Field(description="how many workers (jobs, or tasks of a job array)")
    study: str | None
    storage: str | None
    n_trials: int | None
    executor: str
    created_at: str | None
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    jobs: list[dict]
    progress: Progress | None = Field(None, description="null until the study can be read")


class GroupList(BaseModel):
    groups: list[Group]


def submit_sweep(
    store: JobStore, settings: ServerSettings, loaded: LoadedSweep, n: int, fields: dict
) -> dict:
    """Create the study (SpecError when one of that name exists) and queue n sweep-worker jobs;
    the first job, which names its group."""
    from moeplat.sweep.study import create_for_workers

    create_for_workers(loaded, settings.sweep_storage)
    group = store.submit_group("sweep", n, loaded.sweep.trials.n_trials, **{**fields, "kind": "sweep-worker"})
    return group["jobs"][0]


def claim_rest(store: JobStore, worker: str, job: dict, executor: str) -> list[dict]:
    """The other queued jobs of `job`'s group, now running for `worker` (who claimed `job` as a
    job array's executor); the group records `executor`. [] for a job of no group."""
    if job["group"] is None:
        return []
    won = []
    with store.session.begin() as s:
        s.execute(update(JobGroup).where(JobGroup.id == job["group"]).values(executor=executor))
        q = select(Job.id).where(Job.group_id == job["group"], Job.state == "queued").order_by(Job.id)
        if store.postgres:
            q = q.with_for_update(skip_locked=True)
        t = now()
        for job_id in s.scalars(q).all():
            claimed = update(Job).where(Job.id == job_id, Job.state == "queued")
            values = dict(state="running", worker=worker, started_at=t, heartbeat_at=t, detail=None)
            if s.execute(claimed.values(**values, attempts=Job.attempts + 1)).rowcount == 1:
                won.append(job_id)
    return [j for i in won if (j := store.get(i)) is not None]


def group_cancelled(store: JobStore, job_id: int) -> bool:
    """Whether the job's whole group was cancelled (not only this job)."""
    with store.session() as s:
        q = select(JobGroup.cancel_requested).join(Job, Job.group_id == JobGroup.id).where(Job.id == job_id)
        return bool(s.scalar(q))


def with_progress(settings: ServerSettings, group: dict) -> dict:
    from moeplat.sweep import query

    if not group["study"] or group["n_trials"] is None:
        return group
    try:
        p = results._call(
            "Optuna",
            query.study_progress,
            group["storage"] or settings.sweep_storage,
            group["study"],
            group["n_trials"],
        )
    except HTTPException as e:
        if e.status_code != 404:
            raise
        p = None
    return {**group, "progress": p}


def router(settings: ServerSettings, store: JobStore) -> APIRouter:
    r = APIRouter(prefix="/api/groups", tags=["jobs"])

    def group_or_404(group_id: int) -> dict:
        group = store.group(group_id)
        if group is None:
            raise HTTPException(404, f"no job group {group_id}")
        return group

    @r.get("", response_model=GroupList)
    def groups(limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
        """Newest first, each with its jobs and its study's progress."""
        return {"groups": [with_progress(settings, g) for g in store.groups(limit)]}

    @r.get("/{group_id}", response_model=Group, responses={404: {"description": "no such group"}})
    def group(group_id: GroupId) -> dict:
        return with_progress(settings, group_or_404(group_id))

    @r.post("/{group_id}/cancel", response_model=Group, responses={404: {"description": "no such group"}})
    def cancel(group_id: GroupId) -> dict:
        """Cancel every job of the group: queued ones at once, running ones are interrupted."""
        group_or_404(group_id)
        group = store.cancel_group(group_id)
        assert group is not None
        for job in group["jobs"]:
            store.note(job["id"], f"\n[moeplat: cancel requested for sweep group {group_id}]\n")
        return with_progress(settings, group)

    return r
