"""A run opens no connection to any host but its tracking server (moeplat.track.telemetry).

The run and a real `mlflow server` (SQLite, artifacts proxied, so the server is also the
artifact store) are subprocesses with a sitecustomize that installs an audit hook: every
socket.connect / getaddrinfo / gethostbyname / sendto target is written to a file, and one that is
not loopback is refused there, so a test never really reaches the internet. The opted-in run shows
the hook sees MLflow's telemetry when it is on: without moeplat turning it off, the first test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_server import MlflowServer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
MOEPLAT = Path(sys.executable).parent / "moeplat"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
CONSENT = ("MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")
# MLflow stays silent in CI and under pytest whatever moeplat does (mlflow/telemetry/utils.py:
# _is_ci_env_or_testing); the run must not inherit these, or the test could not fail
CI_MARKERS = (
    "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
    "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID",
)  # fmt: skip

HOOK = """
import json, os, socket, sys

_LOG = os.environ["MOEPLAT_TEST_NETLOG"]
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
CONSENT = ("MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")


def _target(event, args):
    if event == "socket.connect" or event == "socket.sendto":
        sock, addr = args[0], args[1]
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or addr is None:
            return None
        return addr[0], addr[1]
    if event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        return (host, args[1]) if host is not None else None
    if event in ("socket.gethostbyname", "socket.gethostbyaddr"):
        return args[0], None
    return None


def _hook(event, args):
    if not event.startswith("socket."):
        return
    target = _target(event, args)
    if target is None:
        return
    host, port = target
    with open(_LOG, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "event": event, "host": str(host), "port": port}) + "\\n")
    if str(host) not in _LOOPBACK:
        raise OSError(f"test: no outbound connection to {host}:{port}")


sys.addaudithook(_hook)
"""


def _hooked_env(tmp_path: Path, log: Path, **extra: str) -> dict[str, str]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    # nor what tests/conftest.py set: the run must turn telemetry off by itself
    env = {k: v for k, v in os.environ.items() if k not in (*CI_MARKERS, *CONSENT)}
    path = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, "MOEPLAT_TEST_NETLOG": str(log), "OMP_NUM_THREADS": "1", **extra}


def _targets(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.fixture(scope="module")
def hooked_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("phone-home")
    log = root / "server-net.jsonl"
    env = _hooked_env(root, log)  # the helper adds MLFLOW_DISABLE_TELEMETRY: checked that it holds
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log", env)
    server.start()
    yield server, log
    server.kill()


def _run(tmp_path: Path, server: MlflowServer, **env: str) -> list[dict]:
    log = tmp_path / "run-net.jsonl"
    cmd = [str(MOEPLAT), "run", str(TINY), "--tracking-uri", server.uri, "--no-progress"]
    cmd += [
        "--set",
        "train.max_steps=3",
        "--set",
        "train.val_every=3",
        "--set",
        "tracking.experiment=phone-home",
    ]
    out = subprocess.run(
        cmd, cwd=tmp_path, env=_hooked_env(tmp_path, log, **env), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seen = _targets(log)
    assert any(t["port"] == server.port for t in seen), "the hook saw no connection to the server at all"
    return seen


def test_a_run_contacts_only_its_tracking_server(hooked_server, tmp_path):
    server, server_log = hooked_server
    seen = _run(tmp_path, server)
    others = [
        t for t in seen if t["host"] not in LOOPBACK or t["port"] not in (server.port, str(server.port))
    ]
    assert not others, f"the run contacted more than {server.uri}: {others}"
    outside = [t for t in _targets(server_log) if t["host"] not in LOOPBACK]
    assert not outside, f"mlflow server contacted {outside}"


def test_an_opted_in_run_is_seen_contacting_mlflows_telemetry(hooked_server, tmp_path):
    """The user's explicit MLFLOW_DISABLE_TELEMETRY=false is kept, and the hook catches the result."""
    server, _ = hooked_server
    seen = _run(tmp_path, server, MLFLOW_DISABLE_TELEMETRY="false")
    assert any("mlflow-telemetry" in t["host"] for t in seen), seen
