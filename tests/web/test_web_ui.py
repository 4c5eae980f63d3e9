"""The web UI in a real browser against a real `moeplat serve` + `moeplat worker` (docs/web-ui.md).

Debian's Chromium through tests/browser.py; the server and the worker are subprocesses with a
temporary spec root (quickstart.yaml and a copy of tests/fixtures/tiny.yaml), a temporary SQLite
jobs database and MLflow store. Screenshots go to $MOEPLAT_TEST_ARTIFACTS (else the pytest tmp dir);
with MOEPLAT_DOCS_SCREENSHOTS=1 the polished ones are also written to docs/img/ui-*.png:

    MOEPLAT_DOCS_SCREENSHOTS=1 .venv/bin/pytest -q tests/web/test_web_ui.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import free_port

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "web" / "dist"
DOCS_IMG = REPO / "docs" / "img"
MOEPLAT = [sys.executable, "-m", "moeplat.cli.main"]
RUN_TIMEOUT_S = 240  # a tiny run takes ~20 s alone; the 2-core machine may be busy

TINY = (REPO / "tests" / "fixtures" / "tiny.yaml").read_text()
# the tiny spec as the user would paste it: extends the quickstart next to it in the spec root
SPEC = TINY.replace("extends: ../../specs/quickstart.yaml", "extends: quickstart.yaml")
TYPO = SPEC.replace("    top_k: 2\n", "    top_kk: 2\n")
TYPO_LINE = TYPO.splitlines().index("    top_kk: 2") + 1
DOCS = os.environ.get("MOEPLAT_DOCS_SCREENSHOTS") == "1"
# docs/img screenshots show longer curves than the 12 steps the test needs
RUN_SPEC = (
    SPEC.replace("max_steps: 12", "max_steps: 90").replace("val_every: 6", "val_every: 15") if DOCS else SPEC
)
MLFLOW_UI = "http://mlflow.example:5000"


def _get(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[str]:
    """A server and a worker on a temporary spec root, jobs DB and MLflow store; yields the base URL."""
    if not (DIST / "index.html").is_file():
        message = "web/dist is not built: run `make web` (needs npm)"
        if os.environ.get("MOEPLAT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("web-stack")
    root = tmp / "specs"
    root.mkdir()
    shutil.copy(REPO / "specs" / "quickstart.yaml", root / "quickstart.yaml")
    (root / "tiny.yaml").write_text(SPEC)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MOEPLAT_TOKEN": "",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "MOEPLAT_MLFLOW_UI_URL": MLFLOW_UI,  # only for links
    }
    env.pop("MOEPLAT_SPEC_ROOTS", None)
    serve_cmd = [
        *MOEPLAT, "serve", "--port", str(port), "--db", f"sqlite:///{tmp / 'jobs.db'}",
        "--spec-root", str(root), "--work-dir", str(tmp / "server"), "--web-dir", str(DIST),
        "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--storage", f"sqlite:///{tmp / 'optuna.db'}",
    ]  # fmt: skip
    worker_cmd = [*MOEPLAT, "worker", "--server", url, "--work-dir", str(tmp / "worker"), "--poll", "0.5"]
    logs = {name: open(tmp / f"{name}.log", "w") for name in ("server", "worker")}  # noqa: SIM115
    server = subprocess.Popen(serve_cmd, cwd=tmp, env=env, stdout=logs["server"], stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert _get(f"{url}/api/health")["ok"]
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moeplat serve did not come up:\n{(tmp / 'server.log').read_text()}")
                time.sleep(0.3)
        worker = subprocess.Popen(
            worker_cmd, cwd=tmp, env=env, stdout=logs["worker"], stderr=subprocess.STDOUT
        )
        yield url
    finally:
        for proc in (worker, server):
            if proc is not None:
                _stop(proc)
        for f in logs.values():
            f.close()
        for name in logs:
            print(f"--- {name} log (tail)\n{(tmp / f'{name}.log').read_text()[-3000:]}")


@pytest.fixture
def artifacts(tmp_path) -> Path:
    out = Path(os.environ.get("MOEPLAT_TEST_ARTIFACTS") or tmp_path) / "web"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shot(page, artifacts: Path, name: str, docs: bool = False, element=None) -> None:
    """A screenshot of the viewport (or of `element`), also to docs/img when asked to."""
    target = element or page
    target.screenshot(path=str(artifacts / f"{name}.png"))
    if docs and DOCS:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        target.screenshot(path=str(DOCS_IMG / f"{name}.png"))


def _set_text(page, text: str) -> None:
    """Select all and paste, as a user would."""
    page.click(".cm-content")
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(text)


def _marker_lines(page) -> list[int]:
    """1-based document lines that carry an error lint range."""
    return page.evaluate(
        """() => { const v = window.moeplatEditor;
            return [...document.querySelectorAll('.cm-lintRange-error')]
              .map(el => v.state.doc.lineAt(v.posAtDOM(el)).number); }"""
    )


def _wait_state(page, job_id: int, states: tuple[str, ...], timeout_s: float) -> str:
    sel = f"#jobs tr[data-job='{job_id}'] .badge"
    page.wait_for_function(
        "([sel, states]) => { const b = document.querySelector(sel); return b && states.includes(b.dataset.state); }",
        arg=[sel, list(states)],
        timeout=timeout_s * 1000,
        polling=500,
    )
    return page.get_attribute(sel, "data-state")


@pytest.mark.slow
def test_edit_launch_watch_compare(stack, browser, artifacts):
    context = browser.new_context(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    # load: navigation to the editor mounted with its schema
    t0 = time.perf_counter()
    page.goto(f"{stack}/#/editor")
    page.wait_for_selector("#app[data-ready=editor]", timeout=30_000)
    load_s = time.perf_counter() - t0
    nav = page.evaluate("() => performance.getEntriesByType('navigation')[0].responseStart")
    ready_ms = page.evaluate("() => window.moeplatReadyAt")
    print(
        f"UI load: {load_s * 1000:.0f} ms from goto to editor ready ({ready_ms - nav:.0f} ms after the first byte)"
    )
    assert page.inner_text("#version").startswith("moeplat ")

    # a typo: the error sits on its line and names the key
    _set_text(page, TYPO)
    page.wait_for_selector(".cm-lintRange-error", timeout=15_000)
    assert _marker_lines(page) == [TYPO_LINE]
    problem = page.locator(f"#problems .problem[data-line='{TYPO_LINE}']")
    assert "top_kk" in problem.inner_text() and "unknown key" in problem.inner_text()
    assert "did you mean 'top_k'" in problem.inner_text()
    page.hover(".cm-lintRange-error")
    tooltip = page.wait_for_selector(".cm-tooltip-lint", timeout=5_000)
    assert "model.moe.top_kk" in tooltip.inner_text()
    assert page.inner_text("#launch") == "Launch run"
    _shot(page, artifacts, "ui-editor", docs=True)

    # schema completion: keys of the mapping at the cursor
    page.mouse.move(0, 0)
    page.click(".cm-content")
    page.keyboard.press("Control+End")
    page.keyboard.type("\npar")
    completion = page.wait_for_selector(".cm-tooltip-autocomplete", timeout=5_000)
    assert "parallel" in completion.inner_text()
    page.keyboard.press("Escape")

    # fixed: no marker, the plan appears
    _set_text(page, RUN_SPEC)
    page.wait_for_selector("#problems .problem.ok", timeout=15_000)
    assert _marker_lines(page) == []
    page.wait_for_selector("#plan [data-plan=total_params]", timeout=15_000)
    assert page.inner_text("#plan [data-plan=active_params]").strip()

    # launch: the job page with its live log
    page.click("#launch")
    page.wait_for_url("**/#/jobs/*", timeout=15_000)
    job_id = int(page.url.rsplit("/", 1)[1])
    # a second run to compare against (switch router, top-1), queued through the API
    other = _post(
        f"{stack}/api/jobs",
        {
            "kind": "run",
            "text": RUN_SPEC,
            "overrides": ["model.moe.router={kind: switch}", "model.moe.top_k=1"],
        },
    )
    page.wait_for_function(
        "() => document.querySelector('#log').textContent.length > 0", timeout=RUN_TIMEOUT_S * 1000
    )
    _shot(page, artifacts, "ui-job-running")

    # the job list shows it succeed
    page.click("nav a[data-page=jobs]")
    assert _wait_state(page, job_id, ("succeeded", "failed", "cancelled"), RUN_TIMEOUT_S) == "succeeded"
    assert _wait_state(page, other["id"], ("succeeded", "failed", "cancelled"), RUN_TIMEOUT_S) == "succeeded"
    _shot(page, artifacts, "ui-jobs")

    # the job page: full log, its MLflow run
    page.goto(f"{stack}/#/jobs/{job_id}")
    page.wait_for_selector("#job-runs tr[data-run]", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#log').textContent.length > 200", timeout=10_000)
    run_id = page.get_attribute("#job-runs tr[data-run]", "data-run")
    assert page.locator("#cancel").is_hidden()
    assert page.get_attribute("#job-runs a[target=_blank]", "href").startswith(MLFLOW_UI)
    _shot(page, artifacts, "ui-job", docs=True)
    other_run = _get(f"{stack}/api/jobs/{other['id']}/runs")["runs"][0]["run_id"]

    # compare both runs: overlaid curves and a heatmap per run (2 layers x 4 experts)
    page.goto(f"{stack}/#/compare?runs={run_id},{other_run}")
    page.wait_for_selector("#app[data-ready=compare]", timeout=30_000)
    for key in ("train/loss", "val/loss"):
        series = page.locator(f"figure[data-chart='{key}'] path.series")
        assert series.count() == 2, key
    maps = page.locator("#heatmaps svg.heatmap")
    assert maps.count() == 2
    assert page.locator("#heatmaps svg.heatmap").first.locator("rect.cell").count() == 2 * 4
    assert page.locator("#compare-runs tr[data-run]").count() == 2
    _shot(page, artifacts, "ui-compare", docs=True)

    assert not errors, errors
    context.close()


SWEEP = """\
name: tiny-pareto
extends: tiny.yaml
overrides:
  train.max_steps: 6
  train.val_every: 6
search:
  model.moe.top_k: {kind: int, low: 1, high: 2}
  model.moe.experts.d_ff: {kind: int, low: 16, high: 48, step: 16}
objectives:
  - {metric: val/loss, direction: minimize}
  - {metric: plan.active_params, direction: minimize}
sampler: {kind: random}
pruner: {kind: none}
trials:
  n_trials: 4
"""


@pytest.mark.slow
def test_sweep_study_pareto_and_importances(stack, browser, artifacts):
    """A sweep launched from the editor: the compare page of its job draws the study's trials with
    the Pareto front highlighted, the importances, and curves of its trial runs."""
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{stack}/#/editor")
    page.wait_for_selector("#app[data-ready=editor]", timeout=30_000)
    page.click("button[data-kind=sweep]")
    assert page.inner_text("#launch") == "Launch sweep"
    _set_text(page, SWEEP)
    page.wait_for_selector("#problems .problem.ok", timeout=15_000)
    page.click("#launch")
    page.wait_for_url("**/#/jobs/*", timeout=15_000)
    job_id = int(page.url.rsplit("/", 1)[1])
    page.click("nav a[data-page=jobs]")
    assert _wait_state(page, job_id, ("succeeded", "failed", "cancelled"), 2 * RUN_TIMEOUT_S) == "succeeded"

    page.goto(f"{stack}/#/compare?job={job_id}")
    page.wait_for_selector("#app[data-ready=compare]", timeout=60_000)
    study = _get(f"{stack}/api/jobs/{job_id}/studies")["studies"][0]["name"]
    section = page.locator(f"section[data-study='{study}']")
    detail = _get(f"{stack}/api/studies/{study}")
    finished = [t for t in detail["trials"] if t["values"]]
    assert section.locator("figure[data-chart='Pareto front'] circle.dot").count() == len(finished) == 4
    assert section.locator("circle.dot.front").count() == len(detail["pareto"]) >= 1
    assert section.locator(".bar-row").count() == len(detail["importances"])
    # one curve per trial run (the parent sweep run has none of its own)
    assert page.locator("figure[data-chart='val/loss'] path.series").count() == 4
    _shot(page, artifacts, "ui-study", docs=True, element=section)
    assert not errors, errors
    page.close()


@pytest.mark.slow
def test_a_sweep_spread_over_workers_shows_as_one_with_its_progress(stack, browser, artifacts):
    """The editor's workers field: 0 is refused before submitting; 2 queues two sweep-worker jobs
    joining one study, shown as one row in the job list and, on each job's page, the study's
    progress up to exactly its n_trials."""
    page = browser.new_page(viewport={"width": 1360, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{stack}/#/editor")
    page.wait_for_selector("#app[data-ready=editor]", timeout=30_000)
    page.click("button[data-kind=run]")
    assert page.is_hidden("#parallel")  # a run's width is its parallel.devices
    page.click("button[data-kind=sweep]")
    _set_text(page, SWEEP.replace("name: tiny-pareto", "name: tiny-spread"))
    page.wait_for_selector("#problems .problem.ok", timeout=15_000)
    page.fill("#parallel", "0")
    page.click("#launch")
    page.wait_for_function("() => document.querySelector('#editor-status').textContent.includes('workers')")
    assert "1 or more" in page.inner_text("#editor-status")
    page.fill("#parallel", "2")
    page.click("#launch")
    page.wait_for_url("**/#/jobs/*", timeout=15_000)
    job_id = int(page.url.rsplit("/", 1)[1])
    page.wait_for_selector("#job-group #group-progress", timeout=30_000)
    group = _get(f"{stack}/api/jobs/{job_id}")["group"]
    assert len(_get(f"{stack}/api/groups/{group}")["jobs"]) == 2
    page.wait_for_function(
        "() => document.querySelector('#group-progress').textContent.startsWith('4 of 4 trials finished')",
        timeout=2 * RUN_TIMEOUT_S * 1000,
        polling=1000,
    )
    page.click("nav a[data-page=jobs]")
    row = page.locator(f"#jobs tr[data-group='{group}']")
    row.wait_for(timeout=10_000)
    page.wait_for_function(
        f"() => document.querySelector(\"#jobs tr[data-group='{group}'] .badge\")?.dataset.state === 'succeeded'",
        timeout=2 * RUN_TIMEOUT_S * 1000,
        polling=1000,
    )
    assert "4 of 4 trials finished" in row.inner_text() and "sweep ×2" in row.inner_text()
    assert page.locator("#jobs tr[data-job]").filter(has_text="tiny-spread").count() == 0  # one row
    _shot(page, artifacts, "ui-sweep-group")
    assert not errors, errors
    page.close()


def _a_slurm_jobs_detail(page, url: str, token: str) -> None:
    def call(path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{url}{path}",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    job = call("/api/jobs", {"path": "quickstart.yaml", "overrides": ["parallel.accelerator=cpu"]})
    assert call("/api/worker/claim", {"worker": "slurm-bridge"})["job"]["id"] == job["id"]
    lease = {"worker": "slurm-bridge", "attempt": 1}
    call(f"/api/worker/jobs/{job['id']}/heartbeat", {**lease, "detail": "SLURM PENDING (Resources)"})
    page.goto(f"{url}/#/jobs")
    cell = f"#jobs tr[data-job='{job['id']}'] td[data-detail]"
    page.wait_for_selector(cell, timeout=15_000)
    assert page.get_attribute(cell, "data-detail") == "SLURM PENDING (Resources)"
    assert page.inner_text(cell) == "slurm-bridge (SLURM PENDING (Resources))"
    assert page.get_attribute(f"#jobs tr[data-job='{job['id']}'] .badge", "data-state") == "running"
    call(f"/api/worker/jobs/{job['id']}/heartbeat", {**lease, "detail": "SLURM RUNNING on node node1"})
    page.wait_for_function(  # the list polls: the new detail replaces the old
        "(sel) => document.querySelector(sel)?.dataset.detail === 'SLURM RUNNING on node node1'",
        arg=cell,
        timeout=15_000,
        polling=500,
    )
    page.goto(f"{url}/#/jobs/{job['id']}")
    page.wait_for_selector("#job-detail", timeout=15_000)
    assert page.inner_text("#job-detail") == "SLURM RUNNING on node node1"


def test_token_field_when_the_server_needs_one(browser, tmp_path):
    """With a token configured the UI asks for it, keeps it in localStorage and sends it. Then, on
    this server without workers, a job held by a stand-in SLURM bridge (claimed and heartbeated
    through the worker API) shows what SLURM does with it, as the heartbeat says: in the job list
    (updated live) and on the job's page."""
    if not (DIST / "index.html").is_file():
        pytest.skip("web/dist is not built: run `make web` (needs npm)")
    root = tmp_path / "specs"
    root.mkdir()
    shutil.copy(REPO / "specs" / "quickstart.yaml", root / "quickstart.yaml")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        *MOEPLAT, "serve", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'jobs.db'}",
        "--spec-root", str(root), "--work-dir", str(tmp_path / "server"), "--web-dir", str(DIST),
        "--token", "s3cret-token",
    ]  # fmt: skip
    env = {**os.environ, "MOEPLAT_TOKEN": ""}
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert _get(f"{url}/api/health")["auth"] is True
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "server.log"
                ).read_text()
                time.sleep(0.3)
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{url}/#/editor")
        page.wait_for_selector("#auth:not([hidden]) #token", timeout=15_000)
        page.fill("#token", "wrong")
        page.click("#auth button")
        # the wrong token is refused (401): the field comes back and says so
        page.wait_for_selector("#auth:not([hidden]) >> text=refused", timeout=15_000)
        page.fill("#token", "s3cret-token")
        page.click("#auth button")
        page.wait_for_selector("#problems .problem.ok", timeout=15_000)
        assert page.evaluate("localStorage.getItem('moeplat.token')") == "s3cret-token"
        assert page.locator("#auth").is_hidden()
        _a_slurm_jobs_detail(page, url, "s3cret-token")
        context.close()
    finally:
        _stop(server)
