"""A run's routing view on the job server: read it, or queue a job that makes it.

    GET  /api/runs/{run_id}/routing   {"html": the run's routing/route.html artifact, or null}
    POST /api/runs/{run_id}/routing   {"text": str | null} -> 201, a queued job of kind "route"

The server never imports torch: routing is computed by `moeplat route RUN_ID --log` in a worker
(moeplat.server.worker builds the command), which stores routing/route.html in the run; the web
UI's run page then shows it in a sandboxed iframe. A route job keeps the text to route in the job's
`text` ("" = the run's own validation text) and the run id as its only `overrides` entry.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field

from moeplat.server.jobs import JobStore
from moeplat.server.results import _call, _run_id
from moeplat.server.security import RequestModel

ROUTE_HTML = "routing/route.html"
MAX_TEXT_CHARS = 256 * 1024  # the view routes at most a few thousand tokens anyway
TEXT_FILE = "route.txt"


class RouteRequest(RequestModel):
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = Field(
        None, description="the text to route; null or empty: the run's own validation text"
    )


class RoutingView(BaseModel):
    html: str | None  # null when the run has no routing view yet


def route_job_fields(run_id: str, text: str | None) -> dict:
    """The job row of a route job (see the module docstring)."""
    return {
        "kind": "route",
        "name": f"route {run_id}",
        "text": text or "",
        "filename": TEXT_FILE,
        "root_index": 0,
        "overrides": [run_id],
    }


def router(settings, store: JobStore) -> APIRouter:
    r = APIRouter(tags=["results"])

    @r.get("/api/runs/{run_id}/routing", response_model=RoutingView)
    def routing(run_id: str) -> dict:
        """The run's routing view (`moeplat route --log`), a self-contained HTML page; show it
        sandboxed (iframe sandbox="allow-scripts", srcdoc): it holds text from the run's data."""
        from moeplat.track.artifacts import read_text

        _run_id(run_id)
        return {"html": _call("MLflow", read_text, settings.tracking_uri, run_id, ROUTE_HTML)}

    @r.post("/api/runs/{run_id}/routing", status_code=201, tags=["jobs"])
    def make_routing(run_id: str, body: RouteRequest) -> dict:
        """Queue `moeplat route RUN_ID --text <text> --log` (or --val-text when text is empty)."""
        from moeplat.track import query

        _run_id(run_id)
        runs = _call("MLflow", query.runs_by_ids, settings.tracking_uri, [run_id])  # unknown: 404
        return store.submit(**route_job_fields(runs[0]["run_id"], body.text))

    return r
