"""Every entry point of moeplat turns MLflow's usage telemetry off before mlflow is imported
(moeplat.track.telemetry); the end-to-end check with a real run is test_no_phone_home.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# what MLflow itself takes as "CI or testing" (mlflow/telemetry/utils.py), and earlier choices
UNSET = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
CHECK = "import mlflow.telemetry as t, os; print(t.get_telemetry_client() is None, os.environ['MLFLOW_DISABLE_TELEMETRY'])"


@pytest.mark.parametrize(
    "entry",
    [
        "moeplat.cli.main",  # moeplat run/sweep/serve/worker and the processes they start
        "moeplat.server.app",  # the job server, also when an ASGI server imports it directly
        "moeplat.track.mlflow_run",  # moeplat used as a library
        "moeplat.sweep.launch",
    ],
)
def test_mlflow_has_no_telemetry_client_after_importing(entry):
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    out = subprocess.run(
        [sys.executable, "-c", f"import {entry}; {CHECK}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "true"]


def test_an_explicit_choice_is_kept():
    from moeplat.track.telemetry import no_telemetry

    before = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    try:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "false"
        no_telemetry()
        assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    finally:
        if before is None:
            os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)
        else:
            os.environ["MLFLOW_DISABLE_TELEMETRY"] = before
