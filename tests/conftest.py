from __future__ import annotations

from pathlib import Path

import pytest

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
