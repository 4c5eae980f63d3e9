"""Screenshots of the MLflow UI comparing moeplat runs, taken with headless Debian Chromium.

    .venv/bin/python scripts/mlflow_screenshots.py --store sqlite:////tmp/shots/mlflow.db \
        --runs RUN_A RUN_B --out docs/img

Starts `mlflow server` on the store (a free loopback port), opens the run-comparison view of the
given runs, the experiment's chart view of the same runs and each run's artifact view of the
expert-load heatmap, and writes PNGs to --out. Chromium comes from scripts/system-deps.sh, driven by
playwright as in tests/browser.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import launch  # noqa: E402  (tests/browser.py: the one place the Chromium flags live)
from postgres import free_port  # noqa: E402


def start_mlflow(store: str, port: int, artifacts: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
        "--default-artifact-root", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}  # no usage telemetry (README, Telemetry)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not come up in 90 s")


def experiment_of(base: str, run_id: str) -> str:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as r:
        return json.load(r)["run"]["info"]["experiment_id"]


def shoot(
    page, url: str, path: Path, wait_text: str, chart_filter: str | None = None, click: str | None = None
) -> None:
    page.goto(url)
    page.get_by_text(wait_text).first.wait_for(state="attached", timeout=60_000)
    close = page.get_by_role("button", name="Close")  # MLflow 3's assistant side panel
    if close.count():
        close.first.click()
    if chart_filter:
        page.get_by_placeholder("Search metric charts").fill(chart_filter)
    if click:
        page.get_by_text(click).first.click()
    page.wait_for_timeout(3000)  # charts animate in
    page.screenshot(path=str(path))
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="MLflow backend store URI holding the runs")
    ap.add_argument("--artifacts", default="./mlruns", help="default artifact root of that store")
    ap.add_argument("--runs", nargs=2, required=True, metavar="RUN_ID")
    ap.add_argument("--out", default=str(REPO / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_mlflow(args.store, port, args.artifacts)
    base = f"http://127.0.0.1:{port}"
    try:
        from playwright.sync_api import sync_playwright

        exp = experiment_of(base, args.runs[0])
        runs = urllib.parse.quote(json.dumps(args.runs))
        with sync_playwright() as pw:
            browser = launch(pw)
            page = browser.new_page(viewport={"width": 1600, "height": 1500})
            compare = f"{base}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([exp]))}"
            shoot(page, compare, out / "mlflow-compare.png", "model.moe.top_k", click="Show diff only")
            charts = f"{base}/#/experiments/{exp}/runs?compareRunsMode=CHART"
            shoot(page, charts, out / "mlflow-charts-loss.png", "Run Name", chart_filter="/loss")
            shoot(page, charts, out / "mlflow-charts-maxvio.png", "Run Name", chart_filter="all/maxvio")
            for i, run in enumerate(args.runs):
                art = f"{base}/#/experiments/{exp}/runs/{run}/artifacts/plots/load_heatmap_layers.png"
                shoot(page, art, out / f"mlflow-heatmap-{'ab'[i]}.png", "load_heatmap_layers.png")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
