"""The endpoints workers use (`moeplat worker --server URL`): claim, heartbeat, log, finish.

Workers reach the server over HTTP with the same token as any client, so a worker on another
machine needs no database credentials and the jobs database stays private to the server. Every
call after the claim names the lease (worker, attempt); a lease the server no longer honours (the
job was reaped or finished) answers 409 and the worker stops its run.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field

from moeplat.server.groups import claim_rest, group_cancelled
from moeplat.server.jobs import JobStore, Lease, LeaseLost
from moeplat.server.security import RequestModel
from moeplat.server.settings import ServerSettings

WorkerName = Annotated[str, Field(min_length=1, max_length=200)]
JobId = Annotated[int, Path(ge=1, le=2**62)]


class Model(RequestModel):
    pass


class ClaimRequest(Model):
    worker: WorkerName
    free_devices: Annotated[int, Field(ge=0, le=4096)] | None = Field(
        None, description="devices the worker has free: only a job needing at most these is handed out"
    )
    devices: Annotated[int, Field(ge=0, le=4096)] | None = Field(
        None, description="the worker's devices in all (null: a CPU worker, one job of any width)"
    )
    array_executor: Literal["slurm"] | None = Field(
        None,
        description="the worker runs a group's jobs as one job array: a job of a group comes with "
        "the group's other queued jobs (group_claimed), and the group records this executor",
    )


class LeaseBody(Model):
    worker: WorkerName
    attempt: Annotated[int, Field(ge=1, le=2**31)]


class HeartbeatBody(LeaseBody):
    detail: Annotated[str, Field(max_length=500)] | None = Field(
        None,
        description="what the executor says of the job now (SLURM: its state and reason, its node); "
        "null clears it",
    )


class LogBody(LeaseBody):
    text: Annotated[str, Field(max_length=1 << 19)]


class FinishBody(LeaseBody):
    exit_code: Annotated[int, Field(ge=-(2**31), le=2**31)]
    error: Annotated[str, Field(max_length=5000)] | None = None


class Claimed(BaseModel):
    """A claimed job and how to run it: write `text` to a file and run it as if it lived at
    `spec_root`/`filename` (moeplat run|sweep --as-path)."""

    job: dict | None
    attempt: int | None = None
    text: str | None = None
    filename: str | None = None
    spec_root: str | None = None
    overrides: list[str] = Field(default_factory=list)
    tracking_uri: str | None = None
    sweep_storage: str | None = None
    heartbeat_s: float | None = None
    group_size: int | None = None
    group_claimed: list[dict] = Field(
        default_factory=list,
        description="with array_executor: every job of the group claimed now, this one first, "
        "each {job, attempt}",
    )


class HeartbeatOut(BaseModel):
    cancel: bool
    group_cancel: bool = Field(False, description="the cancel is of the job's whole group")


class LogOut(BaseModel):
    size: int


LOST = {409: {"description": "the job is no longer this worker's (reaped, requeued or finished)"}}


def router(settings: ServerSettings, store: JobStore) -> APIRouter:
    r = APIRouter(prefix="/api/worker", tags=["worker"])

    def leased(job_id: int, body: LeaseBody, fn):
        try:
            return fn(Lease(job_id, body.worker, body.attempt))
        except LeaseLost as e:
            raise HTTPException(409, str(e)) from None

    @r.post("/claim", response_model=Claimed)
    def claim(body: ClaimRequest) -> dict:
        """The oldest queued job (that fits `free_devices`), now running for this worker; `job`
        null when none is queued."""
        job = store.claim(body.worker, body.free_devices, body.devices)
        if job is None:
            return {"job": None}
        together = []
        if body.array_executor and job["group"] is not None:
            rest = claim_rest(store, body.worker, job, body.array_executor)
            together = [{"job": j, "attempt": j["attempts"]} for j in [job, *rest]]
        spec = store.spec_of(job["id"])
        assert spec is not None
        return {
            "job": job,
            "attempt": spec["attempts"],
            "text": spec["text"],
            "filename": spec["filename"],
            "spec_root": str(settings.spec_roots[spec["root_index"]]),
            "overrides": spec["overrides"],
            "tracking_uri": settings.tracking_uri,
            "sweep_storage": settings.sweep_storage,
            "heartbeat_s": max(0.5, min(5.0, settings.heartbeat_timeout_s / 4)),
            "group_size": (store.group(job["group"]) or {}).get("size") if job["group"] else None,
            "group_claimed": together,
        }

    @r.post("/jobs/{job_id}/heartbeat", response_model=HeartbeatOut, responses=LOST)
    def heartbeat(job_id: JobId, body: HeartbeatBody) -> dict:
        """Alive (and the executor's `detail`, stored on the job); `cancel` true when the job
        should be interrupted (`group_cancel`: with its group)."""
        cancel = leased(job_id, body, lambda lease: store.heartbeat(lease, body.detail))
        return {"cancel": cancel, "group_cancel": cancel and group_cancelled(store, job_id)}

    @r.post("/jobs/{job_id}/log", response_model=LogOut, responses=LOST)
    def append_log(job_id: JobId, body: LogBody) -> dict:
        return {
            "size": leased(
                job_id, body, lambda lease: store.append_log(lease, body.text, settings.max_log_bytes)
            )
        }

    @r.post("/jobs/{job_id}/finish", responses=LOST)
    def finish(job_id: JobId, body: FinishBody) -> dict:
        """The run's exit code: succeeded (0), failed, or cancelled when a cancel was asked for."""
        return leased(job_id, body, lambda lease: store.finish(lease, body.exit_code, body.error))

    return r
