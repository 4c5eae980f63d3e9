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

Devices: a worker given device ids (`moeplat worker --devices 0,1,2,3`; by default the GPUs it
sees) owns them and runs jobs side by side on disjoint subsets, each job's process seeing only its
own (CUDA_VISIBLE_DEVICES). It claims with its free count, so the server hands it only a job whose
parallel.devices fit. A worker without devices (no GPU) is a CPU worker: one job at a time, of any
width (a CPU spec's parallel.devices are gloo processes sharing the machine's cores), as before.
Each job is supervised by its own thread: heartbeats, log, cancel and lost leases are per job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("moeplat.worker")
LOG_FLUSH_S = 0.5
LOG_CHUNK_CHARS = 256 * 1024


DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_-]{0,63}")  # an index, or a GPU UUID / MIG name


def parse_devices(text: str, gpu_count: Callable[[], int]) -> list[str] | None:
    """`--devices`: "auto" (CUDA_VISIBLE_DEVICES if set, else `gpu_count()` GPUs, else a CPU
    worker), "cpu" (a CPU worker: None), or ids "0,1,2" (real or, for tests, made up). ValueError
    with what to write instead."""
    text = text.strip()
    if text == "cpu":
        return None
    if text == "auto":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # what this worker was given, by the ids the driver knows
            ids = [d.strip() for d in visible.split(",") if d.strip()]
            return None if not ids or ids[0] == "-1" else parse_devices(",".join(ids), gpu_count)
        n = gpu_count()
        return [str(i) for i in range(n)] or None
    ids = [d.strip() for d in text.split(",")]
    bad = [d for d in ids if not DEVICE_ID.fullmatch(d)]
    if bad or len(set(ids)) != len(ids):
        what = f"bad id {bad[0]!r}" if bad else "an id given twice"
        raise ValueError(f"--devices {text!r}: {what}; give ids like 0,1,2,3, or auto, or cpu")
    return ids


def sweep_worker_index(job: dict, attempt: int, group_size: int | None) -> int:
    """A sweep-worker job's --worker-index (its sampler's seed): its index in its group, moved on
    by the group's size per retry."""
    return job["group_index"] + (group_size or 1) * (attempt - 1)


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
    devices: list[str] | None = None  # device ids this worker owns; None: a CPU worker (docstring)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir).resolve()
        self.client = Client(self.server, self.token)
        self._lock = threading.Lock()
        if self.devices is not None:
            assert self.devices and len(set(self.devices)) == len(self.devices), self.devices

    def serve(self, once: bool = False, stop: threading.Event | None = None) -> int:
        """Claim and run jobs until `stop` is set (or, with `once`, until the queue is empty and
        no job runs). Each job runs in its own thread on a disjoint subset of `devices`; without
        devices, one job at a time. Returns the number of jobs run; waits for running ones."""
        stop = stop or threading.Event()
        self._free = list(self.devices or [])
        self._active: set[threading.Thread] = set()
        self._changed = threading.Event()  # a job ended: devices are free again
        self._done = 0
        try:
            while not stop.is_set():
                self._changed.clear()
                claimed = self._claim() if self._can_claim() else {"job": None}
                if claimed["job"] is not None:
                    self._start(claimed)
                    continue
                if once and not self._active:
                    break
                self._changed.wait(self.poll_s)  # woken early when a job ends
        finally:
            for thread in list(self._active):
                thread.join()
        return self._done

    def _can_claim(self) -> bool:
        with self._lock:
            return bool(self._free) if self.devices is not None else not self._active

    def _claim(self) -> dict:
        body: dict = {"worker": self.name}
        if self.devices is not None:
            with self._lock:
                body |= {"free_devices": len(self._free), "devices": len(self.devices)}
        try:
            return self.client.post("/api/worker/claim", body)
        except httpx.HTTPStatusError as e:
            code = e.response.status_code
            if code in (401, 403, 404, 405):  # a wrong token, or not a moeplat server
                raise WorkerError(f"the server refused the claim: {code} {e.response.text[:200]}") from None
            log.warning("cannot claim: %s", e)
        except httpx.TransportError as e:
            log.warning("cannot claim: %s", e)
        return {"job": None}

    def _start(self, claimed: dict) -> None:
        """Run the job in a thread on the first free devices it needs; free them when it ends."""
        with self._lock:
            if self.devices is None:
                mine = None
            else:  # the server handed out a job that fits (an older server may not have: take what is free)
                need = max(1, int(claimed["job"].get("devices") or 1))
                mine, self._free = self._free[:need], self._free[need:]

        def job() -> None:
            try:
                self.run(claimed, mine)
            except Exception:
                log.exception("job %d: the worker failed to run it", claimed["job"]["id"])
            finally:
                with self._lock:
                    if mine is not None:
                        self._free = [d for d in self.devices if d in self._free or d in mine]
                    self._active.discard(threading.current_thread())
                    self._done += 1
                self._changed.set()

        thread = threading.Thread(target=job, name=f"job-{claimed['job']['id']}", daemon=True)
        with self._lock:
            self._active.add(thread)
        thread.start()

    def command(self, c: dict, spec_file: Path) -> list[str]:
        job, root = c["job"], Path(self.spec_root or c["spec_root"])
        if job["kind"] == "route":  # moeplat.server.routing: the run id, the text ("" = validation)
            text = ["--text", str(spec_file)] if c["text"] else ["--val-text"]
            cmd = [self.python, "-m", "moeplat.cli.main", "route", c["overrides"][0], *text, "--log"]
            return [*cmd, "--tracking-uri", c["tracking_uri"], "-o", str(spec_file.parent / "route.html")]
        if job["kind"] == "sweep-worker":
            return self._sweep_worker(c, spec_file, root)
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

    def _sweep_worker(self, c: dict, spec_file: Path, root: Path) -> list[str]:
        """One of a group's workers joining its study (moeplat.server.groups). The group's runs
        share a directory, so a trial retried here after a worker died resumes from its checkpoint
        when that worker ran on this machine. A retried job's worker index moves on by the group's
        size: its sampler does not replay the seed its first attempt used."""
        index = sweep_worker_index(c["job"], c["attempt"], c.get("group_size"))
        return [*self.sweep_worker_base(c, spec_file, root), "--worker-index", str(index)]

    def sweep_worker_base(self, c: dict, spec_file: Path, root: Path) -> list[str]:
        """A group's sweep-worker command but its --worker-index (the same for every job of it)."""
        job = c["job"]
        runs = self.work_dir / "runs" / f"group-{job['group']}"
        cmd = [self.python, "-m", "moeplat.cli.main", "sweep-worker", str(spec_file)]
        cmd += ["--as-path", str(root / c["filename"]), "--tracking-uri", c["tracking_uri"]]
        return [*cmd, "--storage", job["storage"] or c["sweep_storage"], "--runs-dir", str(runs)]

    def job_files(self, c: dict) -> tuple[int, int, dict, Path, Path]:
        """A claimed job's id, attempt, lease, its directory here and its spec written into it."""
        job_id, attempt = c["job"]["id"], c["attempt"]
        job_dir = self.work_dir / "jobs" / f"{job_id}-{attempt}"
        job_dir.mkdir(parents=True, exist_ok=True)
        spec_file = job_dir / Path(c["filename"]).name
        spec_file.write_text(c["text"], encoding="utf-8")
        return job_id, attempt, {"worker": self.name, "attempt": attempt}, job_dir, spec_file

    def run(self, c: dict, devices: list[str] | None = None) -> int | None:
        """Run one claimed job to its end (on `devices`: its CUDA_VISIBLE_DEVICES); its exit
        code, or None when the job was lost."""
        job_id, attempt, lease, _, spec_file = self.job_files(c)
        env = {**os.environ, "MOEPLAT_JOB_ID": str(job_id), "PYTHONUNBUFFERED": "1"}
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        where = f" on devices {','.join(devices)}" if devices is not None else ""
        log.info("job %d (attempt %d)%s: %s", job_id, attempt, where, c["job"]["name"])
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
