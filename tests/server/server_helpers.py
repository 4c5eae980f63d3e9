"""Shared pieces of the job server tests: a spec root with the tiny spec, settings, a live server.

Imported by the tests of this folder (pytest puts it on sys.path); fixtures are re-exported by
`from server_helpers import ...` in each test module.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from moeplat.server.app import create_app
from moeplat.server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
QUICKSTART = REPO / "specs" / "quickstart.yaml"


def write_root(root: Path) -> Path:
    """A spec root holding quickstart.yaml and tiny.yaml (extending it by a relative path)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "quickstart.yaml").write_text(QUICKSTART.read_text())
    (root / "tiny.yaml").write_text(
        TINY.read_text().replace("extends: ../../specs/quickstart.yaml", "extends: quickstart.yaml")
    )
    return root


@pytest.fixture
def spec_root(tmp_path) -> Path:
    return write_root(tmp_path / "specs")


def settings_for(tmp: Path, **kw) -> ServerSettings:
    values = {
        "spec_roots": (tmp / "specs",),
        "db_url": f"sqlite:///{tmp / 'jobs.db'}",
        "work_dir": tmp / "server",
        "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "sweep_storage": f"sqlite:///{tmp / 'optuna.db'}",
        "web_dir": tmp / "no-web",
        **kw,
    }
    return ServerSettings(**values)


@pytest.fixture
def settings(tmp_path, spec_root) -> ServerSettings:
    return settings_for(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(settings: ServerSettings) -> Iterator[str]:
    """The app under uvicorn in a thread of this process, on a free port; yields its URL."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_for(predicate, timeout_s: float = 60, every_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
