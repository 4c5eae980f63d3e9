"""validate, show and plan read sweep files as sweeps: the sweep and its base spec are validated,
and plan shows the range of the counts over the search space (spec-only, no training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from moeplat.cli.main import main
from moeplat.spec import load_spec
from moeplat.spec.plan import plan
from moeplat.spec.plan_text import _n
from moeplat.spec.sweep import load_sweep
from moeplat.spec.sweep_plan import MAX_POINTS

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "specs" / "sweeps").glob("*.yaml"))
K_CAPACITY = REPO / "specs" / "sweeps" / "quickstart-k-capacity.yaml"
ROUTER = REPO / "specs" / "sweeps" / "quickstart-router.yaml"


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_validate_reads_a_sweep_file_as_a_sweep(sweep_file, capsys):
    assert main(["validate", str(sweep_file)]) == 0
    out, err = capsys.readouterr()
    loaded = load_sweep(sweep_file)
    assert err == f"{sweep_file}: read as a sweep file (it has `search`)\n"
    assert out == (
        f"ok: {sweep_file} is a valid sweep ({loaded.sweep.name}, {len(loaded.sweep.search)} parameters "
        f"searched) over the valid run spec {REPO / 'specs' / 'quickstart.yaml'} "
        f"(quickstart, hash {loaded.base.spec_hash})\n"
    )


def _copy_sweep(tmp_path: Path, edit) -> Path:
    """K_CAPACITY next to a copy of its base, with `edit(data)` applied to its mapping."""
    shutil.copy(REPO / "specs" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    data = yaml.safe_load(K_CAPACITY.read_text())
    data["extends"] = "quickstart.yaml"
    edit(data)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_validate_reports_the_sweeps_own_mistakes_not_unknown_run_spec_keys(tmp_path, capsys):
    path = _copy_sweep(
        tmp_path, lambda d: d["search"].update({"model.moe.top_kk": d["search"].pop("model.moe.top_k")})
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.model.moe.top_kk: not a path of the run spec; did you mean 'top_k'?" in err
    assert "1 problem in spec" in err and "unknown key" not in err


def test_validate_checks_the_sweeps_base_spec(tmp_path, capsys):
    path = _copy_sweep(tmp_path, lambda d: d["overrides"].update({"train.max_steps": 0}))
    assert main(["validate", str(path)]) == 2
    assert "train.max_steps: Input should be greater than 0" in capsys.readouterr().err


def test_overrides_are_refused_for_a_sweep(capsys):
    assert main(["validate", str(K_CAPACITY), "--set", "model.moe.top_k=1"]) == 2
    assert "a sweep sets values in its `overrides`" in capsys.readouterr().err
    assert main(["plan", str(K_CAPACITY), "--devices", "2"]) == 2


def test_show_prints_the_sweep_and_its_base_as_trials_see_it(capsys):
    assert main(["show", str(K_CAPACITY), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sweep"]["name"] == "quickstart-k-capacity" and "model.moe.top_k" in shown["sweep"]["search"]
    assert shown["base"]["name"] == "quickstart" and shown["base"]["train"]["max_steps"] == 150  # an override


def _active(overrides: list[str]) -> int:
    return plan(load_spec(REPO / "specs" / "quickstart.yaml", overrides).spec).active_params


def test_plan_shows_the_range_of_active_params_over_the_search_space(capsys):
    fixed = load_sweep(K_CAPACITY).fixed_overrides()
    low, high = _active([*fixed, "model.moe.top_k=1"]), _active([*fixed, "model.moe.top_k=4"])
    assert main(["plan", str(K_CAPACITY)]) == 0
    out = capsys.readouterr().out
    assert f"active params   {_n(low)} .. {_n(high)}" in out
    assert "(read as a sweep file: it has `search`)" in out and "base spec (fixed overrides applied)" in out

    assert main(["plan", str(K_CAPACITY), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["range"]
    assert r["active_params"]["min"]["value"] == low and r["active_params"]["max"]["value"] == high
    assert r["active_params"]["min"]["point"]["model.moe.top_k"] == 1
    # 2 top_k x 2 capacities x 2 coefs, and x 2 capacity.train only where the capacity is a factor
    assert r["points"] == 12 and r["exhaustive"] and r["invalid"] == 0


def test_plan_counts_a_when_parameter_only_where_its_condition_holds(capsys):
    assert main(["plan", str(ROUTER), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["range"]
    # normalize true: 2 top_k x 2 z_loss ends; normalize false: 2 top_k, z_loss.coef not sampled
    assert r["points"] == 2 * 2 + 2 * 1


def test_plan_counts_trials_a_constraint_rejects(tmp_path, capsys):
    path = _copy_sweep(tmp_path, lambda d: d["constraints"][0].update({"value": 1_000_000}))
    assert main(["plan", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["range"]
    over = [p for p in ([1], [4]) if _active([f"model.moe.top_k={p[0]}"]) > 1_000_000]
    assert over == [[4]] and r["over_constraint"] == r["points"] // 2  # every top_k=4 trial


def test_plan_of_a_large_space_varies_one_parameter_at_a_time(tmp_path, capsys):
    assert MAX_POINTS < 8 * 6 * 2 * 3 * 2  # the combinations of the space below

    def edit(d):
        d["search"] = {
            "model.moe.top_k": {"kind": "categorical", "choices": [1, 2, 3, 4, 5, 6, 7, 8]},
            "model.moe.num_experts": {"kind": "categorical", "choices": [8, 16, 32, 64, 128, 256]},
            "model.moe.experts.d_ff": {"kind": "int", "low": 64, "high": 512, "step": 64},
            "model.d_model": {"kind": "categorical", "choices": [64, 128, 256]},
            "train.optimizer.lr": {"kind": "float", "low": 1e-4, "high": 1e-2, "log": True},
        }
        d["constraints"] = []

    path = _copy_sweep(tmp_path, edit)
    assert main(["plan", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["range"]
    assert not r["exhaustive"] and r["points"] <= 8 + 6 + 2 + 3 + 2


def test_run_refuses_a_sweep_file_and_names_the_command_that_runs_it(capsys):
    assert main(["run", str(K_CAPACITY)]) == 2
    err = capsys.readouterr().err
    assert f"a sweep file (it has `search`), not a run spec: run it with `moeplat sweep {K_CAPACITY}`" in err
    assert "unknown key" not in err
