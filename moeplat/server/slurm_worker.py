"""`moeplat worker --executor slurm`: a bridge on a SLURM login node that claims the server's jobs
and runs each as a SLURM batch job.

Why a bridge worker and not `moeplat serve --executor slurm`: the bridge speaks the server's
existing worker protocol (claim, lease, heartbeat, log, cancel, finish; moeplat.server.worker_api)
unchanged, so the server stays engine-agnostic -- it hands jobs to engines and schedules nothing
itself -- needs no SLURM (no munge key, no slurm.conf) on its own host, and any number of bridges
and local workers can serve one queue side by side. SLURM does the queuing: a bridge keeps up to
`max_jobs` SLURM jobs in flight at once and only follows them.

Per claimed job: the spec is written to WORK_DIR/jobs/<id>-<attempt>/ and `moeplat slurm` renders
its batch script there (nodes and tasks per node from the spec's `parallel` section, srun, the
requeue trap; moeplat.parallel.launch.sbatch_script). It is submitted with `sbatch` and command-line
options that win over the script's: `--output` to a log file the bridge tails (opened in append
mode, so a requeued start adds to it), `--requeue`, `--signal=B:USR1@N` (the warning before a time
limit or preemption: the script's trap stops the run, which exits resumable, and requeues the job),
and the bridge's --partition / --account / --qos / --time. The run directory is fixed per moeplat
job (WORK_DIR/runs/job-<id>/run), so a requeued SLURM job -- and a later attempt of the moeplat job
after a bridge died -- resumes it from its last checkpoint into the same MLflow run.

A sweep group (`--parallel N`) is one job array: the bridge claims with `array_executor: slurm`,
gets the group's queued jobs together (moeplat.server.groups.claim_rest) and submits them with one
`sbatch --array` (moeplat.server.slurm_array; a sweep's script, one task or an array, asks for the
GPUs and parallel.slurm of its base spec). Each job is then a flight of its own on task
`JOBID_I` (I: its group index): own log file (`slurm-%A_%a.log`), state, heartbeat and end, and a
cancel of one job scancels its task. A cancel of the whole group (the heartbeat's `group_cancel`)
is one `scancel JOBID` for the array. The array counts once against `max_jobs`.

Following a job: `squeue` while SLURM lists it; then its final state from `sacct`, or, on clusters
without an accounting database, `scontrol show job` (moeplat.server.slurm). New bytes of the log
file go to the job's log; state changes (pending and why, running, requeued) are written into the
log as `[moeplat: ...]` lines, and each heartbeat carries the current one as the job's `detail`
("SLURM PENDING (Resources)", "SLURM RUNNING on node n1", "SLURM requeued (PREEMPTED), pending
(BeginTime)"; moeplat.server.slurm.detail), which `moeplat jobs` and the web UI show. While SLURM
keeps the job pending or requeues it, the moeplat job stays running (leased to the bridge): the
protocol has no "queued again" report, and the lease must stay ours to resume it. A cancel
seen on a heartbeat becomes `scancel` (a pending job) or `scancel --signal=INT` to the run's tasks
(it closes its MLflow run), then a plain `scancel` after `grace_s`. The end is reported with the
SLURM state and reason as the error, e.g. "SLURM TIMEOUT: the job reached its time limit ...".

Bad input: without the SLURM commands, with munge or slurmctld down, or with a --partition the
cluster does not have, the bridge refuses to start (SlurmUnavailable, a message saying what to
fix). sbatch refusing a job (a partition or account that does not exist, a bad option) fails that
job at once with sbatch's message; a job SLURM keeps pending for a reason it can never leave
(moeplat.server.slurm.NEVER_STARTS) is cancelled and failed with that reason.
"""

from __future__ import annotations

import codecs
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from moeplat.server.slurm import (
    NEVER_STARTS,
    QUEUED,
    Slurm,
    SlurmJob,
    SlurmUnavailable,
    SubmitError,
    detail,
    job_state,
)
from moeplat.server.slurm_array import (
    OUTPUT,
    Task,
    array_script,
    array_spec,
    log_path,
    sweep_sbatch,
    task_id,
)
from moeplat.server.worker import LOG_CHUNK_CHARS, Lost, Worker, WorkerError, sweep_worker_index

log = logging.getLogger("moeplat.worker")


@dataclass(frozen=True)
class SlurmOptions:
    """What the bridge asks SLURM for every job (sbatch options; None: the cluster's default)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # sbatch --time, e.g. 04:00:00
    cpus_per_task: int = 8
    signal_s: int = 90  # the warning signal comes this many seconds before the end
    extra: tuple[str, ...] = ()  # more sbatch options, e.g. --mem=32G

    def sbatch(self) -> list[str]:
        """Options for sbatch's command line (they win over the script's #SBATCH lines)."""
        return list(self.extra)

    def named(self) -> dict[str, str | None]:
        """The bridge's partition/account/qos/time (None: not given)."""
        return {"partition": self.partition, "account": self.account, "qos": self.qos, "time": self.time}

    def defaults(self) -> list[str]:
        """`moeplat slurm` flags: the bridge's partition/account/qos/time where the spec's
        parallel.slurm does not set them."""
        return [f"--{k}={v}" for k, v in self.named().items() if v]


@dataclass
class _Flight:
    """One moeplat job running as a SLURM job."""

    job_id: int
    lease: dict
    slurm_id: str
    log_path: Path
    heartbeat_s: float
    submitted_at: float  # when it was submitted, or last requeued
    offset: int = 0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    state: str = "PENDING"
    reason: str = ""
    started: bool = False
    since: str = "sbatch"
    next_beat: float = 0.0
    cancel_at: float | None = None
    scancelled: bool = False
    last_error: str | None = None  # the run's last `error:` line
    verdict: str | None = None  # the bridge's own reason to end the job (pending for ever)
    pending_text: str = ""  # output the server did not take yet
    partial: str = ""  # the output's last line, until it is whole
    array: str | None = None  # the job array's id when this is one of its tasks (slurm_id JOBID_I)
    full_signal: bool = False  # a script without srun steps: a signal must reach its batch step
    detail: str = ""  # SLURM's state and reason, or its node, as the heartbeat reports it
    requeued: str | None = None  # after a requeue, until it runs again: "" or the state that did it

    @property
    def submission(self) -> str:
        """What was sbatch-ed: the array (one submission for its tasks) or the job."""
        return self.array or self.slurm_id


@dataclass
class SlurmBridge(Worker):
    """A worker whose jobs run as SLURM batch jobs (see the module docstring)."""

    options: SlurmOptions = SlurmOptions()
    max_jobs: int = 16
    slurm: Slurm = field(default_factory=Slurm)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.flights: dict[int, _Flight] = {}

    def check(self) -> list[str]:
        """Refuse to start when SLURM cannot take jobs (SlurmUnavailable says what to fix)."""
        return self.slurm.check(self.options.partition)

    # --- the loop -----------------------------------------------------------------------------

    def serve(self, once: bool = False, stop: threading.Event | None = None) -> int:
        """Claim jobs while fewer than `max_jobs` are in flight and follow them, until `stop` is
        set (or, with `once`, until the queue is empty and every job has ended). On stop, the
        SLURM jobs still in flight are cancelled: like a local worker's runs, they end with it
        (the server requeues their moeplat jobs after the heartbeat timeout)."""
        stop = stop or threading.Event()
        done, empty = 0, False
        try:
            while not stop.is_set():
                empty = False
                while self._submissions() < self.max_jobs and not stop.is_set():
                    claimed = self._claim_job()
                    if claimed is None:
                        empty = True
                        break
                    self._submit(claimed)
                    done += len(claimed.get("group_claimed") or [claimed])  # moeplat jobs
                if once and empty and not self.flights:
                    break
                self._poll()
                stop.wait(self.poll_s)
        finally:
            for slurm_id in dict.fromkeys(f.submission for f in self.flights.values()):
                log.warning("bridge stopping: cancelling SLURM job %s", slurm_id)
                self.slurm.cancel(slurm_id)
        return done

    def _submissions(self) -> int:
        """SLURM jobs in flight: a job array counts once, whatever its tasks."""
        return len({f.submission for f in self.flights.values()})

    def _claim_job(self) -> dict | None:
        try:
            # a job of a sweep group comes with the group's other queued jobs: one job array
            claimed = self.client.post("/api/worker/claim", {"worker": self.name, "array_executor": "slurm"})
        except httpx.HTTPStatusError as e:
            code = e.response.status_code
            if code in (401, 403, 404, 405):  # a wrong token, or not a moeplat server
                raise WorkerError(f"the server refused the claim: {code} {e.response.text[:200]}") from None
            log.warning("cannot claim: %s", e)
            return None
        except httpx.TransportError as e:
            log.warning("cannot claim: %s", e)
            return None
        return claimed if claimed["job"] is not None else None

    # --- submitting ---------------------------------------------------------------------------

    def _submit(self, c: dict) -> None:
        if c.get("group_claimed"):
            self._submit_array(c)
            return
        job_id, attempt, lease, job_dir, spec_file = self.job_files(c)
        log_path = job_dir / "slurm.log"
        log.info("job %d (attempt %d): %s -> sbatch", job_id, attempt, c["job"]["name"])
        try:
            script = self._script(c, spec_file, job_dir)
            options = [f"--output={log_path}", "--open-mode=append", *self.options.sbatch()]
            if c["job"]["kind"] == "run":  # its script traps the warning signal and requeues
                options += ["--requeue", f"--signal=B:USR1@{self.options.signal_s}"]
            options += self._after_earlier_attempts(job_id, attempt, lease)
            slurm_id = self.slurm.submit(script, options, self._env(job_id), str(self.work_dir))
        except (SubmitError, SlurmUnavailable) as e:
            self._fail_now(job_id, lease, str(e))
            return
        (job_dir / "slurm_job_id").write_text(slurm_id)
        self._note(job_id, lease, f"submitted to SLURM as job {slurm_id}; its output: {log_path}")
        self.flights[job_id] = _Flight(
            job_id,
            lease,
            slurm_id,
            log_path,
            float(c["heartbeat_s"]),
            time.monotonic(),
            full_signal=c["job"]["kind"] != "run",
            detail=f"SLURM job {slurm_id} submitted",
        )

    def _submit_array(self, c: dict) -> None:
        """The group's jobs claimed together, as one `sbatch --array` (moeplat.server.slurm_array):
        task I is the job of group index I, followed, heartbeated and finished as that job."""
        claimed, group = c["group_claimed"], c["job"]["group"]
        leases = {j["job"]["id"]: {"worker": self.name, "attempt": j["attempt"]} for j in claimed}
        tasks = [
            Task(
                j["job"]["group_index"],
                j["job"]["id"],
                j["attempt"],
                sweep_worker_index(j["job"], j["attempt"], c["group_size"]),
            )
            for j in claimed
        ]
        first = tasks[0]
        array_dir = self.work_dir / "jobs" / f"group-{group}-{first.job_id}-{first.attempt}"
        array_dir.mkdir(parents=True, exist_ok=True)
        spec_file = array_dir / Path(c["filename"]).name
        spec_file.write_text(c["text"], encoding="utf-8")
        spec = array_spec([t.index for t in tasks])
        log.info("sweep group %d: jobs %s -> sbatch --array=%s", group, [t.job_id for t in tasks], spec)
        try:
            root = Path(self.spec_root or c["spec_root"])
            base = self.sweep_worker_base(c, spec_file, root)
            sbatch_lines = self._sweep_sbatch(c, spec_file, root)
            script = array_script(f"moeplat-g{group}", base, tasks, sbatch_lines, self.work_dir)
            (array_dir / "array.sbatch").write_text(script)
            earlier = [
                o for t in tasks for o in self._earlier_attempts(t.job_id, t.attempt, leases[t.job_id])
            ]
            options = [f"--array={spec}", f"--output={array_dir / OUTPUT}", "--open-mode=append"]
            options += [
                *self.options.sbatch(),
                *([f"--dependency=afterany:{':'.join(earlier)}"] if earlier else []),
            ]
            array_id = self.slurm.submit(script, options, self._env(None), str(self.work_dir))
        except (SubmitError, SlurmUnavailable) as e:
            for t in tasks:
                self._fail_now(t.job_id, leases[t.job_id], str(e))
            return
        for t in tasks:
            slurm_id, out = task_id(array_id, t.index), log_path(array_dir, array_id, t.index)
            job_dir = self.work_dir / "jobs" / f"{t.job_id}-{t.attempt}"
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / "slurm_job_id").write_text(slurm_id)
            what = (
                f"array task {slurm_id} of job array {array_id} (sbatch --array={spec}, sweep group {group})"
            )
            self._note(t.job_id, leases[t.job_id], f"submitted to SLURM as {what}; its output: {out}")
            self.flights[t.job_id] = _Flight(
                t.job_id,
                leases[t.job_id],
                slurm_id,
                out,
                float(c["heartbeat_s"]),
                time.monotonic(),
                array=array_id,
                full_signal=True,
                detail=f"SLURM array task {slurm_id} submitted",
            )

    def _after_earlier_attempts(self, job_id: int, attempt: int, lease: dict) -> list[str]:
        """A job claimed again after its bridge died (same work directory): an earlier attempt's
        SLURM job may still be in SLURM, writing the same run directory. It is cancelled, and the
        new one waits for it to be gone (--dependency=afterany) before it resumes the run."""
        active = self._earlier_attempts(job_id, attempt, lease)
        return [f"--dependency=afterany:{':'.join(active)}"] if active else []

    def _earlier_attempts(self, job_id: int, attempt: int, lease: dict) -> list[str]:
        """The SLURM jobs (or array tasks) of the job's earlier attempts still in SLURM, cancelled."""
        earlier = []
        for a in range(1, attempt):
            f = self.work_dir / "jobs" / f"{job_id}-{a}" / "slurm_job_id"
            if f.is_file():
                earlier.append(f.read_text().strip())
        if not earlier:
            return []
        active = self.slurm.active(earlier) or {}
        for old in active:
            self._note(job_id, lease, f"SLURM job {old} of an earlier attempt was still in SLURM: cancelled")
            self.slurm.cancel(old)
        return list(active)

    def _script(self, c: dict, spec_file: Path, job_dir: Path) -> str:
        """The batch script: `moeplat slurm`'s for a run, one task running the job's command for a
        sweep (with its base spec's devices and parallel.slurm) or a routing report. SubmitError
        with the spec's problems when it cannot render."""
        job = c["job"]
        root = Path(self.spec_root or c["spec_root"])
        if job["kind"] != "run":
            if job["kind"] in ("sweep", "sweep-worker"):  # the devices and parallel.slurm its trials need
                lines = self._sweep_sbatch(c, spec_file, root)
            else:  # a routing report reads a finished run
                lines = [f"--cpus-per-task={self.options.cpus_per_task}", *self.options.defaults()]
            return _one_task_script(f"moeplat-{job['id']}", self.command(c, spec_file), lines, self.work_dir)
        runs = self.work_dir / "runs" / f"job-{job['id']}"
        out = job_dir / "job.sbatch"
        cmd = [self.python, "-m", "moeplat.cli.main", "slurm", str(spec_file)]
        cmd += ["--as-path", str(root / c["filename"]), "--tracking-uri", c["tracking_uri"]]
        cmd += ["--runs-dir", str(runs), "--run-dir", str(runs / "run"), "-o", str(out)]
        cmd += ["--cpus-per-task", str(self.options.cpus_per_task), *self.options.defaults()]
        cmd += [f"--set={o}" for o in c["overrides"]]
        done = subprocess.run(
            cmd, cwd=self.work_dir, capture_output=True, text=True, errors="replace", timeout=300
        )
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            raise SubmitError(f"`moeplat slurm` could not render the job's batch script: {text[-3000:]}")
        return out.read_text()

    def _sweep_sbatch(self, c: dict, spec_file: Path, root: Path) -> list[str]:
        """A sweep worker's #SBATCH options, from its base spec (moeplat.server.slurm_array)."""
        return sweep_sbatch(spec_file, root / c["filename"], self.options.cpus_per_task, self.options.named())

    def _env(self, job_id: int | None) -> dict[str, str]:
        """The job's environment (sbatch exports it): the bridge's, without the SLURM variables of
        a job the bridge itself may run in, and with the moeplat job id (an MLflow tag; a job
        array's script sets each task's)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        if "SLURM_CONF" in os.environ:
            env["SLURM_CONF"] = os.environ["SLURM_CONF"]
        env.pop("MOEPLAT_JOB_ID", None)
        return {
            **env,
            **({"MOEPLAT_JOB_ID": str(job_id)} if job_id is not None else {}),
            "PYTHONUNBUFFERED": "1",
        }

    def _fail_now(self, job_id: int, lease: dict, error: str) -> None:
        log.warning("job %d: %s", job_id, error)
        try:
            self._note(job_id, lease, error)
            self._finish(job_id, {**lease, "exit_code": 1, "error": error[:5000]})
        except Lost:
            pass

    def _note(self, job_id: int, lease: dict, text: str) -> None:
        """A `[moeplat: ...]` line in the job's log (what the CLI and the web UI show)."""
        try:
            self.client.post(f"/api/worker/jobs/{job_id}/log", {**lease, "text": f"[moeplat: {text}]\n"})
        except (httpx.HTTPError, Lost) as e:  # a lost job is stopped at its next heartbeat
            log.warning("job %d: the server did not take a note: %s", job_id, e)

    # --- following ----------------------------------------------------------------------------

    def _poll(self) -> None:
        """One round over the jobs in flight. The server or SLURM being away for a while (a
        restart, slurmctld busy) is waited out: the job goes on, the next round tries again."""
        if not self.flights:
            return
        try:
            active = self.slurm.active([f.slurm_id for f in self.flights.values()])
        except SlurmUnavailable as e:
            log.warning("squeue: %s", e)
            active = None
        for f in list(self.flights.values()):
            try:
                self._follow(f, active)
            except Lost as e:
                log.warning("job %d is no longer ours (%s): scancel %s", f.job_id, e, f.slurm_id)
                self.slurm.cancel(f.slurm_id)
                self.flights.pop(f.job_id, None)
            except (httpx.HTTPError, SlurmUnavailable) as e:
                log.warning("job %d: %s; trying again", f.job_id, e)

    def _follow(self, f: _Flight, active: dict[str, SlurmJob] | None) -> None:
        self._forward(f)
        if active is None:  # squeue failed: nothing known this round; keep the lease
            self._heartbeat(f)
            return
        now = active.get(f.slurm_id)
        if now is None:  # SLURM lists it no more: it ended
            self._end(f, self.slurm.ended(f.slurm_id))
            return
        self._transition(f, now)
        if f.job_id in self.flights:
            self._heartbeat(f)

    def _transition(self, f: _Flight, now: SlurmJob) -> None:
        state = job_state(now.state, listed=True)
        if (now.state, now.reason) != (f.state, f.reason):
            if state == "running" and not f.started:
                waited = time.monotonic() - f.submitted_at
                self._note(
                    f.job_id, f.lease, f"SLURM job {f.slurm_id} RUNNING ({waited:.1f}s after {f.since})"
                )
                f.started = True
            elif state == "queued" and f.started and f.state not in QUEUED:
                why = f"{now.state}, {now.reason}" if now.reason not in ("", "None") else now.state
                self._note(
                    f.job_id,
                    f.lease,
                    f"SLURM job {f.slurm_id} requeued ({why}): pending again; it resumes from its last checkpoint",
                )
                f.started, f.since = False, "the requeue"
                f.submitted_at = time.monotonic()
                # what requeued it, when SLURM's state says (PREEMPTED); not the plain waiting states
                f.requeued = now.state if now.state not in QUEUED else ""
            elif state == "queued":
                self._note(
                    f.job_id, f.lease, f"SLURM job {f.slurm_id} {now.state} (reason: {now.reason or 'none'})"
                )
            f.state, f.reason = now.state, now.reason
        if state == "running":
            f.requeued = None
        if (text := detail(now, f.requeued)) != f.detail:
            f.detail, f.next_beat = text, 0.0  # the server hears of it at once
        if state == "queued" and now.reason in NEVER_STARTS and not f.scancelled:
            self.slurm.cancel(f.slurm_id)
            f.scancelled = True
            f.verdict = (
                f"SLURM PENDING with reason {now.reason}, which it cannot leave: the job was cancelled "
                "(check --partition/--account/--qos/--time against the cluster's limits)"
            )

    def _heartbeat(self, f: _Flight) -> None:
        if time.monotonic() >= f.next_beat:
            # with SLURM's state and reason: the job's `detail`, shown by `moeplat jobs` and the web UI
            beat = self.client.post(
                f"/api/worker/jobs/{f.job_id}/heartbeat", {**f.lease, "detail": f.detail or None}
            )
            f.next_beat = time.monotonic() + f.heartbeat_s
            if beat["cancel"] and f.cancel_at is None:
                # a cancelled sweep group is one `scancel JOBID` of its array; one job of it, its task
                whole = f.array is not None and beat.get("group_cancel", False)
                targets = [g for g in self.flights.values() if g.array == f.array] if whole else [f]
                slurm_id = f.array if whole else f.slurm_id
                assert slurm_id is not None
                running = any(job_state(g.state, listed=True) == "running" for g in targets)
                for g in targets:
                    g.cancel_at, g.scancelled = time.monotonic(), not running
                if whole:
                    for g in targets:
                        self._note(
                            g.job_id, g.lease, f"sweep group cancelled: scancel {slurm_id} (the whole array)"
                        )
                if running:  # the run (a sweep worker: its trial) closes its MLflow run
                    self.slurm.cancel(slurm_id, signal="INT", full=f.full_signal)
                else:
                    self.slurm.cancel(slurm_id)
        if f.cancel_at is not None and not f.scancelled and time.monotonic() - f.cancel_at > self.grace_s:
            self.slurm.cancel(f.slurm_id)
            f.scancelled = True

    def _forward(self, f: _Flight, final: bool = False) -> None:
        """New output of the job (its file) to the job's log, in whole lines of whole UTF-8
        characters, so a `[moeplat: ...]` note never lands inside a line; at the end, the rest."""
        try:
            with open(f.log_path, "rb") as fh:
                fh.seek(f.offset)
                data = fh.read(4 * LOG_CHUNK_CHARS)
        except FileNotFoundError:  # not started yet
            data = b""
        f.offset += len(data)
        f.partial += f.decoder.decode(data, final=final)
        whole = final or len(f.partial) > LOG_CHUNK_CHARS  # (a line that long goes as it is)
        cut = len(f.partial) if whole else f.partial.rfind("\n") + 1
        lines, f.partial = f.partial[:cut], f.partial[cut:]
        for line in lines.splitlines():
            if line.startswith("error:"):  # the CLI's error line, as the local worker keeps it
                f.last_error = line.rstrip()[:2000]
        text = f.pending_text + lines
        while text:
            chunk = text[:LOG_CHUNK_CHARS]
            try:
                self.client.post(f"/api/worker/jobs/{f.job_id}/log", {**f.lease, "text": chunk})
            except httpx.HTTPError as e:  # the server is away: keep it for the next round
                log.warning("job %d: the server did not take the log: %s", f.job_id, e)
                break
            text = text[len(chunk) :]
        f.pending_text = text

    def _end(self, f: _Flight, ended: SlurmJob | None) -> None:
        time.sleep(min(1.0, self.poll_s))  # the last lines may reach the file just after the end
        self._forward(f, final=True)
        if ended is None:
            error = (
                f"SLURM job {f.slurm_id} ended but SLURM no longer knows its state "
                "(not in squeue, sacct unavailable or silent, gone from `scontrol show job`)"
            )
            code = 1
        else:
            error = ended.error()
            code = 0 if error is None else (ended.exit_code or 1)
        if f.verdict:
            error, code = f.verdict, code or 1
        elif f.last_error and error:
            error = f"{error}; the run said: {f.last_error}"
        if f.cancel_at is not None and error:
            error = f"cancelled: {error}"
        state = ended.state if ended else "UNKNOWN"
        self._note(f.job_id, f.lease, f"SLURM job {f.slurm_id} {state}")
        self.flights.pop(f.job_id, None)
        self._finish(f.job_id, {**f.lease, "exit_code": code, "error": error[:5000] if error else None})


def _one_task_script(name: str, command: list[str], sbatch_lines: list[str], workdir: Path) -> str:
    import shlex

    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by the moeplat SLURM bridge: one task running the job's command",
            f"#SBATCH --job-name={name}",
            "#SBATCH --ntasks=1",
            *(f"#SBATCH {o}" for o in sbatch_lines),
            "set -euo pipefail",
            f"cd {shlex.quote(str(workdir))}",
            "exec " + " ".join(shlex.quote(c) for c in command),
            "",
        ]
    )
