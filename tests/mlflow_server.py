"""A real `mlflow server` subprocess for tests: on any backend store (PostgreSQL in team mode,
SQLite elsewhere), artifacts proxied by the server, in its own process group so a test can kill
it with its workers (an outage) and start it again on the same port and store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from postgres import free_port

MLFLOW = Path(sys.executable).parent / "mlflow"


class MlflowServer:
    def __init__(self, backend: str, artifacts: Path, log: Path, env: dict[str, str] | None = None):
        self.backend, self.artifacts, self.log = backend, artifacts, log
        # a server the tests start sends no usage telemetry (moeplat.track.telemetry)
        self.env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90) -> None:
        cmd = [
            str(MLFLOW), "server", "--backend-store-uri", self.backend,
            "--artifacts-destination", self.artifacts.as_uri(), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.kill()
        pytest.fail(f"mlflow server did not answer /health in {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers: no goodbye to the clients."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None
