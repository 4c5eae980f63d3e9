"""A real S3-compatible server for tests: moto's server mode (`python -m moto.server`) as a
subprocess on a free port, in its own process group. It speaks the S3 REST API as MinIO does, so
code under test reaches it through the same s3fs/botocore stack as the team setup's MinIO, with the
endpoint and credentials taken from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).

Usage: the `s3` fixture (session-wide server, a fresh bucket per test, the environment set):

    from s3_server import s3  # noqa: F401  (pytest finds the fixture by name)

    def test_x(s3):
        s3.put("data/a.jsonl", b"...")        # s3://<s3.bucket>/data/a.jsonl
        ... code reading f"{s3.url}/data/a.jsonl" ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from postgres import free_port

# moto accepts any credentials; fixed ones keep botocore from looking for a profile on the host.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "moeplat-test",
    "AWS_SECRET_ACCESS_KEY": "moeplat-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    def __init__(self, log: Path):
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"moto server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.kill()
        pytest.fail(f"moto server did not answer in {timeout_s}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@dataclass
class Bucket:
    """One bucket on the server; `url` is its s3:// prefix."""

    endpoint: str
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials())

    def put(self, key: str, data: bytes) -> str:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"{self.url}/{key}"

    def upload_dir(self, local: Path, prefix: str) -> str:
        """Every file under `local` to s3://bucket/prefix/<relative path>; returns that prefix's URL."""
        client = self.client()
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"{self.url}/{prefix}"

    def list_keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def s3(moto_server, monkeypatch) -> Bucket:
    """A fresh bucket, and the environment a user would set for MinIO pointing at the server
    (inherited by subprocesses the test starts)."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    bucket = Bucket(moto_server.endpoint, f"moeplat-{uuid.uuid4().hex[:12]}")
    bucket.client().create_bucket(Bucket=bucket.bucket)
    _clear_fsspec_cache()
    yield bucket
    _clear_fsspec_cache()


def _clear_fsspec_cache() -> None:
    """s3fs caches filesystem instances and directory listings per process: a test must not see
    the previous test's endpoint or listing."""
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover - s3fs is a locked dependency
        pass
