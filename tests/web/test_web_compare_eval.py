"""The web compare page shows downstream-task scores (eval/<task>/<metric>) as columns of its runs
table, in a real browser against a real `moeplat serve` over an MLflow store written here (no
training: the page only reads what the runs logged)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from postgres import free_port

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "web" / "dist"


def _runs(uri: str) -> list[str]:
    """Two runs: one scored on tiny_mc, the other on tiny_mc and tiny_ppl (with standard errors)."""
    client = MlflowClient(uri)
    exp = client.create_experiment("evals")
    scores = [
        {"val/loss": 2.5, "eval/tiny_mc/acc": 0.375, "eval/tiny_mc/acc_stderr": 0.18},
        {"val/loss": 2.25, "eval/tiny_mc/acc": 0.625, "eval/tiny_ppl/bits_per_byte": 3.5},
    ]
    ids = []
    for i, metrics in enumerate(scores):
        run_id = client.create_run(exp, run_name=f"run{i}").info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, step=4)
        client.set_terminated(run_id)
        ids.append(run_id)
    return ids


@pytest.fixture
def server(tmp_path):
    if not (DIST / "index.html").is_file():
        if os.environ.get("MOEPLAT_REQUIRE_BROWSER") == "1":
            pytest.fail("web/dist is not built: run `make web` (needs npm)")
        pytest.skip("web/dist is not built: run `make web` (needs npm)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = _runs(uri)
    (tmp_path / "specs").mkdir()
    port = free_port()
    cmd = [
        sys.executable, "-m", "moeplat.cli.main", "serve", "--port", str(port),
        "--db", f"sqlite:///{tmp_path / 'jobs.db'}", "--spec-root", str(tmp_path / "specs"),
        "--work-dir", str(tmp_path / "server"), "--web-dir", str(DIST), "--tracking-uri", uri,
        "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
    ]  # fmt: skip
    env = {**os.environ, "MOEPLAT_TOKEN": ""}
    env.pop("MOEPLAT_SPEC_ROOTS", None)
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/api/health", timeout=5).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(
                            f"moeplat serve did not come up:\n{(tmp_path / 'server.log').read_text()}"
                        )
                    time.sleep(0.3)
            yield url, ids
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_compare_page_has_a_column_per_eval_score(server, browser):
    url, (a, b) = server
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/#/compare?runs={a},{b}")
    page.wait_for_selector("#app[data-ready=compare]", timeout=30_000)
    heads = page.locator("#compare-runs th[data-metric]").all_inner_texts()
    assert heads[-2:] == ["eval/tiny_mc/acc", "eval/tiny_ppl/bits_per_byte"]  # no stderr column
    assert "val/loss" in heads

    def cell(run: str, key: str) -> str:
        return page.locator(f"#compare-runs tr[data-run='{run}'] td[data-metric='{key}']").inner_text()

    assert [cell(a, "eval/tiny_mc/acc"), cell(b, "eval/tiny_mc/acc")] == ["0.3750", "0.6250"]
    assert [cell(a, "eval/tiny_ppl/bits_per_byte"), cell(b, "eval/tiny_ppl/bits_per_byte")] == ["–", "3.500"]
    assert not errors, errors
