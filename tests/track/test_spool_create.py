"""A run that starts while the tracking server is away: its creation is spooled too.

The server is a loopback port nobody listens on (the start-up probe is refused at once); the
spool is then replayed into a real SQLite store, which is what `moeplat sync` does with a server.
The end-to-end case with a real `mlflow server` is tests/track/test_outage_start.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from postgres import free_port

from moeplat.cli.main import main
from moeplat.track import query
from moeplat.track import spool as spool_mod
from moeplat.track.mlflow_run import TrackedRun, set_tags
from moeplat.track.spool import LOCAL_ID_TAG, PARENT_LOCAL_TAG, PARENT_TAG, SHORT_RETRY_ENV, SPOOL_FILE, Spool


@pytest.fixture
def dead_uri(monkeypatch):
    for k in SHORT_RETRY_ENV:  # TrackedRun sets them for an http server: restored after the test
        monkeypatch.delenv(k, raising=False)
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _started_away(uri, run_dir, **kwargs) -> TrackedRun:
    run_dir.mkdir(parents=True, exist_ok=True)
    tracked = TrackedRun(uri, "exp", kwargs.pop("name", "r"), spool=run_dir / SPOOL_FILE, **kwargs)
    (run_dir / "run.json").write_text(json.dumps({"run_id": tracked.run_id, "tracking_uri": uri}))
    return tracked


def _only_run(store, experiment="exp"):
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_a_run_with_its_server_away_starts_on_a_local_id_and_sync_creates_it(
    dead_uri, store, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("MOEPLAT_JOB_ID", "7")  # a job-server job: the tag goes with the creation
    run_dir = tmp_path / "run"
    tracked = _started_away(dead_uri, run_dir)
    assert tracked.run_id.startswith("local-")
    notices = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(notices) == 1 and f"moeplat sync {run_dir}" in notices[0]
    tracked.log_params({"model.moe.top_k": 2})
    tracked.log_metrics([("loss", 2.0 - s / 10, s, 1000 + s) for s in range(5)])
    tracked.log_text("hi\n", "notes/hi.txt")
    tracked.finish("FINISHED")
    ops = [r["op"] for r in Spool(run_dir / SPOOL_FILE).records()]
    assert ops == ["create", "params", "metrics", "text", "terminate"]

    assert main(["sync", str(run_dir)]) == 1  # its server is still away: said at once, nothing lost
    assert Spool(run_dir / SPOOL_FILE).records()[0]["op"] == "create"
    assert main(["sync", str(run_dir), "--tracking-uri", store]) == 0
    client, run = _only_run(store)
    assert run.info.run_name == "r" and run.info.status == "FINISHED"
    assert run.data.tags[LOCAL_ID_TAG] == tracked.run_id and run.data.tags["moeplat.job_id"] == "7"
    assert run.data.params == {"model.moe.top_k": "2"}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 2.0 - s / 10) for s in range(5)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/hi.txt"]
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run.info.run_id
    # the local id a sweep's study recorded for the trial still finds it (server API, compare)
    assert [r["run_id"] for r in query.runs_by_ids(store, [tracked.run_id])] == [run.info.run_id]
    assert [step for step, _ in query.metric_history(store, tracked.run_id, ["loss"])["loss"]] == list(
        range(5)
    )


def test_a_replay_cut_after_the_creation_does_not_create_twice(dead_uri, store, tmp_path):
    run_dir = tmp_path / "run"
    tracked = _started_away(dead_uri, run_dir)
    tracked.log_metrics([("loss", 1.0, 0, 1000)])
    tracked.log_metrics([("loss", 0.5, 1, 1001)])
    client, spool = MlflowClient(store), Spool(run_dir / SPOOL_FILE)
    original, sent = spool.records(), []

    def cut_after_two(record):
        if len(sent) == 2:
            raise requests.exceptions.ConnectionError("gone again")
        sent.append(record)
        return spool_mod.send(client, record)

    with pytest.raises(requests.exceptions.ConnectionError):
        spool.replay(cut_after_two)
    _, run = _only_run(store)
    assert all(r["run_id"] == run.info.run_id for r in Spool(spool.path).records())  # the tail knows the id
    # the process died before the spool was rewritten: the whole of it, create included, is sent again
    Spool(spool.path)._rewrite(original)
    assert main(["sync", str(run_dir), "--tracking-uri", store]) == 0
    client, again = _only_run(store)  # still one run
    assert [(m.step, m.value) for m in client.get_metric_history(again.info.run_id, "loss")] == [
        (0, 1.0),
        (1, 0.5),
    ]


def test_the_server_coming_back_mid_run_creates_it_and_the_run_goes_on_there(store, tmp_path, monkeypatch):
    monkeypatch.setattr(TrackedRun, "RETRY_S", 0.0)
    up = {"now": False}
    monkeypatch.setattr(spool_mod, "reachable", lambda uri, timeout_s=0: up["now"])
    run_dir = tmp_path / "run"
    tracked = _started_away(store, run_dir)
    local = tracked.run_id
    tracked.log_metrics([("loss", 1.0, 0, 1000)])  # probed: still away, spooled
    up["now"] = True
    tracked.log_metrics([("loss", 0.5, 1, 1001)])  # the spool first (the run is created), then this
    client, run = _only_run(store)
    assert tracked.run_id == run.info.run_id != local
    assert json.loads((run_dir / "run.json").read_text())["run_id"] == run.info.run_id
    assert not tracked.spool_pending()
    tracked.finish("FINISHED")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_resuming_a_run_that_was_never_synced_continues_the_same_spool(dead_uri, store, tmp_path):
    run_dir = tmp_path / "run"
    first = _started_away(dead_uri, run_dir)
    first.log_metrics([("loss", 1.0, 0, 1000)])
    first.finish("KILLED")
    again = TrackedRun(dead_uri, "exp", run_id=first.run_id, spool=run_dir / SPOOL_FILE)  # --resume
    assert again.run_id == first.run_id
    again.log_metrics([("loss", 0.5, 1, 1001)])
    again.finish("FINISHED")
    assert main(["sync", str(run_dir), "--tracking-uri", store]) == 0
    client, run = _only_run(store)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    # resumed once more after the sync, with a run.json that still names the local id: same run
    (run_dir / "run.json").write_text(json.dumps({"run_id": first.run_id, "tracking_uri": store}))
    third = TrackedRun(store, "exp", run_id=first.run_id, spool=run_dir / SPOOL_FILE)
    assert third.run_id == run.info.run_id


def test_trials_find_their_parent_whichever_is_synced_first(dead_uri, store, tmp_path):
    """A sweep whose parent and trials all started while the server was away."""
    parent = _started_away(dead_uri, tmp_path / "sweep" / "sweep-parent", name="sweep s")
    trials = []
    for i in range(2):
        trial = _started_away(dead_uri, tmp_path / "sweep" / f"t{i}", name=f"s #{i}")
        trial.set_tags({PARENT_TAG: parent.run_id, "optuna.trial": i})
        trial.finish("FINISHED")
        # the sweep worker's final tag goes to the trial's spool, behind the run's own writes
        set_tags(dead_uri, trial.run_id, {"optuna.state": "COMPLETE"}, spool=trial.spool.path)
        trials.append(trial)
    parent.finish("FINISHED")
    # one trial before its parent exists, then the rest of the directory (parents first)
    assert main(["sync", str(tmp_path / "sweep" / "t1"), "--tracking-uri", store]) == 0
    assert main(["sync", str(tmp_path / "sweep"), "--tracking-uri", store]) == 0
    client = MlflowClient(store)
    runs = {
        r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    }
    assert set(runs) == {"sweep s", "s #0", "s #1"}
    parent_id = runs["sweep s"].info.run_id
    for name in ("s #0", "s #1"):
        tags = client.get_run(runs[name].info.run_id).data.tags
        assert tags[PARENT_TAG] == parent_id and PARENT_LOCAL_TAG not in tags
        assert tags["optuna.state"] == "COMPLETE"


def test_a_spooled_artifact_from_a_temporary_directory_is_kept(dead_uri, store, tmp_path, monkeypatch):
    """The sweep's summary plots are written to a temporary directory and logged from there; the
    run's own plots/ and model/ are not copied (sent as they are at sync time)."""
    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs") / "r"  # relative, as `moeplat run` names it
    tracked = _started_away(dead_uri, run_dir)
    (run_dir / "model").mkdir()
    (run_dir / "model" / "weights.pt").write_bytes(b"w")
    tracked.log_artifacts(str(run_dir / "model"), "model")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "plot.png").write_bytes(b"png")
    tracked.log_artifact(str(scratch / "plot.png"), "sweep/plots")
    (scratch / "plot.png").unlink()
    tracked.finish("FINISHED")
    assert [p.name for p in (run_dir / "spooled-artifacts").rglob("*") if p.is_file()] == ["plot.png"]
    assert main(["sync", str(run_dir), "--tracking-uri", store]) == 0
    client, run = _only_run(store)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "sweep/plots")] == ["sweep/plots/plot.png"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/weights.pt"]
    assert not (run_dir / "spooled-artifacts").exists()  # sent: the copies go


def test_a_server_that_accepts_but_never_answers_counts_as_away(tmp_path, monkeypatch):
    """The probe is a request with a short timeout, not a connect: a hung server is not waited on
    for MLflow's timeout times its retries."""
    import socket

    monkeypatch.setattr(spool_mod, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as hung:  # the kernel completes connections in its backlog; nobody reads
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        assert not spool_mod.reachable(uri)
        tracked = _started_away(uri, tmp_path / "run")
    assert tracked.run_id.startswith("local-")
    assert [r["op"] for r in tracked.spool.records()] == ["create"]


def test_the_probe_takes_any_answer_below_500_as_the_server_being_there(monkeypatch):
    import http.server
    import threading

    codes = iter([200, 404, 401, 503])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(next(codes))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        assert [spool_mod.reachable(uri) for _ in range(4)] == [True, True, True, False]
    finally:
        server.shutdown()
        server.server_close()
