"""Shared fixtures for the spec-language tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from moeplat.errors import SpecError, SpecIssue
from moeplat.spec import load_spec


def _issues_of(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[SpecIssue]:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value.issues


@pytest.fixture
def issues_of() -> Callable[..., list[SpecIssue]]:
    """issues_of(path, overrides=()) -> the issues of a spec that must fail to load."""
    return _issues_of


@pytest.fixture
def write(tmp_path) -> Callable[[str, str], Path]:
    """write("dir/name.yaml", text) -> the path of that spec file, written under tmp_path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return _write
