"""The HTTP API through FastAPI's TestClient: specs (validate, plan, schema), jobs and their logs."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from server_helpers import settings, settings_for, spec_root  # noqa: F401  (fixtures)

from moeplat.cli.main import main
from moeplat.server.app import create_app


@pytest.fixture
def client(settings):  # noqa: F811
    with TestClient(create_app(settings)) as c:
        yield c


def _tiny(spec_root):  # noqa: F811
    return (spec_root / "tiny.yaml").read_text()


def test_health_and_schemas(client):
    assert client.get("/api/health").json() == {"ok": True, "version": "0.1.0", "auth": False}
    run = client.get("/api/schema").json()
    assert "model" in run["properties"]
    sweep = client.get("/api/schema", params={"kind": "sweep"}).json()
    assert "search" in sweep["properties"]


def test_validate_errors_are_the_cli_lines(client, spec_root, monkeypatch, capsys):  # noqa: F811
    bad = _tiny(spec_root).replace("top_k: 2", "top_kk: 2").replace("d_model: 32", "d_model: lots")
    (spec_root / "bad.yaml").write_text(bad)
    monkeypatch.chdir(spec_root)
    assert main(["validate", "bad.yaml"]) == 2
    cli_lines = [line.strip() for line in capsys.readouterr().err.splitlines()[1:]]

    out = client.post("/api/validate", json={"text": bad, "filename": "bad.yaml"}).json()
    assert out["ok"] is False and out["name"] is None
    assert [e["text"] for e in out["errors"]] == cli_lines
    by_path = {e["path"]: e for e in out["errors"]}
    assert by_path["model.moe.top_kk"]["line"] == bad.splitlines().index("    top_kk: 2") + 1
    assert by_path["model.moe.top_kk"]["hint"] == "did you mean 'top_k'?"
    assert by_path["model.d_model"]["file"] == "bad.yaml"


def test_validate_ok_with_extends_and_overrides(client, spec_root):  # noqa: F811
    out = client.post(
        "/api/validate",
        json={"text": _tiny(spec_root), "filename": "tiny.yaml", "overrides": ["train.max_steps=3"]},
    ).json()
    assert out["ok"] and out["name"] == "tiny" and len(out["hash"]) == 12 and out["errors"] == []
    bad_override = client.post(
        "/api/validate", json={"text": _tiny(spec_root), "overrides": ["model.moe.topk=1"]}
    )
    assert bad_override.json()["errors"][0]["text"].startswith(
        "--set model.moe.topk=1: model.moe.topk: unknown key"
    )


def test_plan_matches_cli_json(client, spec_root, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(spec_root)
    assert main(["plan", "tiny.yaml", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    out = client.post("/api/plan", json={"text": _tiny(spec_root), "filename": "tiny.yaml"}).json()
    assert out["ok"] and out["plan"] == cli
    assert "active params" in out["text"] and "global batch" in out["text"]
    bad = client.post("/api/plan", json={"text": "name: x\n"}).json()
    assert bad["ok"] is False and bad["plan"] is None and bad["errors"]


def test_plan_of_a_sweep_has_the_range_over_its_search_space(client, spec_root):  # noqa: F811
    sweep = (
        "extends: tiny.yaml\nname: s\ntrials: {n_trials: 2}\n"
        "search:\n  model.moe.top_k: {kind: int, low: 1, high: 3}\n"
    )
    out = client.post("/api/plan", json={"text": sweep, "kind": "sweep", "filename": "s.yaml"}).json()
    r = out["plan"]["sweep_range"]
    assert out["ok"] and r["points"] == 2 and r["exhaustive"]
    assert r["active_params"]["min"]["point"] == {"model.moe.top_k": 1}
    assert r["active_params"]["max"]["point"] == {"model.moe.top_k": 3}
    assert (
        r["active_params"]["min"]["value"] < out["plan"]["active_params"] < r["active_params"]["max"]["value"]
    )
    assert out["text"].startswith("sweep           s, base tiny.yaml") and str(spec_root) not in out["text"]


def test_submit_list_get_cancel(client, spec_root):  # noqa: F811
    r = client.post("/api/jobs", json={"text": _tiny(spec_root), "filename": "tiny.yaml", "name": "first"})
    assert r.status_code == 201
    first = r.json()
    assert first["state"] == "queued" and first["name"] == "first" and first["attempts"] == 0
    second = client.post("/api/jobs", json={"path": "tiny.yaml", "overrides": ["train.max_steps=6"]}).json()
    assert second["name"] == "tiny" and second["id"] > first["id"]
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [second["id"], first["id"]]

    cancelled = client.post(f"/api/jobs/{first['id']}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"]
    assert [j["id"] for j in client.get("/api/jobs", params={"state": "queued"}).json()["jobs"]] == [
        second["id"]
    ]
    assert client.get(f"/api/jobs/{second['id']}").json()["state"] == "queued"
    assert client.get("/api/jobs/999").status_code == 404
    assert client.post("/api/jobs/999/cancel").status_code == 404


def test_submit_invalid_spec_is_422_with_issues(client, spec_root):  # noqa: F811
    r = client.post("/api/jobs", json={"text": _tiny(spec_root).replace("n_heads: 2", "n_heads: 0")})
    assert r.status_code == 422
    assert r.json()["detail"] == "invalid spec"
    assert r.json()["errors"][0]["path"] == "model.n_heads"
    assert client.post("/api/jobs", json={"path": "tiny.yaml", "text": "x"}).status_code == 422
    assert client.post("/api/jobs", json={"path": "nope.yaml"}).status_code == 422
    assert client.get("/api/jobs").json()["jobs"] == []


def test_sweep_job_records_its_study(client, spec_root):  # noqa: F811
    sweep = (
        "extends: tiny.yaml\nname: tiny-sweep\nsearch:\n  model.moe.top_k: {kind: int, low: 1, high: 2}\n"
        "trials: {n_trials: 2}\n"
    )
    job = client.post("/api/jobs", json={"kind": "sweep", "text": sweep, "filename": "sweeps/s.yaml"})
    assert job.status_code == 422  # sweeps/s.yaml -> extends sweeps/tiny.yaml, which does not exist
    assert "spec file not found: tiny.yaml" not in job.text and "sweeps/tiny.yaml" in job.text
    job = client.post("/api/jobs", json={"kind": "sweep", "text": sweep, "filename": "s.yaml"}).json()
    assert job["kind"] == "sweep" and job["study"] == "tiny-sweep" and job["storage"].endswith("optuna.db")
    assert client.get(f"/api/jobs/{job['id']}/studies").json() == {"studies": []}  # not created yet
    assert client.get(f"/api/jobs/{job['id']}/runs").json() == {"runs": []}


def _claim(client, worker="w1"):
    claimed = client.post("/api/worker/claim", json={"worker": worker}).json()
    return claimed, {"worker": worker, "attempt": claimed["attempt"]}


def test_log_polling_stream_and_finish(client, spec_root):  # noqa: F811
    job = client.post("/api/jobs", json={"path": "tiny.yaml"}).json()
    claimed, lease = _claim(client)
    assert claimed["job"]["id"] == job["id"] and claimed["job"]["state"] == "running"
    assert claimed["text"] == _tiny(spec_root) and claimed["filename"] == "tiny.yaml"
    assert claimed["spec_root"] == str(spec_root)
    url = f"/api/worker/jobs/{job['id']}"
    client.post(f"{url}/log", json={**lease, "text": "step 1\nstep"})
    first = client.get(f"/api/jobs/{job['id']}/log").json()
    assert first == {"text": "step 1\nstep", "offset": 11, "done": False}
    client.post(f"{url}/log", json={**lease, "text": " 2\r\ndone\n"})
    assert client.get(f"/api/jobs/{job['id']}/log", params={"offset": 11}).json()["text"] == " 2\r\ndone\n"
    assert client.post(f"{url}/heartbeat", json=lease).json() == {"cancel": False, "group_cancel": False}
    finished = client.post(f"{url}/finish", json={**lease, "exit_code": 0}).json()
    assert finished["state"] == "succeeded" and finished["exit_code"] == 0
    assert client.get(f"/api/jobs/{job['id']}/log", params={"offset": 20}).json()["done"] is True

    with client.stream("GET", f"/api/jobs/{job['id']}/log/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    assert body == "data: step 1\n\ndata: step 2\n\ndata: done\n\nevent: end\ndata: succeeded\n\n"


def test_cancel_running_job_reaches_worker(client, spec_root):  # noqa: F811
    job = client.post("/api/jobs", json={"path": "tiny.yaml"}).json()
    _, lease = _claim(client)
    running = client.post(f"/api/jobs/{job['id']}/cancel").json()
    assert running["state"] == "running" and running["cancel_requested"] is True
    url = f"/api/worker/jobs/{job['id']}"
    assert client.post(f"{url}/heartbeat", json=lease).json() == {"cancel": True, "group_cancel": False}
    done = client.post(f"{url}/finish", json={**lease, "exit_code": 130, "error": "interrupted"}).json()
    assert done["state"] == "cancelled"
    assert "[moeplat: cancel requested]" in client.get(f"/api/jobs/{job['id']}/log").json()["text"]


def test_restart_keeps_jobs(tmp_path, spec_root):  # noqa: F811
    s = settings_for(tmp_path)
    with TestClient(create_app(s)) as c:
        job = c.post("/api/jobs", json={"path": "tiny.yaml"}).json()
        _, lease = _claim(c)
        c.post(f"/api/worker/jobs/{job['id']}/log", json={**lease, "text": "before restart\n"})
    with TestClient(create_app(s)) as c:  # a new server process on the same database
        again = c.get(f"/api/jobs/{job['id']}").json()
        assert again["state"] == "running" and again["worker"] == "w1"
        assert c.get(f"/api/jobs/{job['id']}/log").json()["text"] == "before restart\n"
        assert c.post(f"/api/worker/jobs/{job['id']}/heartbeat", json=lease).json() == {
            "cancel": False,
            "group_cancel": False,
        }


def test_web_root_without_a_build_says_how(client, tmp_path, spec_root):  # noqa: F811
    r = client.get("/")
    assert r.status_code == 200 and "make setup" in r.text
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<html>the ui</html>")
    with TestClient(create_app(settings_for(tmp_path, web_dir=web))) as c:
        assert c.get("/").text == "<html>the ui</html>"
        assert c.get("/api/health").json()["ok"]
