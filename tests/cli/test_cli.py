"""The command line: exit codes (0 ok, 2 invalid spec or usage) and what goes to stdout/stderr.

Commands run in-process through `main([...])`; one test runs `python -m moeplat.cli.main` for the
real process exit code. `moeplat run` is tested with training, elsewhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeplat.cli.main import main
from moeplat.errors import SpecError
from moeplat.spec import load_spec
from moeplat.spec.plan import plan

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "specs" / "quickstart.yaml"
BROKEN = sorted((REPO / "tests" / "spec" / "broken").glob("*.yaml"))


def test_validate_ok(capsys):
    assert main(["validate", str(QUICKSTART)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    match = re.fullmatch(r"ok: (.+) is a valid run spec \(quickstart, hash ([0-9a-f]{12})\)\n", out)
    assert match and match[1] == str(QUICKSTART)
    assert match[2] == load_spec(QUICKSTART).spec_hash


def test_validate_applies_overrides(capsys):
    assert main(["validate", str(QUICKSTART), "--set", "model.moe.top_k=17"]) == 2
    err = capsys.readouterr().err
    assert "--set model.moe.top_k=17: model.moe.top_k: top_k (17) must be <= num_experts (16)" in err


@pytest.mark.parametrize("spec_file", BROKEN, ids=lambda p: p.name)
def test_validate_broken_spec_exits_2_listing_every_issue(spec_file, capsys):
    with pytest.raises(SpecError) as info:
        load_spec(spec_file)
    issues = info.value.issues
    assert main(["validate", str(spec_file)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {len(issues)} problem{'s' if len(issues) > 1 else ''} in spec:\n")
    for issue in issues:
        assert f"  {issue.format()}\n" in err
    assert "Traceback" not in err


def test_missing_spec_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert main(["validate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"spec file not found: {missing} (given on the command line)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate", str(QUICKSTART)],
        ["validate"],
        ["show"],
        ["plan", "--json"],
        ["validate", "a", "--set"],
    ],
    ids=["no-command", "unknown-command", "validate-no-spec", "show-no-spec", "plan-no-spec", "set-no-value"],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: moeplat")
    assert "Traceback" not in err


def test_show_applies_overrides(capsys):
    assert (
        main(["show", str(QUICKSTART), "--set", "model.moe.top_k=1", "--set", "train.optimizer.lr=1e-4"]) == 0
    )
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["moe"]["top_k"] == 1
    assert shown["train"]["optimizer"]["lr"] == 1e-4
    assert shown["data"]["seq_len"] == 128  # ${model.max_seq_len}, resolved


def test_show_json_applies_overrides(capsys):
    overrides = ["model.moe=null", "model.dense_ffn.kind=swiglu", "model.dense_ffn.d_ff=64"]
    assert main(["show", "--json", str(QUICKSTART), *(f"--set={o}" for o in overrides)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["moe"] is None
    assert shown["model"]["dense_ffn"] == {"kind": "swiglu", "d_ff": 64}


def test_show_with_a_bad_override_prints_nothing_on_stdout(capsys):
    assert main(["show", str(QUICKSTART), "--set", "model.moe.topk=1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "--set model.moe.topk=1: model.moe.topk: unknown key; did you mean 'top_k'?" in err


def test_plan_text(capsys):
    assert main(["plan", str(QUICKSTART)]) == 0
    out = capsys.readouterr().out
    assert "total params    3.38M (3,384,448)" in out
    assert "active params   1.03M per token" in out


def test_plan_json(capsys):
    assert main(["plan", "--json", str(QUICKSTART), "--set", "model.moe.top_k=1"]) == 0
    got = json.loads(capsys.readouterr().out)
    preflight = got.pop("preflight")  # the parallel layout's per-device figures (moeplat.spec.preflight)
    assert preflight["world_size"] == 1 and set(preflight["memory_bytes"]) >= {"weights", "total"}
    assert set(got) == {
        "total_params",
        "active_params",
        "embedding_params",
        "expert_params",
        "flops_per_token_fwd",
        "flops_per_token_train",
        "tokens_per_step",
        "flops_per_step_train",
        "memory_bytes",
        "layers",
        "moe_layers",
        "expected_active_params",  # = active_params but for routers with a varying expert count
        "expected_flops_per_token_fwd",
        "expected_assumption",
    }
    assert got == plan(load_spec(QUICKSTART, ["model.moe.top_k=1"]).spec).to_dict()
    assert got["active_params"] < plan(load_spec(QUICKSTART).spec).active_params  # the override applied
    assert set(got["layers"][0]) == {"index", "kind", "params", "active_params", "flops_per_token"}
    assert set(got["memory_bytes"]) == {"weights", "grads", "optimizer", "activations", "total"}


def test_plan_of_a_broken_spec_exits_2(capsys):
    assert main(["plan", str(REPO / "tests" / "spec" / "broken" / "cross_top_k.yaml")]) == 2
    assert "model.moe.top_k" in capsys.readouterr().err


def test_schema_is_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "moeplat spec"
    assert {"extends", "model", "data", "train"} <= set(schema["properties"])


def test_process_exit_code_and_stderr():
    broken = REPO / "tests" / "spec" / "broken" / "many_problems.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "moeplat.cli.main", "validate", str(broken), "--set", "name=ok"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: 9 problems in spec:\n")
    assert len(proc.stderr.splitlines()) == 10
    assert "Traceback" not in proc.stderr
