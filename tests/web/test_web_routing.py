"""The web UI's run page (#/runs/ID, web/src/run.ts) in a real browser: a run without a routing view
offers the form, the route job it queues runs on a real worker, and the view appears in a sandboxed
iframe where tokens are coloured and their tooltip lists the experts; the text's markup stays text.

The server (uvicorn in a thread, serving web/dist) and the worker (a thread; the job is a
`moeplat route` subprocess) use a temporary jobs database and MLflow store holding one untrained tiny
MoE run (tests/route_fixture.py), so no training is needed.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from route_fixture import stored_run

from moeplat.server.app import create_app
from moeplat.server.settings import ServerSettings
from moeplat.server.worker import Worker

DIST = Path(__file__).resolve().parents[2] / "web" / "dist"
TEXT = 'print("héllo")  # <img src=x onerror=alert(1)>\n'


@pytest.fixture
def stack(tmp_path):
    """(base URL, run id) of a server with a worker thread, and the stored run."""
    if not (DIST / "index.html").is_file():
        if os.environ.get("MOEPLAT_REQUIRE_BROWSER") == "1":
            pytest.fail("web/dist is not built: run `make web` (needs npm)")
        pytest.skip("web/dist is not built: run `make web` (needs npm)")
    (tmp_path / "specs").mkdir()
    settings = ServerSettings(
        spec_roots=(tmp_path / "specs",),
        db_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        work_dir=tmp_path / "server",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        sweep_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        web_dir=DIST,
    )
    run_id, _ = stored_run(tmp_path, settings.tracking_uri)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    worker = Worker(server=url, work_dir=tmp_path / "worker", poll_s=0.3)
    worker_thread = threading.Thread(target=worker.serve, kwargs={"stop": stop}, daemon=True)
    worker_thread.start()
    try:
        yield url, run_id
    finally:
        stop.set()
        worker_thread.join(timeout=60)
        server.should_exit = True
        thread.join(timeout=30)


def test_run_page_makes_and_shows_the_routing_view(stack, browser):
    url, run_id = stack
    page = browser.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{url}/#/runs/{run_id}")
    page.wait_for_selector("#app[data-ready=run]")
    assert page.locator("#no-routing").is_visible()
    assert page.locator("#run-head").inner_text().startswith("name")

    page.fill("#route-text", TEXT)
    page.click("#route-submit")
    page.wait_for_selector("#route-status a[href^='#/jobs/']")
    page.wait_for_selector("#routing-view", timeout=180_000)  # the job imports torch, routes, logs
    assert page.get_attribute("#routing-view", "sandbox") == "allow-scripts"

    view = page.frame_locator("#routing-view")
    view.locator("body[data-ready='1']").wait_for()
    spans = view.locator("#text .t")
    assert spans.count() == len(TEXT.encode())  # the byte tokenizer: one span per byte
    assert view.locator("#text img").count() == 0 and "<img src=x" in view.locator("#text").inner_text()
    first = spans.nth(0)
    assert first.evaluate("s => s.style.background") != ""  # coloured by its heaviest expert
    first.hover()
    tip = view.locator("#tip")
    assert tip.is_visible() and "expert" in tip.inner_text() and "layer 0" in tip.inner_text()
    view.locator("#layer").select_option("1")  # the second MoE layer: its own tables shown
    assert view.locator("section.layer[data-layer='1']").is_visible()
    assert not view.locator("section.layer[data-layer='0']").is_visible()
    assert dialogs == []  # nothing from the text ran

    page.reload()  # the view is the run's artifact now: shown at once
    page.wait_for_selector("#app[data-ready=run]")
    assert page.locator("#routing-view").count() == 1
    page.close()
