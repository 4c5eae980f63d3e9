"""A throwaway PostgreSQL server for tests that need a real RDB storage (team sweeps).

`postgres_url` (session scope) runs initdb into a temporary directory, starts the server on a free
127.0.0.1 port with its unix socket inside that directory, creates a database and yields its
SQLAlchemy URL; at the end the server is stopped (immediate mode) and the directory removed.
The binaries come from PATH or Debian's /usr/lib/postgresql/<version>/bin; `scripts/system-deps.sh`
installs them. As root the server runs as the `postgres` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

DATABASE = "moeplat_test"
# trust: the server listens on 127.0.0.1 only and lives as long as the test session
INITDB_ARGS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
INSTALL_HINT = "run scripts/system-deps.sh (as root; `make system-deps`) to install PostgreSQL"


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then the newest Debian version."""
    candidates = []
    if found := shutil.which("initdb"):
        candidates.append(Path(found).resolve().parent)

    def version(d: Path) -> float:
        try:
            return float(d.parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL cluster in its own directory, trust authentication, owned by the test."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="moeplat-pg-"))  # not under pytest's 0700 tmp dirs
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.as_root = os.geteuid() == 0
        self.port: int | None = None

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", "postgres", "--", *cmd] if self.as_root else cmd

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._cmd(tool, *args), cwd=self.root, capture_output=True, text=True, timeout=120
        )

    def init(self) -> None:
        self.sock.mkdir()
        if self.as_root:
            try:
                shutil.chown(self.root, "postgres", "postgres")
                shutil.chown(self.sock, "postgres", "postgres")
            except LookupError:
                pytest.fail(f"running as root but there is no `postgres` user: {INSTALL_HINT}")
        out = self._run("initdb", "-D", str(self.data), *INITDB_ARGS)
        if out.returncode != 0:
            pytest.fail(f"initdb failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    def start(self, attempts: int = 3) -> None:
        """Start on a free port; another process can take the port between probe and bind: retry."""
        for _ in range(attempts):
            self.port = free_port()
            options = (
                f"-h 127.0.0.1 -p {self.port} -k {self.sock} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"  # speed, not safety
            )
            out = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"
            )
            if out.returncode == 0:
                return
        log = self.log.read_text() if self.log.exists() else ""
        pytest.fail(f"PostgreSQL did not start: {out.stdout}\n{out.stderr}\n{log}")

    def create_database(self, name: str) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def url(self, name: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.port is not None:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of an empty database on a fresh local PostgreSQL server (trust auth)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql: "
            + INSTALL_HINT
        )
    cluster = Cluster(bin_dir)
    try:
        cluster.init()
        cluster.start()
        cluster.create_database(DATABASE)
        yield cluster.url(DATABASE)
    finally:
        cluster.stop()
