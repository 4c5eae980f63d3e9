"""The job server's HTTP API (FastAPI): validate, plan, submit, list, follow and cancel jobs.

`create_app(settings)` builds the app; `moeplat serve` runs it with uvicorn. The contract the web
UI and the results endpoints rely on is docs/server.md. Spec functions are the CLI's own
(moeplat.server.specs wraps them for text confined to the spec roots); jobs live in SQL
(moeplat.server.jobs); workers talk to the /api/worker endpoints (moeplat.server.worker_api).
Handlers that touch the database are plain `def`s: FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Path, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

import moeplat
from moeplat.errors import SpecError
from moeplat.server import groups, results, routing, specs, worker_api
from moeplat.server.jobs import FINAL, JobStore, too_big
from moeplat.server.security import Guard, RequestModel, internal_error, invalid_request
from moeplat.server.settings import ServerSettings
from moeplat.track.query import prepare_store

log = logging.getLogger("moeplat.server")
CR = "\r"
JobId = Annotated[int, Path(ge=1, le=2**62)]
Overrides = Annotated[list[Annotated[str, Field(max_length=4000)]], Field(max_length=200)]
NOT_BUILT = """<!doctype html><html><head><title>moeplat</title></head><body>
<h1>moeplat job server</h1><p>The web UI is not built: run <code>make setup</code> (it builds
<code>web/dist</code>), or point <code>MOEPLAT_WEB_DIR</code> at a built UI.</p>
<p>The API is up: <a href="/docs">/docs</a>, <a href="/openapi.json">/openapi.json</a>.</p></body></html>"""


class Model(RequestModel):
    pass


class SpecText(Model):
    text: str = Field(description="the spec YAML, at most settings.max_spec_bytes (else 413)")
    kind: Literal["run", "sweep"] = "run"
    overrides: Overrides = Field(default_factory=list, description="--set KEY=VALUE texts")
    filename: Annotated[str, Field(max_length=500)] = Field(
        "spec.yaml", description="where the text lives, relative to the first spec root"
    )


class JobRequest(Model):
    kind: Literal["run", "sweep"] = "run"
    text: str | None = Field(None, description="the spec YAML (or give path)")
    path: Annotated[str, Field(max_length=500)] | None = Field(None, description="a spec file in a spec root")
    overrides: Overrides = Field(default_factory=list)
    name: Annotated[str, Field(max_length=200)] | None = None
    filename: Annotated[str, Field(max_length=500)] = Field(
        "spec.yaml", description="with text: where it lives, relative to the first spec root"
    )
    parallel: Annotated[int, Field(ge=1, le=groups.MAX_PARALLEL)] | None = Field(
        None,
        description="a sweep only: run it as this many sweep-worker jobs joining one study (a job group)",
    )


class Issue(BaseModel):
    path: str
    message: str
    line: int | None
    file: str | None
    hint: str | None
    text: str


class Validation(BaseModel):
    ok: bool
    name: str | None
    hash: str | None
    errors: list[Issue]


class PlanOut(BaseModel):
    ok: bool
    errors: list[Issue]
    plan: dict | None
    text: str | None


class Job(BaseModel):
    id: int
    kind: str
    name: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    heartbeat_at: str | None
    worker: str | None
    exit_code: int | None
    error: str | None
    cancel_requested: bool
    attempts: int
    study: str | None
    storage: str | None
    devices: int = Field(description="parallel.devices of the (base) spec: what a worker must have free")
    reason: str | None = Field(
        description="why a queued job is not running yet, when a worker cannot take it"
    )
    detail: str | None = Field(
        None,
        description="what the executor says of a running job, from its last heartbeat (the SLURM "
        "bridge: 'SLURM PENDING (Resources)', 'SLURM RUNNING on node1'); null for a local worker",
    )
    group: int | None = Field(description="the job group (a sweep spread over workers) it belongs to")
    group_index: int | None


class JobList(BaseModel):
    jobs: list[Job]


class LogOut(BaseModel):
    text: str
    offset: int
    done: bool


class Health(BaseModel):
    ok: bool
    version: str
    auth: bool


class Error(BaseModel):
    detail: str | list[dict]  # a message; FastAPI's request validation gives [{loc, msg, type}]
    errors: list[Issue] | None = None


ERRORS = {
    400: {"model": Error, "description": "malformed request (body not parsable, bad Content-Length)"},
    401: {"model": Error, "description": "missing or wrong token"},
    413: {"model": Error, "description": "request or spec too large"},
}


def create_app(settings: ServerSettings) -> FastAPI:
    store = JobStore(settings.db_url, settings.heartbeat_timeout_s, settings.max_attempts)
    stop = threading.Event()

    def reaper() -> None:
        while not stop.wait(settings.reap_every_s):
            try:
                if reaped := store.reap():
                    log.warning("jobs %s lost their worker (no heartbeat)", reaped)
            except Exception:
                log.exception("reaper")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(prepare_store, settings.tracking_uri)
        thread = threading.Thread(target=reaper, name="moeplat-reaper", daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join(timeout=10)

    app = FastAPI(
        title="moeplat job server",
        version=moeplat.__version__,
        description="Validate, plan, queue and follow moeplat runs and sweeps. With a token configured, "
        "every /api request but /api/health needs `Authorization: Bearer <token>`.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.settings, app.state.store = settings, store
    app.add_middleware(Guard, settings=settings)
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    _spec_routes(app, settings)
    _job_routes(app, settings, store)
    app.include_router(worker_api.router(settings, store))
    app.include_router(groups.router(settings, store))
    app.include_router(results.router)
    app.include_router(routing.router(settings, store))
    _web(app, settings)
    return app


def _spec_routes(app: FastAPI, settings: ServerSettings) -> None:
    @app.get("/api/health", response_model=Health, tags=["server"])
    def health() -> dict:
        return {"ok": True, "version": app.version, "auth": settings.token is not None}

    @app.get("/api/schema", tags=["specs"])
    def schema(kind: Literal["run", "sweep"] = "run") -> dict:
        """The JSON Schema of run specs (as `moeplat schema`) or of sweep specs."""
        if kind == "sweep":
            from moeplat.spec.sweep import SweepSpec

            return SweepSpec.model_json_schema()
        from moeplat.spec.schema import json_schema

        return json_schema()

    @app.post("/api/validate", response_model=Validation, tags=["specs"])
    def validate(body: SpecText) -> dict:
        """Errors carry the line in the submitted text and `text`, the line `moeplat validate` prints."""
        return _spec_call(specs.validate_text, body, settings)

    @app.post("/api/plan", response_model=PlanOut, tags=["specs"])
    def plan(body: SpecText) -> dict:
        """Counts, memory and preflight of a run spec (of a sweep's base spec), as `moeplat plan --json`."""
        return _spec_call(specs.plan_text, body, settings)


def _spec_call(fn, body: SpecText, settings: ServerSettings) -> dict:
    try:
        return fn(body.kind, body.text, body.overrides, body.filename, settings)
    except specs.SpecTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except SpecError as e:  # a bad filename: as a validation result, not an HTTP error
        issues = [specs.issue_dict(i) for i in e.issues]
        return {"ok": False, "name": None, "hash": None, "errors": issues, "plan": None, "text": None}


def _job_routes(app: FastAPI, settings: ServerSettings, store: JobStore) -> None:
    def job_or_404(job_id: int) -> dict:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.post(
        "/api/jobs",
        status_code=201,
        response_model=Job,
        tags=["jobs"],
        responses={422: {"model": Error, "description": "invalid spec (errors) or request"}},
    )
    def submit(body: JobRequest) -> dict | JSONResponse:
        """Queue a run or a sweep from spec text (validated as `filename` in the first spec root)
        or from `path`, a spec file inside a spec root."""
        if (body.text is None) == (body.path is None):
            raise HTTPException(422, "give exactly one of text and path")
        if body.parallel is not None and body.kind != "sweep":
            raise HTTPException(
                422, "parallel is for sweeps (kind: sweep); a run's devices are its parallel.devices"
            )
        try:
            root, filename, text = (
                specs.spec_file(body.path, settings)
                if body.path is not None
                else (0, body.filename, body.text)
            )
            loaded = specs.load_text(body.kind, text, body.overrides, filename, settings, root)
        except specs.SpecTooLarge as e:
            raise HTTPException(413, str(e)) from None
        except SpecError as e:
            issues = [specs.issue_dict(i) for i in e.issues]
            return JSONResponse({"detail": "invalid spec", "errors": issues}, status_code=422)
        sweep = body.kind == "sweep"
        name = body.name or (loaded.sweep.name if sweep else loaded.spec.name)
        devices = (loaded.base if sweep else loaded).spec.parallel.devices
        if problem := too_big(devices, store.live_workers()):
            raise HTTPException(422, problem)
        fields = dict(
            kind=body.kind,
            name=name,
            text=text,
            filename=filename,
            root_index=root,
            overrides=list(body.overrides),
            study=loaded.sweep.name if sweep else None,
            storage=settings.sweep_storage if sweep else None,
            devices=devices,
        )
        if body.parallel is None:
            return store.submit(**fields)
        try:
            return groups.submit_sweep(store, settings, loaded, body.parallel, fields)
        except SpecError as e:  # a study of that name exists
            issues = [specs.issue_dict(i) for i in e.issues]
            return JSONResponse({"detail": "invalid spec", "errors": issues}, status_code=422)

    @app.get("/api/jobs", response_model=JobList, tags=["jobs"])
    def jobs(
        state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict:
        """Newest first."""
        return {"jobs": store.list(state, limit)}

    @app.get("/api/jobs/{job_id}", response_model=Job, tags=["jobs"], responses={404: {"model": Error}})
    def job(job_id: JobId) -> dict:
        return job_or_404(job_id)

    @app.get(
        "/api/jobs/{job_id}/log", response_model=LogOut, tags=["jobs"], responses={404: {"model": Error}}
    )
    def job_log(job_id: JobId, offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> dict:
        """The log from character `offset`; poll again with the returned offset until `done`."""
        state = job_or_404(job_id)["state"]
        text, nxt = store.read_log(job_id, offset)
        return {"text": text, "offset": nxt, "done": state in FINAL and not store.read_log(job_id, nxt)[0]}

    @app.get(
        "/api/jobs/{job_id}/log/stream",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": Error}},
    )
    def job_log_stream(job_id: JobId, offset: Annotated[int, Query(ge=0, le=2**62)] = 0) -> StreamingResponse:
        """Server-sent events: one `data:` event per log line, then `event: end` (data: the state)."""
        job_or_404(job_id)
        return StreamingResponse(_stream(store, job_id, offset), media_type="text/event-stream")

    @app.post(
        "/api/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"], responses={404: {"model": Error}}
    )
    def cancel(job_id: JobId) -> dict:
        """A queued job is cancelled at once; a running one gets cancel_requested, and its worker
        interrupts the run (SIGINT, then SIGKILL after a grace period)."""
        job = store.cancel(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        store.note(job_id, "\n[moeplat: cancel requested]\n")
        return job

    @app.get("/api/jobs/{job_id}/runs", tags=["jobs"], responses={404: {"model": Error}})
    def job_runs(job_id: JobId) -> dict:
        """The MLflow runs the job made (tag moeplat.job_id), as RunSummary."""
        job_or_404(job_id)
        return {"runs": results.job_runs(settings, job_id)}

    @app.get("/api/jobs/{job_id}/studies", tags=["jobs"], responses={404: {"model": Error}})
    def job_studies(job_id: JobId) -> dict:
        """A sweep job's Optuna study, as StudySummary ([] for a run)."""
        job = job_or_404(job_id)
        return {"studies": results.job_studies(settings, job["study"], job["storage"])}


async def _stream(store: JobStore, job_id: int, offset: int, poll_s: float = 0.5) -> AsyncIterator[str]:
    partial = ""
    while True:
        job = await run_in_threadpool(store.get, job_id)
        text, offset = await run_in_threadpool(store.read_log, job_id, offset)
        lines = (partial + text).split("\n")
        partial = lines.pop()
        for line in lines:
            yield f"data: {line.replace(CR, '')}\n\n"  # a bare CR would end an SSE line
        if job is None or (job["state"] in FINAL and not text):
            if partial:
                yield f"data: {partial.replace(CR, '')}\n\n"
            yield f"event: end\ndata: {job['state'] if job else 'gone'}\n\n"
            return
        if not text:
            await asyncio.sleep(poll_s)


def _web(app: FastAPI, settings: ServerSettings) -> None:
    if (settings.web_dir / "index.html").is_file():
        app.mount("/", StaticFiles(directory=settings.web_dir, html=True), name="web")
        return

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def not_built() -> str:
        return NOT_BUILT
