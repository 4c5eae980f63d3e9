"""Every spec in specs/ loads and validates, and survives `moeplat show` -> YAML -> load again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moeplat.cli.main import main
from moeplat.spec import load_spec, validate

# run specs; sweep specs (specs/sweeps/) are loaded by tests/sweep/test_sweep_spec.py
SPECS = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "specs").rglob("*.yaml") if "sweeps" not in p.parts
)


def test_there_are_specs_to_check():
    assert {"quickstart.yaml", "quickstart-dense.yaml"} <= {p.name for p in SPECS}


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.name)
def test_spec_loads_and_validates(spec_file):
    loaded = load_spec(spec_file)
    assert loaded.files[0] == str(spec_file)
    assert loaded.base_dir == str(spec_file.resolve().parent)
    assert validate(loaded.resolved) == loaded.spec


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.name)
def test_show_round_trips_through_yaml(spec_file, tmp_path, capsys):
    assert main(["show", str(spec_file)]) == 0
    shown = capsys.readouterr().out
    assert "${" not in shown and "extends" not in shown  # fully resolved, self-contained
    again = tmp_path / spec_file.name
    again.write_text(shown)
    original = load_spec(spec_file)
    reloaded = load_spec(again)
    assert reloaded.spec == original.spec
    assert reloaded.resolved == original.resolved
    assert reloaded.spec_hash == original.spec_hash


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.name)
def test_show_json_round_trips(spec_file, capsys):
    assert main(["show", "--json", str(spec_file)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert validate(shown) == load_spec(spec_file).spec


def test_show_keeps_numeric_looking_strings_quoted(tmp_path, capsys):
    spec_file = SPECS[0]
    assert main(["show", str(spec_file), "--set", "name=123", "--set", "tracking.experiment=1e3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "123" and shown["tracking"]["experiment"] == "1e3"
