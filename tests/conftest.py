from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from moeplat.track.telemetry import no_telemetry

# every process a test starts (runs, workers, `mlflow server`) inherits it: no usage telemetry
no_telemetry()
# BPE tokenizers that tests train are cached here, never in the user's ~/.cache/moeplat
_CACHE = tempfile.mkdtemp(prefix="moeplat-test-cache-")
os.environ["MOEPLAT_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# A suite started in the background of a non-interactive shell (`make test &`) inherits SIGINT
# ignored, and so would every process its tests start: the Ctrl-C and cancel tests would then test
# nothing but that. Python's own Ctrl-C handler, as in a terminal (started processes get it too).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"


@pytest.fixture
def tiny_spec_path() -> Path:
    return TINY


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run from a fresh directory so the default local MLflow store and runs/ land in tmp."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """A test that leaves SIGINT ignored (Lightning ignores it while it shuts down after a Ctrl-C)
    would make every later subprocess ignore it too, and their Ctrl-C / cancel tests fail."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"the test left the SIGINT handler changed: {before!r} -> {after!r}")
