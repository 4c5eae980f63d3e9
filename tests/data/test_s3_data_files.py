"""`hf_dataset` `data_files: s3://...` against moto's S3 server (tests/s3_server.py), credentials
and endpoint from the environment as for MinIO; and a prepare of such a source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from s3_server import moto_server, s3  # noqa: F401  (fixtures)

from moeplat.compile.data import build_data, load_documents
from moeplat.data import python_stdlib_documents
from moeplat.errors import SpecError
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d.data.decode("utf-8"), "path": d.name}) + "\n" for d in docs).encode()


def _spec(tmp_path, source: str, extra: str = "") -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(
        f"extends: {TINY}\nname: s3-files\ndata:\n  source: {source}\n  val_fraction: 0.2\n{extra}"
    )
    return path


@pytest.fixture
def uploaded(s3):  # noqa: F811
    docs = python_stdlib_documents(max_bytes=400_000)
    half = len(docs) // 2
    s3.put("text/part-0.jsonl", _jsonl(docs[:half]))
    s3.put("text/part-1.jsonl", _jsonl(docs[half:]))
    return s3, docs


def test_jsonl_data_files_on_s3_train_and_prepare(uploaded, tmp_path, monkeypatch):
    bucket, docs = uploaded
    monkeypatch.setenv("MOEPLAT_CACHE_DIR", str(tmp_path / "cache"))
    source = f"{{kind: hf_dataset, path: json, data_files: ['{bucket.url}/text/*.jsonl']}}"
    loaded = load_spec(_spec(tmp_path, source))
    read = load_documents(loaded.spec.data, loaded.base_dir)
    assert [d.data for d in read] == [d.data for d in docs]  # every row, in file order
    assert read[0].name == f"{bucket.url}/text/part-0.jsonl:0"
    _, memory_info = build_data(loaded.spec, loaded.base_dir)

    prepared = load_spec(_spec(tmp_path, source, f"  prepared_dir: '{bucket.url}/prepared/text'\n"))
    _, info = build_data(prepared.spec, prepared.base_dir)
    assert "prepared/text/manifest.json" in bucket.list_keys("prepared/")
    assert info.train_tokens == memory_info.train_tokens and info.val_tokens == memory_info.val_tokens
    assert info.unigram_baseline == pytest.approx(memory_info.unigram_baseline, rel=1e-12)


def test_a_data_files_url_that_matches_nothing_names_the_field(uploaded, tmp_path):
    bucket, _ = uploaded
    loaded = load_spec(
        _spec(tmp_path, f"{{kind: hf_dataset, path: json, data_files: ['{bucket.url}/nothing/*.jsonl']}}")
    )
    with pytest.raises(SpecError) as e:
        build_data(loaded.spec, loaded.base_dir)
    assert (
        e.value.issues[0].path == "data.source.data_files" and "matched no files" in e.value.issues[0].message
    )
