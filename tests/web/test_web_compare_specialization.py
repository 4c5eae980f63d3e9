"""The web compare page shows expert specialisation by source (moe/specialization, bits) as a column
of its runs table when a shown run logged it, in a real browser against the real app over an MLflow
store written here (no training: the page only reads what the runs logged)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import uvicorn
from mlflow import MlflowClient
from postgres import free_port

from moeplat.server.app import create_app
from moeplat.server.settings import ServerSettings

DIST = Path(__file__).resolve().parents[2] / "web" / "dist"


def _runs(uri: str, scores: list[dict]) -> list[str]:
    client = MlflowClient(uri)
    exp = client.create_experiment("mixtures")
    ids = []
    for i, metrics in enumerate(scores):
        run_id = client.create_run(exp, run_name=f"run{i}").info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, step=4)
        client.set_terminated(run_id)
        ids.append(run_id)
    return ids


@pytest.fixture
def app_url(tmp_path):
    if not (DIST / "index.html").is_file():
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
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", settings.tracking_uri
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _table(page, url: str, ids: list[str]) -> list[str]:
    page.goto(f"{url}/#/compare?runs={','.join(ids)}")
    page.wait_for_selector("#app[data-ready=compare]", timeout=30_000)
    return page.locator("#compare-runs th[data-metric]").all_inner_texts()


def test_compare_page_has_a_specialization_column_only_for_mixture_runs(app_url, browser):
    url, uri = app_url
    mixed, single = _runs(uri, [{"val/loss": 2.5, "moe/specialization": 0.3125}, {"val/loss": 2.25}])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    assert "moe/specialization" in _table(page, url, [mixed, single])

    def cell(run: str) -> str:
        return page.locator(
            f"#compare-runs tr[data-run='{run}'] td[data-metric='moe/specialization']"
        ).inner_text()

    assert [cell(mixed), cell(single)] == ["0.3125", "–"]
    assert "moe/specialization" not in _table(
        browser.new_page(), url, [single]
    )  # a fresh page: no stale table
    assert not errors, errors
