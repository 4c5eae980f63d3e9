"""Prepared corpora on S3, against moto's S3 server started by the tests (tests/s3_server.py): the
credentials and endpoint come from the environment as for the team setup's MinIO."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from postgres import free_port
from s3_server import moto_server, s3  # noqa: F401  (fixtures)

from moeplat.cli.main import main
from moeplat.compile.data import build_data
from moeplat.errors import SpecError
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


def _spec(tmp_path, data: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(f"extends: {TINY}\nname: s3\ndata:\n{data}")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPLAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_prepare_to_s3_then_train_from_it(s3, tmp_path, cache, capsys):  # noqa: F811
    made = _spec(tmp_path, "  source: {kind: python_stdlib, max_bytes: 400000}\n", "made.yaml")
    url = f"{s3.url}/corpora/tiny"
    assert (
        main(
            ["data", "prepare", str(made), "-o", url, "--workers", "2", "--no-progress", "--shard-mb", "0.1"]
        )
        == 0
    )
    keys = s3.list_keys("corpora/tiny/")
    assert "corpora/tiny/manifest.json" in keys and any(k.endswith(".tokens") for k in keys)
    assert main(["data", "prepare", str(made), "-o", url, "--no-progress", "--shard-mb", "0.1"]) == 0
    assert "already prepared" in capsys.readouterr().out

    loaded = load_spec(_spec(tmp_path, f"  source: {{kind: prepared, path: '{url}'}}\n"))
    dm, info = build_data(loaded.spec, loaded.base_dir)
    local = next((cache / "prepared").iterdir())  # downloaded once, keyed by the fingerprint
    assert (local / "manifest.json").is_file() and not list(local.parent.glob(".*partial*"))
    assert str(dm.train_set.paths[0]).startswith(str(local))
    memory_dm, memory_info = build_data(load_spec(TINY).spec)
    assert info.train_tokens == memory_info.train_tokens
    assert info.unigram_baseline == pytest.approx(memory_info.unigram_baseline, rel=1e-12)
    for i in (0, 7, len(dm.train_set) - 1):
        assert torch.equal(dm.train_set[i][0], memory_dm.train_set[i][0])

    # a second run reads the cached copy: it works with the bucket gone
    s3.client().delete_objects(
        Bucket=s3.bucket, Delete={"Objects": [{"Key": k} for k in s3.list_keys() if k.endswith(".tokens")]}
    )
    dm2, _ = build_data(loaded.spec, loaded.base_dir)
    assert np.array_equal(dm2.train_set.read(0, 1000), dm.train_set.read(0, 1000))


def test_prepared_dir_on_s3_resumes_locally_and_uploads(s3, tmp_path, cache, capsys):  # noqa: F811
    spec = _spec(
        tmp_path, f"  source: {{kind: python_stdlib, max_bytes: 400000}}\n  prepared_dir: '{s3.url}/auto'\n"
    )
    loaded = load_spec(spec)
    build_data(loaded.spec, loaded.base_dir)
    assert "corpora" not in s3.list_keys() and "auto/manifest.json" in s3.list_keys("auto/")
    build_data(loaded.spec, loaded.base_dir)
    assert "reusing the prepared corpus" in capsys.readouterr().err


def test_a_missing_prepared_url_names_the_field(s3, tmp_path, cache):  # noqa: F811
    loaded = load_spec(_spec(tmp_path, f"  source: {{kind: prepared, path: '{s3.url}/nothing'}}\n"))
    with pytest.raises(SpecError) as e:
        build_data(loaded.spec, loaded.base_dir)
    assert e.value.issues[0].path == "data.source.path" and "does not exist" in e.value.issues[0].message


def test_unreachable_s3_is_a_clear_error_naming_the_field(s3, tmp_path, cache, monkeypatch):  # noqa: F811
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    loaded = load_spec(_spec(tmp_path, f"  source: {{kind: prepared, path: '{s3.url}/x'}}\n"))
    t0 = time.monotonic()
    with pytest.raises(SpecError) as e:
        build_data(loaded.spec, loaded.base_dir)
    (issue,) = e.value.issues
    assert issue.path == "data.source.path"
    assert f"cannot read {s3.url}/x/manifest.json" in issue.message and dead in issue.message
    assert "AWS_ENDPOINT_URL" in issue.message
    assert time.monotonic() - t0 < 60  # short timeouts and few retries, not botocore's minutes
    assert not os.path.exists(cache / "prepared")
