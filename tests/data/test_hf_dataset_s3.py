"""`hf_dataset` `storage_options` reach fsspec: with no endpoint in the environment, the options
alone point s3fs at moto's S3 server (tests/s3_server.py), for the glob and for the reading."""

from __future__ import annotations

import json

import pytest
from s3_server import moto_server, s3  # noqa: F401  (fixtures)

from moeplat.data import python_stdlib_documents
from moeplat.data.sources import SourceError, hf_dataset_documents


@pytest.mark.slow
def test_storage_options_reach_the_glob_and_the_reader(s3, monkeypatch):  # noqa: F811
    docs = python_stdlib_documents(max_bytes=200_000)
    s3.put("rows/a.jsonl", "".join(json.dumps({"text": d.data.decode()}) + "\n" for d in docs).encode())
    endpoint = s3.endpoint
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    kw = {"path": "json", "data_files": [f"{s3.url}/rows/*.jsonl"]}
    got = hf_dataset_documents(storage_options={"endpoint_url": endpoint}, **kw)
    assert [d.data for d in got] == [d.data for d in docs]
    assert got[0].name == f"{s3.url}/rows/a.jsonl:0"
    with pytest.raises(SourceError) as info:  # the same URL, pointed at a port nothing listens on
        options = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
        hf_dataset_documents(storage_options=options, **kw)
    assert info.value.field == "data_files" and "storage_options" in str(info.value)
