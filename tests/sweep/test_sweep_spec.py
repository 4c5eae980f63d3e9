"""Sweep specs are validated like run specs: every problem, with file:line and did-you-mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.errors import SpecError
from moeplat.spec.sweep import load_sweep, to_override_text

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.yaml"
    base = Path(REPO / "tests" / "fixtures" / "tiny.yaml")
    path.write_text(f"extends: {base}\n" + body)
    return path


def _issues(path: Path) -> list:
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    return info.value.issues


@pytest.mark.parametrize("path", sorted((REPO / "specs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_in_specs_loads(path):
    loaded = load_sweep(path)
    assert loaded.base.spec.name and loaded.sweep.search


def test_search_paths_must_exist_in_the_run_spec(tmp_path):
    path = _write(
        tmp_path,
        "name: s\n"
        "search:\n"
        "  model.moe.top_kk: {kind: int, low: 1, high: 2}\n"
        "  model.moe.capacity.train: {kind: float, low: 1, high: 2, when: {model.moe.capacity.knd: factor}}\n"
        "trials: {n_trials: 2}\n",
    )
    issues = {i.path: i for i in _issues(path)}
    assert issues["search.model.moe.top_kk"].line == 4
    assert issues["search.model.moe.top_kk"].hint == "did you mean 'top_k'?"
    when = issues["search.model.moe.capacity.train.when.model.moe.capacity.knd"]
    assert when.hint == "did you mean 'kind'?" and when.line == 5


def test_schema_errors_point_at_lines_and_all_are_reported(tmp_path):
    path = _write(
        tmp_path,
        "name: s\n"
        "search:\n"
        "  model.moe.top_k: {kind: int, low: 3, high: 1}\n"
        "  train.seed: {kind: intt, low: 0, high: 1}\n"
        "trials: {n_trails: 2}\n",
    )
    got = {(i.path, i.line, i.hint) for i in _issues(path)}
    assert ("search.model.moe.top_k.high", 4, None) in got  # the tag 'int' is not part of the path
    assert ("search.train.seed.kind", 5, "did you mean 'int'?") in got
    assert ("trials.n_trails", 6, "did you mean 'n_trials'?") in got


def test_multi_objective_studies_cannot_be_pruned_or_use_single_objective_samplers(tmp_path):
    path = _write(
        tmp_path,
        "name: s\n"
        "search: {model.moe.top_k: {kind: int, low: 1, high: 2}}\n"
        "objectives: [{metric: val/loss}, {metric: plan.active_params}]\n"
        "pruner: {kind: median}\n"
        "sampler: {kind: cmaes}\n"
        "trials: {n_trials: 2}\n",
    )
    got = {(i.path, i.line) for i in _issues(path)}
    assert got == {("pruner", 5), ("sampler", 6)}


def test_a_sweep_needs_its_base_spec(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nsearch: {model.moe.top_k: {kind: int, low: 1, high: 2}}\ntrials: {n_trials: 1}\n"
    )
    assert [i.path for i in _issues(path)] == ["extends"]


def test_fixed_overrides_are_validated_by_the_run_spec(tmp_path):
    path = _write(
        tmp_path,
        "name: s\noverrides: {model.moe.top_k: 9}\nsearch: {train.seed: {kind: int, low: 0, high: 1}}\n"
        "trials: {n_trials: 1}\n",
    )
    issues = _issues(path)
    assert [i.path for i in issues] == ["model.moe.top_k"] and "num_experts" in issues[0].message


@pytest.mark.parametrize("value", [3, 0.5, True, None, "x", {"kind": "factor", "train": 1.5}, [1, 2]])
def test_override_text_round_trips_through_the_spec_parser(value):
    from omegaconf import OmegaConf

    text = to_override_text(value)
    parsed = OmegaConf.to_container(OmegaConf.create(f"v: {text}"))["v"]
    assert parsed == value
