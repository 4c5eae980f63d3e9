"""Sweeps spread over several workers: `POST /api/jobs` with `parallel: N` for a sweep, and the
/api/groups endpoints that show and cancel such a sweep as one.

The server creates the Optuna study once (in its sweep storage, as for one-job sweeps) and queues
N `sweep-worker` jobs in one group; each joins the study and runs trials until it has n_trials
finished ones (moeplat.sweep.study.surplus keeps the count exact when workers race for the last
trial; a trial whose worker died stops beating and is retried by another). The group records N,
so an executor that runs batches (SLURM) can start the same N workers as one job array.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field

from moeplat.server import results
from moeplat.server.jobs import JobStore
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
