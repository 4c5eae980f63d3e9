"""The results endpoints (moeplat.server.results) on a bare FastAPI app, against a real SQLite
MLflow store and a real SQLite Optuna storage.

The fast tests log runs with the MLflow client directly (the endpoints only read, so the values
they must return are known exactly); the slow test reads two real tiny training runs.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from mlflow import MlflowClient

# tests/ is on sys.path (pytest's default rootdir-relative import of tests/conftest.py).
from postgres import free_port

from moeplat.cli.main import main
from moeplat.server import results
from moeplat.track.spool import SHORT_RETRY_ENV

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
N_MULTI = 16
UI, DASH = "http://mlflow.example:5000/", "http://dash.example:8080"


def _app(tracking_uri: str, storage: str, ui: str | None = UI, dash: str | None = DASH) -> TestClient:
    app = FastAPI()
    app.state.settings = SimpleNamespace(
        tracking_uri=tracking_uri, sweep_storage=storage, mlflow_ui_url=ui, dashboard_url=dash
    )
    app.include_router(results.router)
    return TestClient(app)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Three runs logged through the MLflow client: a MoE run of job 7 with load telemetry at two
    steps, a run of job 7 in another experiment, and a diverged run (NaN loss) of no job."""
    root = tmp_path_factory.mktemp("results")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp_a, exp_b = c.create_experiment("exp-a"), c.create_experiment("exp-b")

    moe = c.create_run(exp_a, run_name="moe", tags={"moeplat.job_id": "7", "moeplat.router": "topk"})
    rid = moe.info.run_id
    c.log_param(rid, "model.moe.num_experts", "3")
    for step, loss in [(5, 3.0), (1, 4.0), (9, 2.5)]:  # logged out of order on purpose
        c.log_metric(rid, "train/loss", loss, step=step)
    c.log_metric(rid, "val/loss", 3.5, step=9)
    first = {(1, 0): 0.5, (1, 1): 0.25, (1, 2): 0.25, (3, 0): 0.1, (3, 1): 0.2, (3, 2): 0.7}
    last = {(1, 0): 0.2, (1, 1): 0.3, (1, 2): 0.5, (3, 0): 1 / 3, (3, 1): 1 / 3, (3, 2): 1 / 3}
    for step, cells in ((4, first), (8, last)):
        for (layer, e), v in cells.items():
            c.log_metric(rid, f"moe/layer{layer:02d}/load/e{e:02d}", v, step=step)
            c.log_metric(rid, f"moe/layer{layer:02d}/bias/e{e:02d}", -v, step=step)
        c.log_metric(rid, "moe/layer01/maxvio", 0.5, step=step)
    c.set_terminated(rid)

    other = c.create_run(exp_b, run_name="other", tags={"moeplat.job_id": "7"}).info.run_id
    c.log_metric(other, "train/loss", 1.0, step=0)
    nan = c.create_run(exp_a, run_name="diverged").info.run_id
    c.log_metric(nan, "train/loss", float("nan"), step=0)
    c.set_terminated(nan, "FAILED")
    return SimpleNamespace(
        uri=uri, root=root, moe=rid, other=other, nan=nan, exp_a=exp_a, exp_b=exp_b, last=last
    )


def _pareto(points: dict[int, tuple[float, float]]) -> set[int]:
    """Reference Pareto front of a (minimize, maximize) problem: the non-dominated trial numbers."""

    def dominates(p, q):
        return p[0] <= q[0] and p[1] >= q[1] and p != q

    return {n for n, p in points.items() if not any(dominates(q, p) for q in points.values())}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A 2-objective study (minimize f, maximize g) with a failed trial and MLflow run ids on the
    complete ones, and a single-objective study where only x matters."""
    root = tmp_path_factory.mktemp("optuna")
    url = f"sqlite:///{root / 'optuna.db'}"

    multi = optuna.create_study(
        study_name="pareto", storage=url, directions=["minimize", "maximize"],
        sampler=optuna.samplers.RandomSampler(seed=0),
    )  # fmt: skip

    def two(trial):
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_int("y", 0, 4)
        if trial.number == 3:
            raise RuntimeError("a failed trial")
        trial.set_user_attr("mlflow_run_id", f"run{trial.number:02d}")
        return x, y + 0.01 * x  # objective 0 follows x, objective 1 follows y

    multi.optimize(two, n_trials=N_MULTI, catch=(RuntimeError,))
    single = optuna.create_study(
        study_name="single", storage=url, sampler=optuna.samplers.RandomSampler(seed=1)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        single.set_metric_names(["val/loss"])
    single.optimize(lambda t: (t.suggest_float("x", -2, 2) - 0.5) ** 2 + 0 * t.suggest_float("z", 0, 1), 12)
    optuna.create_study(study_name="empty", storage=url)
    return SimpleNamespace(url=url, multi=multi, single=single)


@pytest.fixture
def api(logged, studies):
    return _app(logged.uri, studies.url)


def test_runs_by_ids_keep_the_order_and_summarise_each_run(api, logged):
    r = api.get("/api/runs", params={"ids": f"{logged.nan}, {logged.moe},{logged.nan}"})
    assert r.status_code == 200
    runs = r.json()["runs"]
    assert [x["run_id"] for x in runs] == [logged.nan, logged.moe]  # as named, duplicates once
    nan, moe = runs
    assert nan["status"] == "FAILED" and nan["metrics"] == {"train/loss": None}  # NaN is not JSON
    assert moe["name"] == "moe" and moe["experiment"] == "exp-a" and moe["status"] == "FINISHED"
    assert moe["params"] == {"model.moe.num_experts": "3"}
    assert moe["tags"]["moeplat.job_id"] == "7" and moe["tags"]["moeplat.router"] == "topk"
    # the last value by step, not by logging order; per-expert keys are left to /load
    assert moe["metrics"] == {"train/loss": 2.5, "val/loss": 3.5, "moe/layer01/maxvio": 0.5}
    assert moe["mlflow_url"] == f"http://mlflow.example:5000/#/experiments/{logged.exp_a}/runs/{logged.moe}"
    assert moe["start_time"].endswith("+00:00") and moe["end_time"] is not None


def test_runs_of_a_job_span_experiments_and_an_experiment_lists_its_runs(api, logged):
    by_job = api.get("/api/runs", params={"job": "7"}).json()["runs"]
    assert {x["run_id"] for x in by_job} == {logged.moe, logged.other}
    assert {x["experiment"] for x in by_job} == {"exp-a", "exp-b"}
    assert api.get("/api/runs", params={"job": "8"}).json() == {"runs": []}
    by_exp = api.get("/api/runs", params={"experiment": "exp-a"}).json()["runs"]
    assert [x["run_id"] for x in by_exp] == [logged.nan, logged.moe]  # newest first
    assert [x["run_id"] for x in api.get("/api/runs?experiment=exp-a&limit=1").json()["runs"]] == [logged.nan]


def test_job_helpers_for_the_jobs_endpoints(logged, studies):
    s = SimpleNamespace(
        tracking_uri=logged.uri, sweep_storage=studies.url, mlflow_ui_url=None, dashboard_url=None
    )
    runs = results.job_runs(s, 7)
    assert {x["run_id"] for x in runs} == {logged.moe, logged.other}
    assert all(x["mlflow_url"] is None for x in runs)  # no UI configured, no link
    (summary,) = results.job_studies(s, "single")
    assert summary["name"] == "single" and summary["n_trials"] == 12
    assert summary["best_values"] == [studies.single.best_value] and summary["dashboard_url"] is None
    assert results.job_studies(s, "not-created-yet") == []
    assert results.job_studies(s, None) == []
    # a job's own storage wins over the server's; a store that does not exist yet is not created
    absent = logged.root / "absent.db"
    assert results.job_studies(s, "single", f"sqlite:///{absent}") == []
    assert results.job_runs(SimpleNamespace(**{**vars(s), "tracking_uri": f"sqlite:///{absent}"}), 7) == []
    assert not absent.exists()


def test_history_is_sorted_by_step_and_unknown_keys_are_empty(api, logged):
    r = api.get(f"/api/runs/{logged.moe}/history", params={"keys": "train/loss,val/loss,no/such"})
    assert r.json() == {
        "history": {"train/loss": [[1, 4.0], [5, 3.0], [9, 2.5]], "val/loss": [[9, 3.5]], "no/such": []}
    }
    default = api.get(f"/api/runs/{logged.moe}/history").json()["history"]
    assert set(default) == {"train/loss", "val/loss"}
    assert api.get(f"/api/runs/{logged.nan}/history?keys=train/loss").json() == {
        "history": {"train/loss": [[0, None]]}
    }


def test_load_is_the_last_logged_layer_by_expert_matrix(api, logged):
    got = api.get(f"/api/runs/{logged.moe}/load").json()
    assert got["layers"] == ["layer01", "layer03"] and got["experts"] == 3 and got["step"] == 8
    want = [[logged.last[(layer, e)] for e in range(3)] for layer in (1, 3)]
    assert [pytest.approx(row) for row in want] == got["load"]
    assert api.get(f"/api/runs/{logged.other}/load").json() == {
        "layers": [],
        "experts": 0,
        "load": [],
        "step": None,
    }


@pytest.mark.parametrize(
    "url",
    [
        "/api/runs?ids=0123456789abcdef0123456789abcdef",
        "/api/runs/0123456789abcdef0123456789abcdef/history",
        "/api/runs/0123456789abcdef0123456789abcdef/load",
        "/api/runs?experiment=no-such-experiment",
        "/api/studies/no-such-study",
    ],
)
def test_unknown_things_are_404_with_a_clear_detail(api, url):
    r = api.get(url)
    assert r.status_code == 404
    detail = r.json()["detail"]
    assert isinstance(detail, str) and (
        "unknown run id" in detail or "unknown experiment" in detail or "unknown study" in detail
    )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("/api/runs", "exactly one of ids=, job= or experiment="),
        ("/api/runs?ids=a&job=1", "exactly one"),
        ("/api/runs?ids=../../etc", "malformed run id"),
        ("/api/runs?ids=,,", "1 to 100"),
        ("/api/runs?job=seven", "positive integer"),
        ("/api/runs?job=-1", "positive integer"),
        ("/api/runs?job=²", "positive integer"),  # a digit to str.isdigit, not to int()
        ("/api/runs?job=0", "positive integer"),
        ("/api/runs/bad%20id!/load", "malformed run id"),
        ("/api/runs/bad$id/history", "malformed run id"),
        ("/api/runs/abc/history?keys=,", "metric keys"),
    ],
)
def test_malformed_requests_are_422_with_a_clear_detail(api, url, words):
    r = api.get(url)
    assert r.status_code == 422
    assert words in r.json()["detail"]


def test_a_missing_store_is_404_not_created(tmp_path, studies):
    api = _app(f"sqlite:///{tmp_path / 'none.db'}", f"sqlite:///{tmp_path / 'none-optuna.db'}")
    assert api.get("/api/runs/0123456789abcdef0123456789abcdef/load").status_code == 404
    assert api.get("/api/runs?job=1").json() == {"runs": []}
    assert api.get("/api/studies/pareto").status_code == 404
    assert api.get("/api/studies").json() == {"studies": []}
    assert list(tmp_path.iterdir()) == []


def test_a_failing_store_is_a_502_not_a_traceback(studies, monkeypatch):
    for k, v in SHORT_RETRY_ENV.items():  # fail fast instead of MLflow's minutes of retries
        monkeypatch.setenv(k, v)
    api = _app(f"http://127.0.0.1:{free_port()}", studies.url)  # nothing listens there
    r = api.get("/api/runs?experiment=x")
    assert r.status_code == 502 and r.json()["detail"].startswith("the MLflow store failed")


def test_store_errors_do_not_show_passwords():
    """A store error quoting its URL (our reaction to the fault is under test, so the fault is faked)."""

    def fails():
        raise RuntimeError("cannot open postgresql+psycopg2://moeplat:s3cret@db:5432/optuna\nmore")

    with pytest.raises(HTTPException) as e:
        results._call("Optuna", fails)
    assert e.value.status_code == 502
    assert e.value.detail == (
        "the Optuna store failed: RuntimeError: cannot open postgresql+psycopg2://moeplat:***@db:5432/optuna"
    )


def test_multi_objective_study_trials_pareto_and_importances(api, studies):
    r = api.get("/api/studies/pareto")
    assert r.status_code == 200
    got = r.json()
    assert got["name"] == "pareto" and got["directions"] == ["minimize", "maximize"]
    assert got["metrics"] == ["objective0", "objective1"]  # the study has no metric names
    trials = {t["number"]: t for t in got["trials"]}
    assert sorted(trials) == list(range(N_MULTI))
    assert trials[3]["state"] == "FAIL" and trials[3]["values"] is None and trials[3]["run_id"] is None
    for n, t in trials.items():
        frozen = studies.multi.trials[n]
        assert t["params"] == frozen.params
        if n != 3:
            assert t["state"] == "COMPLETE" and t["run_id"] == f"run{n:02d}"
            assert t["values"] == pytest.approx(frozen.values)
    complete = {n: tuple(t["values"]) for n, t in trials.items() if t["values"]}
    assert set(got["pareto"]) == _pareto(complete) and got["pareto"]
    assert set(got["importances"]) == {"x", "y"}  # jointly, both matter
    by_metric = got["importances_by_metric"]
    assert set(by_metric) == {"objective0", "objective1"}
    for imp in by_metric.values():
        assert set(imp) == {"x", "y"} and math.isclose(sum(imp.values()), 1.0, rel_tol=1e-6)
    assert by_metric["objective0"]["x"] > by_metric["objective0"]["y"]
    assert by_metric["objective1"]["y"] > by_metric["objective1"]["x"]
    sid = studies.multi._study_id
    assert got["dashboard_url"] == f"{DASH}/dashboard/studies/{sid}"


def test_single_objective_study_best_trial_and_importances(api, studies):
    got = api.get("/api/studies/single").json()
    assert got["metrics"] == ["val/loss"] and got["directions"] == ["minimize"]
    assert got["pareto"] == [studies.single.best_trial.number]
    imp = got["importances"]
    assert set(imp) == {"x", "z"} and imp["x"] > imp["z"]  # z does not enter the objective
    assert got["importances_by_metric"] == {}
    empty = api.get("/api/studies/empty").json()
    assert empty["trials"] == [] and empty["pareto"] == [] and empty["importances"] == {}


def test_study_list_summarises_every_study(api, studies):
    got = {s["name"]: s for s in api.get("/api/studies").json()["studies"]}
    assert set(got) == {"pareto", "single", "empty"}
    complete = [t.values for t in studies.multi.trials if t.values]
    assert got["pareto"]["best_values"] == pytest.approx(
        [min(v[0] for v in complete), max(v[1] for v in complete)]
    )
    assert got["pareto"]["n_trials"] == N_MULTI and got["pareto"]["directions"] == ["minimize", "maximize"]
    assert got["empty"]["best_values"] is None and got["empty"]["n_trials"] == 0


@pytest.mark.slow
def test_real_tiny_runs_of_a_job(tmp_path, studies, monkeypatch):
    """Two real tiny training runs, the second as job 3 (tagged through MOEPLAT_JOB_ID):
    summaries, loss history and the load matrix of the tiny spec (2 MoE layers x 4 experts)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    short = ["train.max_steps=6", "train.val_every=3", "train.log_every=3", "train.schedule.warmup_steps=1"]
    short.append("tracking.system_metrics=false")
    for job in (None, "3"):  # the second as the server's worker runs a job: MOEPLAT_JOB_ID set
        if job:
            monkeypatch.setenv("MOEPLAT_JOB_ID", job)
        argv = ["run", str(TINY), *[a for kv in short for a in ("--set", kv)], "--tracking-uri", uri]
        assert main([*argv, "--no-progress", "--runs-dir", str(tmp_path / "runs")]) == 0
    c = MlflowClient(uri)
    first, second = sorted(
        c.search_runs([c.get_experiment_by_name("tiny-tests").experiment_id]), key=lambda r: r.info.start_time
    )
    api = _app(uri, studies.url)

    (run,) = api.get("/api/runs?job=3").json()["runs"]
    assert run["run_id"] == second.info.run_id and run["experiment"] == "tiny-tests"
    assert run["params"]["model.moe.num_experts"] == "4" and run["status"] == "FINISHED"
    assert {"train/loss", "val/loss", "moe/all/maxvio", "perf/tokens_per_s"} <= set(run["metrics"])
    assert not any("/load/e" in k for k in run["metrics"])
    assert len(api.get("/api/runs?experiment=tiny-tests").json()["runs"]) == 2

    hist = api.get(f"/api/runs/{first.info.run_id}/history?keys=train/loss,val/loss").json()["history"]
    assert [s for s, _ in hist["train/loss"]] == [2, 5] and all(v > 0 for _, v in hist["train/loss"])
    assert [s for s, _ in hist["val/loss"]] == [2, 5]
    load = api.get(f"/api/runs/{first.info.run_id}/load").json()
    assert load["layers"] == ["layer00", "layer01"] and load["experts"] == 4
    for row in load["load"]:  # fractions of the layer's routed token-slots
        assert len(row) == 4 and sum(row) == pytest.approx(1.0) and all(0 <= v <= 1 for v in row)
    assert load["step"] == max(
        m.step for m in c.get_metric_history(first.info.run_id, "moe/layer00/load/e00")
    )
