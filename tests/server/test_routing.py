"""A run's routing view on the job server (moeplat.server.routing): the routing/route.html artifact
read back, a route job queued for a run, and a real worker running `moeplat route --log` for it.

The run is tests/route_fixture.py's (the tiny MoE, untrained, stored in the server's MLflow store).
"""

from __future__ import annotations

import httpx
import pytest
from route_fixture import stored_run
from server_helpers import live_server, settings_for, spec_root, wait_for  # noqa: F401

from moeplat.server.worker import Worker
from moeplat.track.artifacts import log_texts

PAGE = "<!doctype html><p>routing of <b>tiny</b></p>"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server URL, settings, routed run id, plain run id): only the first has a routing view."""
    tmp = tmp_path_factory.mktemp("routing")
    (tmp / "specs").mkdir()
    settings = settings_for(tmp)
    routed, _ = stored_run(tmp, settings.tracking_uri)
    plain, _ = stored_run(tmp / "plain", settings.tracking_uri)
    log_texts(settings.tracking_uri, routed, "routing", {"route.html": PAGE})
    with live_server(settings) as url:
        yield url, settings, routed, plain


def test_the_routing_view_is_the_runs_artifact_or_null(served):
    url, _, routed, plain = served
    r = httpx.get(f"{url}/api/runs/{routed}/routing")
    assert r.status_code == 200 and r.json() == {"html": PAGE}
    r = httpx.get(f"{url}/api/runs/{plain}/routing")
    assert r.status_code == 200 and r.json() == {"html": None}


def test_unknown_or_malformed_runs_are_4xx_with_a_message(served):
    url = served[0]
    for method in ("get", "post"):
        r = httpx.request(method, f"{url}/api/runs/0123456789abcdef/routing", json={})
        assert r.status_code == 404 and "unknown run id '0123456789abcdef'" in r.json()["detail"]
        r = httpx.request(method, f"{url}/api/runs/bad%20id!/routing", json={})
        assert r.status_code == 422 and "malformed run id" in r.json()["detail"]
    run = served[2]
    r = httpx.post(f"{url}/api/runs/{run}/routing", json={"txt": "typo"})
    assert r.status_code == 422 and "txt" in str(r.json()["detail"])
    r = httpx.post(f"{url}/api/runs/{run}/routing", json={"text": "x" * (256 * 1024 + 1)})
    assert r.status_code == 422


def test_a_worker_runs_the_route_job_and_the_view_appears(served, tmp_path):
    url, _, _, plain = served
    text = "while True:\n    pass  # <script>alert(1)</script>\n"
    r = httpx.post(f"{url}/api/runs/{plain}/routing", json={"text": text})
    assert r.status_code == 201
    job = r.json()
    assert job["kind"] == "route" and job["name"] == f"route {plain}" and job["state"] == "queued"

    worker = Worker(server=url, work_dir=tmp_path / "worker", poll_s=0.2)
    assert worker.serve(once=True) == 1
    done = httpx.get(f"{url}/api/jobs/{job['id']}").json()
    log = httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"]
    assert done["state"] == "succeeded", log
    assert f"{len(text)} tokens, text " in log and f"to run {plain}" in log
    html = wait_for(lambda: httpx.get(f"{url}/api/runs/{plain}/routing").json()["html"], what="the view")
    assert html.count('data-i="') == len(text) and "<script>alert" not in html


def test_a_route_job_without_text_asks_for_the_validation_text(served, tmp_path):
    url, _, routed, _ = served
    job = httpx.post(f"{url}/api/runs/{routed}/routing", json={}).json()
    claimed = {
        "job": job,
        "text": "",
        "overrides": [routed],
        "tracking_uri": "sqlite:////x/mlflow.db",
        "spec_root": str(tmp_path),
    }
    cmd = Worker(server=url, work_dir=tmp_path).command(claimed, tmp_path / "jobs" / "1-1" / "route.txt")
    assert cmd[3:] == [
        "route",
        routed,
        "--val-text",
        "--log",
        "--tracking-uri",
        "sqlite:////x/mlflow.db",
        "-o",
        str(tmp_path / "jobs" / "1-1" / "route.html"),
    ]
    httpx.post(f"{url}/api/jobs/{job['id']}/cancel")  # not run here: the next test's worker skips it
