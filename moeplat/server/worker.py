"""`moeplat worker --server URL`: claim queued jobs from the server and run them, one at a time.

Design: the worker talks to the server over HTTP with the server's token (the /api/worker
endpoints), never to the jobs database. A worker on another machine then needs only the URL and
the token, the database keeps one owner, and the lease rules (moeplat.server.jobs) live in one place.

A job runs as `python -m moeplat.cli.main run|sweep FILE --as-path ROOT/NAME ...` in its own
process group, with MOEPLAT_JOB_ID set (its MLflow runs get the tag moeplat.job_id). FILE is the
submitted text written into the worker's work directory; --as-path makes relative `extends:` and
data paths resolve from the spec's virtual place under the spec root (on another machine,
`--spec-root` names where that machine keeps the same spec tree). The output goes to the server's
job log in batches; a heartbeat thread says the worker is alive and learns of a cancel, which
interrupts the run with SIGINT and, after `grace_s`, SIGKILL. A 409 from the server means the job
is no longer ours (it was reaped): the run is stopped the same way and the result discarded.

A job's runs go to `WORK_DIR/runs/job-<id>/`, the same for every attempt. A job requeued because
its worker died (its run dies with it: PR_SET_PDEATHSIG) and claimed again by a worker with that
work directory (the same worker restarted, or another sharing the directory) resumes: a run with
`--resume last` from its last checkpoint into the same MLflow run, a sweep with `--resume`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("moeplat.worker")
LOG_FLUSH_S = 0.5
LOG_CHUNK_CHARS = 256 * 1024


class Lost(Exception):
    """The server answered 409: the job is no longer this worker's."""


class WorkerError(Exception):
    """The server will not give this worker jobs (wrong token, wrong URL)."""


class Client:
    """JSON calls to the server; transient failures (server restarting) are retried."""

    def __init__(self, server: str, token: str | None, timeout_s: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout_s)

    def post(self, path: str, body: dict, retries: int = 3) -> dict:
        for attempt in range(retries):
            try:
                r = self.http.post(path, json=body)
            except httpx.TransportError as e:
                if attempt == retries - 1:
                    raise
                log.warning("server unreachable (%s); retrying", e)
                time.sleep(1 + attempt)
                continue
            if r.status_code == 409:
                raise Lost(r.json().get("detail", "job lost"))
            r.raise_for_status()
            return r.json()
        raise AssertionError("unreachable")


@dataclass
class Worker:
    server: str
    token: str | None = None
    name: str = f"{platform.node()}-{os.getpid()}"
    work_dir: Path = Path(".moeplat/worker")
    spec_root: Path | None = None  # where this machine keeps the server's (first) spec root
    poll_s: float = 2.0
    grace_s: float = 30.0
    python: str = sys.executable

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        self.client = Client(self.server, self.token)

    def serve(self, once: bool = False, stop: threading.Event | None = None) -> int:
        """Claim and run jobs until `stop` is set (or, with `once`, until the queue is empty)."""
        stop = stop or threading.Event()
        done = 0
        while not stop.is_set():
            try:
                claimed = self.client.post("/api/worker/claim", {"worker": self.name})
            except httpx.HTTPStatusError as e:
                code = e.response.status_code
                if code in (401, 403, 404, 405):  # a wrong token, or not a moeplat server
                    raise WorkerError(
                        f"the server refused the claim: {code} {e.response.text[:200]}"
                    ) from None
                log.warning("cannot claim: %s", e)
                claimed = {"job": None}
            except httpx.TransportError as e:
                log.warning("cannot claim: %s", e)
                claimed = {"job": None}
            if claimed["job"] is None:
                if once:
                    break
                stop.wait(self.poll_s)
                continue
            self.run(claimed)
            done += 1
        return done

    def command(self, c: dict, spec_file: Path) -> list[str]:
        job, root = c["job"], Path(self.spec_root or c["spec_root"])
        if job["kind"] == "route":  # moeplat.server.routing: the run id, the text ("" = validation)
            text = ["--text", str(spec_file)] if c["text"] else ["--val-text"]
            cmd = [self.python, "-m", "moeplat.cli.main", "route", c["overrides"][0], *text, "--log"]
            return [*cmd, "--tracking-uri", c["tracking_uri"], "-o", str(spec_file.parent / "route.html")]
        runs = self.work_dir / "runs" / f"job-{job['id']}"
        cmd = [self.python, "-m", "moeplat.cli.main", job["kind"], str(spec_file)]
        cmd += ["--as-path", str(root / c["filename"]), "--tracking-uri", c["tracking_uri"]]
        cmd += ["--runs-dir", str(runs)]
        if job["kind"] == "sweep":  # an earlier attempt created the study: continue it
            return [*cmd, "--storage", c["sweep_storage"], *(["--resume"] if c["attempt"] > 1 else [])]
        earlier = any(runs.glob("*/*/run.json"))  # an earlier attempt's run directory, here
        return [*cmd, "--no-progress", *(f"--set={o}" for o in c["overrides"])] + (
            ["--resume", "last"] if earlier else []
        )

    def run(self, c: dict) -> int | None:
        """Run one claimed job to its end; its exit code, or None when the job was lost."""
        job_id, attempt = c["job"]["id"], c["attempt"]
        lease = {"worker": self.name, "attempt": attempt}
        job_dir = self.work_dir / "jobs" / f"{job_id}-{attempt}"
        job_dir.mkdir(parents=True, exist_ok=True)
        spec_file = job_dir / Path(c["filename"]).name
        spec_file.write_text(c["text"], encoding="utf-8")
        env = {**os.environ, "MOEPLAT_JOB_ID": str(job_id), "PYTHONUNBUFFERED": "1"}
        log.info("job %d (attempt %d): %s", job_id, attempt, c["job"]["name"])
        die_with_worker = [sys.executable, "-m", "moeplat.server.die_with", str(os.getpid())]
        proc = subprocess.Popen(
            [*die_with_worker, *self.command(c, spec_file)],
            cwd=self.work_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,  # signals reach the run and whatever it starts, not us
        )
        run = _Running(proc, self.grace_s)
        try:
            self._supervise(job_id, lease, run, float(c["heartbeat_s"]))
        except Lost as e:
            log.warning("job %d is no longer ours (%s): stopping it", job_id, e)
            run.interrupt()
            run.wait_or_kill()
            return None
        code = proc.returncode
        error = None if code == 0 else (run.last_error or f"exit code {code}")
        try:
            self._finish(job_id, {**lease, "exit_code": code, "error": error})
        except Lost:
            return None
        return code

    def _supervise(self, job_id: int, lease: dict, run: _Running, heartbeat_s: float) -> None:
        """Forward output and heartbeat until the run ends. While the server is away the output
        waits here and the run goes on: when it is back it gets the log, or answers 409 if the
        reaper gave the job away meanwhile."""
        next_beat, pending, give_up = 0.0, "", None
        while True:
            finished = run.proc.poll() is not None
            if finished:
                run.reader.join(timeout=30)
                give_up = give_up or time.monotonic() + 120
            pending += run.take()
            try:
                while pending:
                    chunk = pending[:LOG_CHUNK_CHARS]
                    self.client.post(f"/api/worker/jobs/{job_id}/log", {**lease, "text": chunk})
                    pending = pending[len(chunk) :]
                if time.monotonic() >= next_beat and not finished:
                    if self.client.post(f"/api/worker/jobs/{job_id}/heartbeat", lease)["cancel"]:
                        run.interrupt()
                    next_beat = time.monotonic() + heartbeat_s
            except httpx.HTTPError as e:
                log.warning("job %d: the server did not take the log or heartbeat: %s", job_id, e)
            if finished and (not pending or time.monotonic() > give_up):
                return
            run.escalate()
            time.sleep(LOG_FLUSH_S)

    def _finish(self, job_id: int, body: dict, tries: int = 30) -> None:
        for i in range(tries):
            try:
                self.client.post(f"/api/worker/jobs/{job_id}/finish", body)
                return
            except httpx.HTTPError as e:
                log.warning("job %d: cannot report its end yet: %s", job_id, e)
                time.sleep(min(10, 1 + i))


class _Running:
    """A job's process: its output collected by a reader thread, SIGINT then SIGKILL on request."""

    def __init__(self, proc: subprocess.Popen, grace_s: float):
        self.proc, self.grace_s = proc, grace_s
        self.lock = threading.Lock()
        self.buffer: list[str] = []
        self.last_error: str | None = None
        self.interrupted_at: float | None = None
        self.killed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        in_error = False
        for line in self.proc.stdout:
            with self.lock:
                self.buffer.append(line)
                if line.startswith("error:"):  # the CLI's error, and its indented issue lines
                    self.last_error, in_error = line.rstrip(), True
                elif in_error and line.startswith("  "):
                    self.last_error = (self.last_error + "\n" + line.rstrip())[:5000]
                else:
                    in_error = False

    def take(self) -> str:
        with self.lock:
            text, self.buffer = "".join(self.buffer), []
        return text

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def interrupt(self) -> None:
        if self.interrupted_at is None and self.proc.poll() is None:
            self.interrupted_at = time.monotonic()
            self._signal(signal.SIGINT)

    def escalate(self) -> None:
        """SIGKILL once the grace period after SIGINT is over."""
        due = self.interrupted_at is not None and time.monotonic() - self.interrupted_at > self.grace_s
        if due and not self.killed and self.proc.poll() is None:
            log.warning("job process %d ignored SIGINT for %.0fs: SIGKILL", self.proc.pid, self.grace_s)
            self._signal(signal.SIGKILL)
            self.killed = True

    def wait_or_kill(self) -> None:
        try:
            self.proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
