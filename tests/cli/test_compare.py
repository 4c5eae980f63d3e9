"""`moeplat compare` on two real tiny runs in a real SQLite MLflow store."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from moeplat.cli.main import main

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
SHORT = ["train.max_steps=6", "train.val_every=3", "train.log_every=3", "train.schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two runs differing in router and top_k, trained once for the module: (uri, [topk id, switch id])."""
    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    variants = [[], ["model.moe.router={kind: switch}", "model.moe.top_k=1"]]
    for extra in variants:
        sets = [a for kv in SHORT + extra for a in ("--set", kv)]
        argv = ["run", str(TINY), *sets, "--tracking-uri", uri, "--no-progress"]
        assert main([*argv, "--runs-dir", str(root / "runs")]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-tests").experiment_id])
    by_router = {r.data.tags["moeplat.router"]: r.info.run_id for r in runs}
    return uri, [by_router["topk"], by_router["switch"]]


def _row(out: str, label: str) -> list[str]:
    line = next(ln for ln in out.splitlines() if ln.startswith(label + " ") or ln == label)
    return re.split(r"\s{2,}", line.strip())


@pytest.mark.slow
def test_table_shows_only_the_differing_params_and_the_key_metrics(store, capsys):
    uri, (topk, switch) = store
    assert main(["compare", topk, switch, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert f"({topk[:8]})" in header and f"({switch[:8]})" in header
    assert header.index(topk[:8]) < header.index(switch[:8])  # one column per run, in the order named
    assert _row(out, "model.moe.top_k")[1:] == ["2", "1"]
    assert _row(out, "model.moe.router.kind")[1:] == ["topk", "switch"]
    assert "plan.active_params" in out  # counts follow top_k
    for equal in ("model.d_model", "model.moe.num_experts", "train.max_steps", "data.seq_len"):
        assert not re.search(rf"^{re.escape(equal)}\s", out, re.M), equal
    for metric in ("val/loss (final)", "val/loss (best)", "train/loss (final)", "moe/all/maxvio (last)"):
        values = _row(out, metric)[1:]
        assert len(values) == 2 and all(float(v) > 0 for v in values), metric
    assert _row(out, "last logged step")[1:] == ["5", "5"]  # 0-based: the 6th step
    assert "perf/tokens_per_s (last)" in out and "moe/all/dropped_frac (last)" in out


@pytest.mark.slow
def test_json_by_experiment_and_tag(store, capsys):
    uri, (topk, switch) = store
    assert main(["compare", "--experiment", "tiny-tests", "--tracking-uri", uri, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ids = [r["run_id"] for r in data["runs"]]
    assert sorted(ids) == sorted([topk, switch])
    col = {rid: i for i, rid in enumerate(ids)}
    assert data["params"]["model.moe.top_k"][col[topk]] == "2"
    assert data["params"]["model.moe.top_k"][col[switch]] == "1"
    assert "model.d_model" not in data["params"]
    val = data["metrics"]["val/loss (final)"]
    assert all(isinstance(v, float) for v in val)
    assert all(b <= f for b, f in zip(data["metrics"]["val/loss (best)"], val, strict=True))

    assert main(["compare", "--tag", "moeplat.router=switch", "--tracking-uri", uri, "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)["runs"]] == [switch]
    flt = "params.`model.moe.top_k` = '2'"
    assert main(["compare", "--filter", flt, "--tracking-uri", uri, "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)["runs"]] == [topk]


@pytest.mark.slow
def test_html_report_embeds_curves_and_heatmaps(store, tmp_path, capsys):
    uri, ids = store
    report = tmp_path / "cmp.html"
    assert main(["compare", *ids, "--tracking-uri", uri, "--report", str(report)]) == 0
    assert f"wrote {report}" in capsys.readouterr().out
    text = report.read_text()
    assert "model.moe.top_k" in text and "model.d_model" not in text
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == 2  # loss curves, expert-load heatmaps
    for img in images:
        assert base64.b64decode(img).startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["deadbeef"], "unknown run id 'deadbeef'"),
        (["--experiment", "nope"], "unknown experiment 'nope'"),
        (["--filter", "params.x ==== 2"], "bad --filter"),
        (["--filter", "params.`model.moe.top_k` = '7'"], "no runs matched"),
        ([], "name run ids, --experiment or --filter"),
        (["--experiment", "tiny-tests", "--report", "out.png"], "--report writes HTML"),
        (["--tag", "moeplat.router"], "--tag takes KEY=VALUE"),
    ],
)
def test_selection_errors_exit_2_with_one_line(store, argv, message, capsys):
    uri, _ = store
    assert main(["compare", *argv, "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
