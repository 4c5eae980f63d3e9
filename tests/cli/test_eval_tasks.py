"""`moeplat eval RUN --tasks` and train.eval on a tiny trained run with local lm-eval tasks: the scores
land in the run's MLflow run as eval/<task>/<metric> at its last step and `moeplat compare` shows them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from lm_tasks import GEN, MC, PPL, write_tasks
from mlflow import MlflowClient

from moeplat.cli.main import main

pytestmark = pytest.mark.slow  # trains a tiny run (about 25 s)

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
STEPS = 4
SHORT = [f"train.max_steps={STEPS}", "train.val_every=4", "train.schedule.warmup_steps=1"]
QUIET = ["tracking.system_metrics=false"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for kv in overrides for a in ("--set", kv)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run in a fresh store: (uri, run id, run directory, include path)."""
    root = tmp_path_factory.mktemp("evaltasks")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    argv = ["run", str(TINY), *_sets(SHORT + QUIET), "--tracking-uri", uri, "--no-progress"]
    assert main([*argv, "--runs-dir", str(root / "runs")]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    run_dir = next((root / "runs" / "tiny").iterdir())
    return uri, run.info.run_id, run_dir, write_tasks(root)


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_tasks_logs_into_the_run_and_compare_shows_them(trained, capsys):
    uri, run_id, _, include = trained
    code, out, _ = _eval(
        capsys,
        run_id,
        "--tasks",
        f"{MC},{PPL}",
        "--include-path",
        str(include),
        "--tracking-uri",
        uri,
        "--json",
    )
    assert code == 0
    got = json.loads(out)
    assert got["step"] == STEPS and set(got["results"]) == {MC, PPL}
    acc = got["results"][MC]["acc"]
    assert acc in {k / 8 for k in range(9)}  # 8 documents
    client = MlflowClient(uri)
    (logged,) = client.get_metric_history(run_id, f"eval/{MC}/acc")
    assert logged.value == acc and logged.step == STEPS
    bpb = client.get_run(run_id).data.metrics[f"eval/{PPL}/bits_per_byte"]
    assert bpb == pytest.approx(got["results"][PPL]["bits_per_byte"])
    assert json.loads(client.get_run(run_id).data.tags[f"moeplat.eval.{MC}"])["limit"] is None

    assert main(["compare", run_id, "--tracking-uri", uri]) == 0
    table = capsys.readouterr().out
    row = next(ln for ln in table.splitlines() if ln.startswith(f"eval/{MC}/acc "))
    assert float(re.split(r"\s{2,}", row.strip())[1]) == pytest.approx(acc, abs=1e-4)
    assert f"eval/{PPL}/bits_per_byte" in table and "acc_stderr" not in table


def test_eval_tasks_of_a_run_directory_prints_a_table(trained, capsys):
    uri, run_id, run_dir, include = trained
    before = MlflowClient(uri).get_metric_history(run_id, f"eval/{GEN}/exact_match")
    code, out, _ = _eval(capsys, str(run_dir), "--tasks", GEN, "--include-path", str(include), "--no-log")
    assert code == 0
    assert re.search(rf"^{GEN}\s+exact_match\s+[01]\.\d{{4}}", out, re.M)
    assert MlflowClient(uri).get_metric_history(run_id, f"eval/{GEN}/exact_match") == before  # --no-log


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "tiny_mcc"], "unknown task 'tiny_mcc'; close matches: tiny_mc"),
        (["--tasks", "a,,b"], "--tasks takes task names separated by commas"),
        (["--tasks", MC, "--include-path", "/nonexistent"], "--include-path /nonexistent: no such directory"),
        (["--tasks", MC, "--val-tokens", "64"], "--val-tokens belongs to the validation-loss evaluation"),
        (["--tasks", MC, "--limit", "0"], "--limit must be a positive number"),
    ],
)
def test_eval_tasks_usage_errors_exit_2(trained, capsys, extra, message):
    uri, run_id, _, include = trained
    if "--include-path" not in extra:
        extra = [*extra, "--include-path", str(include)]
    code, _, err = _eval(capsys, run_id, "--tracking-uri", uri, *extra)
    assert code == 2 and message in err and "Traceback" not in err


def test_eval_tasks_of_an_unknown_run_exits_2(trained, capsys):
    uri, _, _, include = trained
    code, _, err = _eval(
        capsys, "0123456789abcdef", "--tasks", MC, "--include-path", str(include), "--tracking-uri", uri
    )
    assert code == 2 and "no run '0123456789abcdef'" in err


def test_train_eval_logs_eval_scores_at_the_end_of_the_run(trained, tmp_path, capsys):
    uri, _, _, include = trained
    spec = tmp_path / "with-eval.yaml"
    spec.write_text(
        f"extends: {TINY}\ntracking: {{experiment: tiny-train-eval}}\n"
        f"train:\n  eval: {{tasks: [{MC}], include_path: {include}, limit: 4}}\n"
    )
    argv = ["run", str(spec), *_sets(SHORT + QUIET), "--tracking-uri", uri, "--no-progress"]
    assert main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-train-eval").experiment_id])
    (acc,) = client.get_metric_history(run.info.run_id, f"eval/{MC}/acc")
    assert acc.step == STEPS and acc.value in {k / 4 for k in range(5)}  # limit: 4 documents
    assert run.info.status == "FINISHED"

    bad = tmp_path / "typo.yaml"
    bad.write_text(f"extends: {spec.name}\ntrain:\n  eval: {{tasks: [tiny_mcq], include_path: {include}}}\n")
    capsys.readouterr()
    assert (
        main(["run", str(bad), *_sets(SHORT + QUIET), "--tracking-uri", uri, "--runs-dir", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert "train.eval.tasks" in err and "close matches: tiny_mc" in err
    assert not (tmp_path / "tiny").exists()  # refused before training
