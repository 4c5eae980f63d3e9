"""Headless Debian Chromium driven by playwright, for the browser tests and the docs screenshots.

playwright's own browser download does not work on our machines, so it drives the system package
(/usr/bin/chromium, installed by scripts/system-deps.sh). Where Chromium is missing the tests skip,
unless MOEPLAT_REQUIRE_BROWSER=1 (set by .ci/run): then a missing browser fails them, so CI can
never pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
)


def launch(playwright):
    """A Chromium browser from `playwright.sync_api.sync_playwright()`."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(FLAGS), headless=True)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} missing: run scripts/system-deps.sh (as root) to install Debian's chromium"
        if os.environ.get("MOEPLAT_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = launch(pw)
        try:
            yield b
        finally:
            b.close()
