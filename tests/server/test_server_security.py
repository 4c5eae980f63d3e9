"""Hostile input: path traversal, symlinks, resolvers, YAML bombs, oversized bodies, tokens, tracebacks."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from server_helpers import settings, settings_for, spec_root  # noqa: F401  (fixtures)

from moeplat.cli.main import main
from moeplat.server.app import create_app

TOKEN = "s3cret-token"


@pytest.fixture
def client(settings):  # noqa: F811
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _errors(client, text: str, kind: str = "run", **kw) -> list[dict]:
    out = client.post("/api/validate", json={"text": text, "kind": kind, **kw})
    assert out.status_code == 200
    assert out.json()["ok"] is False
    return out.json()["errors"]


@pytest.mark.parametrize(
    "extends",
    ["../../etc/passwd", "/etc/passwd", "../specs/../../outside.yaml", "sub/../../outside.yaml"],
)
def test_extends_cannot_leave_the_spec_roots(client, spec_root, extends):  # noqa: F811
    (spec_root.parent / "outside.yaml").write_text("name: secret\n")
    errors = _errors(client, f"extends: {extends}\nname: x\n")
    assert [e["path"] for e in errors] == ["extends"]
    assert "inside the spec roots" in errors[0]["message"] and errors[0]["line"] == 1
    assert "secret" not in str(errors) and "root:" not in str(errors)


@pytest.mark.parametrize("extends", ['"a\\0b.yaml"', "0" * 300 + ".yaml"])
def test_unusable_extends_names_are_spec_errors(client, extends):
    assert _errors(client, f"extends: {extends}\n")[0]["path"] == "extends"


def test_symlink_out_of_the_root_is_refused(client, spec_root):  # noqa: F811
    outside = spec_root.parent / "elsewhere"
    outside.mkdir()
    (outside / "base.yaml").write_text((spec_root / "quickstart.yaml").read_text())
    (spec_root / "link.yaml").symlink_to(outside / "base.yaml")
    (spec_root / "linkdir").symlink_to(outside)
    for target in ("link.yaml", "linkdir/base.yaml"):
        assert _errors(client, f"extends: {target}\n")[0]["path"] == "extends"
        r = client.post("/api/jobs", json={"path": target})
        assert r.status_code == 422 and r.json()["errors"][0]["path"] == "path"
    (spec_root / "inside.yaml").symlink_to(spec_root / "quickstart.yaml")  # a link within: fine
    ok = client.post("/api/validate", json={"text": "extends: inside.yaml\n"}).json()
    assert ok["ok"], ok


@pytest.mark.parametrize(
    "path", ["../jobs.db", "/etc/passwd", "../../../../etc/passwd", "", "0" * 300 + ".yaml", "a\x00b.yaml"]
)
def test_job_path_cannot_leave_the_roots(client, path):
    r = client.post("/api/jobs", json={"path": path})
    assert r.status_code == 422
    assert client.get("/api/jobs").json()["jobs"] == []


def test_filename_cannot_leave_the_root(client, spec_root):  # noqa: F811
    text = (spec_root / "tiny.yaml").read_text()
    for name in ("../x.yaml", "/tmp/x.yaml", "a/../../x.yaml", "x.txt"):
        assert _errors(client, text, filename=name)[0]["path"] == "filename"


def test_data_paths_and_checkpoints_stay_inside(client, spec_root):  # noqa: F811
    base = "extends: tiny.yaml\n"
    data = base + "data:\n  source: {kind: text_files, paths: [%s]}\n"
    for p in ("/etc", "../../", "corpus/../../x"):
        errors = _errors(client, data % p)
        assert [e["path"] for e in errors] == ["data.source.paths.0"], errors
    (spec_root / "corpus").mkdir()
    assert client.post("/api/validate", json={"text": data % "corpus"}).json()["ok"]
    over = _errors(client, base, overrides=["data.source={kind: text_files, paths: [/etc]}"])
    assert over[0]["path"] == "data.source.paths.0"
    ckpt = base + "train:\n  init: {kind: upcycle, checkpoint: %s}\n"
    for p in ("/etc/passwd", "../../x.ckpt"):
        assert _errors(client, ckpt % p)[0]["path"] == "train.init.checkpoint"


def test_mixture_and_hf_dataset_files_stay_inside(client, spec_root):  # noqa: F811
    base = "extends: tiny.yaml\n"
    hf = base + "data:\n  source: {kind: hf_dataset, path: json, data_files: ['%s'], text_field: text}\n"
    for p in ("/etc/passwd", "../../x/*.jsonl"):
        assert [e["path"] for e in _errors(client, hf % p)] == ["data.source.data_files.0"]
    assert client.post("/api/validate", json={"text": hf % "s3://datasets/a.jsonl"}).json()["ok"]
    folder = base + "data:\n  source: {kind: hf_dataset, path: '%s', text_field: text}\n"
    for p in ("/etc", "../.."):
        assert [e["path"] for e in _errors(client, folder % p)] == ["data.source.path"]
    mix = base + (
        "data:\n  source:\n    kind: mixture\n    sources:\n"
        "      - {name: a, weight: 1, source: {kind: python_stdlib}}\n"
        "      - {name: b, weight: 1, source: {kind: text_files, paths: [/etc]}}\n"
    )
    assert [e["path"] for e in _errors(client, mix)] == ["data.source.sources.1.source.paths.0"]


def test_prepared_corpora_stay_inside_or_on_s3(client, spec_root):  # noqa: F811
    base = "extends: tiny.yaml\n"
    for p in ("/etc", "../../x", "shards/../../x"):
        errors = _errors(client, base + f"data:\n  prepared_dir: {p}\n")
        assert [e["path"] for e in errors] == ["data.prepared_dir"], errors
        errors = _errors(client, base + f"data:\n  source: {{kind: prepared, path: {p}}}\n")
        assert [e["path"] for e in errors] == ["data.source.path"], errors
    for p in ("shards", "s3://datasets/shards"):
        ok = client.post("/api/validate", json={"text": base + f"data:\n  prepared_dir: '{p}'\n"}).json()
        assert ok["ok"], ok


def test_sweeps_cannot_search_paths_or_leave_the_root(client, spec_root):  # noqa: F811
    sweep = "extends: %s\nname: s\nsearch:\n  %s: {kind: categorical, choices: [a]}\ntrials: {n_trials: 1}\n"
    errors = _errors(client, sweep % ("tiny.yaml", "data.source"), kind="sweep")
    assert errors[0]["path"] == "search.data.source"
    errors = _errors(client, sweep % ("../../etc/passwd", "model.moe.top_k"), kind="sweep")
    assert errors[0]["path"] == "extends" and errors[0]["line"] == 1


def test_resolvers_cannot_read_the_environment(client, monkeypatch):
    monkeypatch.setenv("MOEPLAT_SECRET_FOR_TEST", "leaked")
    errors = _errors(client, "extends: tiny.yaml\nname: ${oc.env:MOEPLAT_SECRET_FOR_TEST}\n")
    assert errors[0]["line"] == 2 and "resolvers" in errors[0]["message"]
    errors = _errors(client, "extends: tiny.yaml\n", overrides=["name=${oc.env:MOEPLAT_SECRET_FOR_TEST}"])
    assert "resolvers" in errors[0]["message"]
    assert "leaked" not in str(errors)


def test_yaml_bombs_and_deep_nesting_are_refused(client):
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        ref = ", ".join([f"*{chr(96 + i)}"] * 9)
        laughs.append(f"{chr(97 + i)}: &{chr(97 + i)} [{ref}]")
    errors = _errors(client, "\n".join(laughs) + "\n")
    assert "aliases are expanded" in errors[0]["message"]
    deep = "x: " + "[" * 5000 + "]" * 5000 + "\n"
    assert "nested deeper" in _errors(client, deep)[0]["message"]


def test_oversized_spec_and_body_are_413(tmp_path, spec_root):  # noqa: F811
    s = settings_for(tmp_path, max_spec_bytes=1000, max_request_bytes=20_000)
    with TestClient(create_app(s)) as c:
        big_spec = "name: x\n" + "# pad\n" * 300
        r = c.post("/api/validate", json={"text": big_spec})
        assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]
        assert c.post("/api/jobs", json={"text": big_spec}).status_code == 413
        (spec_root / "big.yaml").write_text(big_spec)
        assert c.post("/api/jobs", json={"path": "big.yaml"}).status_code == 413
        r = c.post("/api/validate", content=b'{"text": "' + b"x" * 30_000 + b'"}')
        assert r.status_code == 413 and "20000 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(30):
                yield b"x" * 1000

        r = c.post("/api/validate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/api/jobs").json()["jobs"] == []


def test_token_required_on_api_but_health(tmp_path, spec_root):  # noqa: F811
    s = settings_for(tmp_path, token=TOKEN, host="0.0.0.0")
    with TestClient(create_app(s)) as c:
        assert c.get("/api/health").json() == {"ok": True, "version": "0.1.0", "auth": True}
        for method, path in [("get", "/api/jobs"), ("post", "/api/validate"), ("get", "/api/runs"),
                             ("post", "/api/worker/claim"), ("get", "/api/jobs/1/log/stream"),
                             ("get", "/api/nope")]:  # fmt: skip
            r = getattr(c, method)(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        wrong = c.get("/api/jobs", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        ok = c.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert c.get("/api/jobs", params={"access_token": TOKEN}).status_code == 401  # header only...
        stream = c.get("/api/jobs/1/log/stream", params={"access_token": TOKEN})
        assert stream.status_code == 404  # ...but the stream (EventSource cannot send headers)
        assert c.get("/").status_code == 200  # the UI's files are public, its data is not


def test_serve_refuses_beyond_loopback_without_token(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MOEPLAT_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err


def test_internal_errors_never_show_a_traceback(client, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals at /srv/db")

    monkeypatch.setattr(client.app.state.store, "list", broken)
    r = client.get("/api/jobs")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error, see the server log"}
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


def test_malformed_requests_are_4xx(client):
    assert (
        client.post(
            "/api/validate", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.post("/api/validate", json={"text": "x", "extra": 1}).status_code == 422
    lone_surrogate = b'{"text": "\\u0000\\udfff: ["}'  # valid JSON, not encodable as UTF-8
    r = client.post("/api/validate", content=lone_surrogate, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "lone surrogate" in r.text
    lone_name = b'{"path": "tiny.yaml", "name": "\\udfff"}'
    assert (
        client.post("/api/jobs", content=lone_name, headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert client.get("/api/jobs/99999999999999999999999").status_code == 422
    assert client.get("/api/jobs/1/log", params={"offset": -1}).status_code == 422
    assert client.post("/api/validate", content=b"x", headers={"content-length": "abc"}).status_code == 400
