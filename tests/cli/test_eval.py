"""`moeplat eval RUN_ID`: the run's final model, rebuilt from its MLflow model/ artifact, gives the
val/loss the run logged at its end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main
from moeplat.spec import load_spec
from moeplat.train.run import run

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    loaded = load_spec(TINY, ["tracking.system_metrics=false", "train.max_steps=8"])
    result = run(loaded, runs_root=tmp / "runs", tracking_uri=uri, progress=False)
    return result, uri


def _eval(capsys, *args) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_equals_the_logged_final_val_loss(finished, capsys):
    result, uri = finished
    logged = MlflowClient(uri).get_run(result.run_id).data.metrics["val/loss"]
    code, out, _ = _eval(capsys, result.run_id, "--tracking-uri", uri, "--json")
    assert code == 0
    got = json.loads(out)
    assert got["step"] == 8 and got["val_tokens"] == 4096
    assert got["val/loss"] == pytest.approx(logged, rel=1e-6, abs=1e-6)
    assert got["logged_val/loss"] == logged

    code, out, _ = _eval(capsys, result.run_id, "--tracking-uri", uri, "--val-tokens", "32")
    assert code == 0 and "validation tokens per source: 32" in out
    one_sequence = float(out.split("val/loss ")[1].split()[0])
    assert one_sequence != pytest.approx(logged, abs=1e-6)  # other text, another mean


def test_eval_of_an_unknown_run_is_a_usage_error(finished, capsys):
    _, uri = finished
    code, _, err = _eval(capsys, "0123456789abcdef", "--tracking-uri", uri)
    assert code == 2 and "no run '0123456789abcdef'" in err


def test_eval_needs_an_existing_store(tmp_path, capsys):
    code, _, err = _eval(capsys, "abc", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 2 and "no MLflow store" in err


def test_eval_of_a_run_without_model_names_the_option(finished, capsys):
    _, uri = finished
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny-tests")
    bare = client.create_run(exp.experiment_id, run_name="no-model").info.run_id
    code, _, err = _eval(capsys, bare, "--tracking-uri", uri)
    assert code == 2 and "tracking.log_model" in err


def test_log_model_false_logs_no_model(finished, capsys):
    _, uri = finished
    loaded = load_spec(
        TINY, ["tracking.log_model=false", "tracking.system_metrics=false", "train.max_steps=3"]
    )
    result = run(
        loaded,
        runs_root=Path(uri.removeprefix("sqlite:///")).parent / "runs2",
        tracking_uri=uri,
        progress=False,
    )
    assert MlflowClient(uri).list_artifacts(result.run_id, "model") == []
    code, _, err = _eval(capsys, result.run_id, "--tracking-uri", uri)
    assert code == 2 and "tracking.log_model" in err


def test_eval_registers_the_model(finished, capsys):
    result, uri = finished
    code, out, _ = _eval(capsys, result.run_id, "--tracking-uri", uri, "--register", "tiny-moe")
    assert code == 0 and "registered as model 'tiny-moe' version 1" in out
    version = MlflowClient(uri).get_model_version("tiny-moe", "1")
    assert version.run_id == result.run_id and version.source.endswith("/model")


def test_system_metrics_and_mfu_are_off_when_not_asked(finished):
    result, uri = finished
    m = MlflowClient(uri).get_run(result.run_id).data.metrics
    assert not [k for k in m if k.startswith("system/")]  # tracking.system_metrics=false
    assert "perf/mfu" not in m and "perf/flops_per_s" in m  # CPU: no known peak
