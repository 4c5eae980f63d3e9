"""`moeplat route RUN --text FILE`: the summary, the HTML and JSON files, --log into the MLflow run,
and usage errors (exit 2). The run is tests/route_fixture.py's: the tiny MoE, untrained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient
from route_fixture import model_dir, stored_run

from moeplat.cli.main import main

TEXT = "for i in range(10):\n    print(i)  # <b>ok</b>\n" * 3  # 132 bytes: 5 windows of 32


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(run id, tracking uri, run directory): an MLflow run whose model/ artifact is the tiny MoE."""
    tmp = tmp_path_factory.mktemp("route")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_id, run_dir = stored_run(tmp, uri)
    return run_id, uri, run_dir


def _route(capsys, *args) -> tuple[int, str, str]:
    code = main(["route", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_route_prints_a_summary_and_writes_the_view(stored, tmp_path, capsys):
    run_id, uri, _ = stored
    text = tmp_path / "in.txt"
    text.write_text(TEXT)
    html = tmp_path / "view.html"
    code, out, _ = _route(capsys, run_id, "--text", text, "-o", html, "--tracking-uri", uri)
    assert code == 0
    assert out.startswith(f"{len(TEXT)} tokens, text {text}")
    assert "layer 0 (TopKRouter, 4 experts)" in out and "layer 1 (TopKRouter, 4 experts)" in out
    assert len(re.findall(r"^  e\d +load", out, flags=re.M)) == 8  # 2 layers x 4 experts
    page = html.read_text()
    assert len(re.findall(r'<span class="t[^"]*" data-i=', page)) == len(TEXT)
    assert "<b>ok" not in page  # the text's markup stays text

    code, out, _ = _route(capsys, run_id, "--text", text, "-o", html, "--tracking-uri", uri, "--json")
    table = json.loads(out)
    assert code == 0 and table["ids"] == list(TEXT.encode()) and table["window"] == 32
    assert [layer["layer"] for layer in table["layers"]] == [0, 1]
    assert all(len(layer["experts"][t]) == 2 for layer in table["layers"] for t in range(len(TEXT)))


def test_route_log_stores_the_view_in_the_run(stored, tmp_path, capsys):
    run_id, uri, run_dir = stored
    text = tmp_path / "in.txt"
    text.write_text(TEXT)
    # the run directory names its MLflow run in run.json: --log needs no run id
    code, _, err = _route(
        capsys, run_dir, "--text", text, "-o", tmp_path / "r.html", "--log", "--max-tokens", 40
    )
    assert code == 0 and f"to run {run_id}" in err
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(run_id, "routing")} == {
        "routing/route.html",
        "routing/route.json",
    }
    logged = json.loads(
        Path(client.download_artifacts(run_id, "routing/route.json", str(tmp_path))).read_text()
    )
    assert logged["truncated"] and len(logged["ids"]) == 40 and logged["meta"]["run_id"] == run_id


def test_route_val_text_routes_the_runs_validation_text(stored, tmp_path, capsys):
    _, _, run_dir = stored
    code, out, _ = _route(
        capsys, run_dir / "model", "--val-text", "--max-tokens", 64, "-o", tmp_path / "v.html"
    )
    assert code == 0 and out.startswith("64 tokens (cut at --max-tokens), the run's validation text")


def test_route_usage_errors_exit_2(stored, tmp_path, capsys):
    run_id, uri, _ = stored
    text = tmp_path / "in.txt"
    text.write_text(TEXT)
    code, _, err = _route(capsys, run_id, "--text", tmp_path / "missing.txt", "--tracking-uri", uri)
    assert code == 2 and "missing.txt: no such file" in err
    code, _, err = _route(capsys, "0123456789abcdef", "--text", text, "--tracking-uri", uri)
    assert code == 2 and "no run '0123456789abcdef'" in err
    code, _, err = _route(capsys, run_id, "--text", text, "--max-tokens", 0, "--tracking-uri", uri)
    assert code == 2 and "--max-tokens" in err
    (tmp_path / "empty.txt").write_text("")
    code, _, err = _route(capsys, run_id, "--text", tmp_path / "empty.txt", "--tracking-uri", uri)
    assert code == 2 and "empty.txt is empty" in err

    dense = model_dir(tmp_path / "dense", ["model.moe=null", "model.dense_ffn={kind: swiglu, d_ff: 32}"])
    code, _, err = _route(capsys, dense, "--text", text, "-o", tmp_path / "d.html")
    assert code == 2 and "no MoE layer" in err
    assert not (tmp_path / "d.html").exists()
    code, _, err = _route(capsys, dense, "--text", text, "--log")  # no run.json beside it: no run
    assert code == 2 and "--log needs the MLflow run" in err

    with pytest.raises(SystemExit) as e:  # argparse: exactly one of --text and --val-text
        main(["route", run_id])
    assert e.value.code == 2
