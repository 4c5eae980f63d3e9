"""The python_docs corpus for the tests: Debian's python3.11-doc, installed by scripts/system-deps.sh.

Tests that need it skip when it is missing, unless MOEPLAT_REQUIRE_DOCS=1 (set by .ci/run): then a
missing package fails them, so CI cannot pass by skipping (the pattern of tests/browser.py)."""

from __future__ import annotations

import os

import pytest

from moeplat.data.sources import PYTHON_DOCS_HOW, python_docs_dir


def require_python_docs() -> None:
    if python_docs_dir().is_dir():
        return
    message = f"{python_docs_dir()} missing: {PYTHON_DOCS_HOW}"
    if os.environ.get("MOEPLAT_REQUIRE_DOCS") == "1":
        pytest.fail(message)
    pytest.skip(message)
