"""SLURM's command line for the SLURM bridge (moeplat.server.slurm_worker): sbatch, squeue,
sacct / scontrol, scancel, and what SLURM's job states mean for a moeplat job.

Only SLURM's client commands are used (no pyslurm, no REST daemon): they are on every login node,
they read the cluster from $SLURM_CONF like any user's shell, and their output formats are stable.
A job is followed with `squeue` while SLURM lists it as active; once it is not, its final state
and exit code come from `sacct` (accounting, kept for ever) and, where the cluster has no
accounting database (sacct: "accounting storage is disabled"), from `scontrol show job`, which
slurmctld answers for MinJobAge seconds (300 by default) after the job ended.

States, SLURM -> moeplat:
  PENDING, CONFIGURING, REQUEUED, REQUEUE_HOLD, RESV_DEL_HOLD, SUSPENDED, RESIZING -> queued
      (waiting in SLURM; the moeplat job stays leased to the bridge, the reason goes to its log)
  PREEMPTED while SLURM still lists the job -> queued (requeued: it resumes from its checkpoint)
  RUNNING, COMPLETING, SIGNALING, STAGE_OUT -> running
  COMPLETED -> succeeded; CANCELLED -> cancelled
  FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, BOOT_FAIL, DEADLINE, PREEMPTED (not requeued),
  REVOKED, SPECIAL_EXIT -> failed, with "SLURM <STATE>: <what it means>" as the job's error
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger("moeplat.slurm")

QUEUED = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
    | {"SUSPENDED", "RESIZING"}
)
RUNNING = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"})
FINAL = {
    "COMPLETED": "succeeded",
    "CANCELLED": "cancelled",
    "FAILED": "failed",
    "TIMEOUT": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
    "PREEMPTED": "failed",
    "REVOKED": "failed",
    "SPECIAL_EXIT": "failed",
}
MEANING = {
    "FAILED": "the batch script exited with a non-zero code",
    "TIMEOUT": "the job reached its time limit (raise --time; it is submitted requeueable with a "
    "warning signal, so a run checkpoints first)",
    "NODE_FAIL": "a node of the job failed",
    "OUT_OF_MEMORY": "a process of the job ran out of memory (ask for more with --mem, or lower "
    "the batch size)",
    "BOOT_FAIL": "a node of the job failed to boot",
    "DEADLINE": "the job reached its deadline before it could finish",
    "PREEMPTED": "the job was preempted and not requeued",
    "REVOKED": "the job was revoked (a federated sibling ran it)",
    "SPECIAL_EXIT": "the job was held after a special exit",
    "CANCELLED": "the job was cancelled in SLURM",
}
# pending reasons SLURM gives jobs that can never start as submitted: fail the moeplat job with
# the reason instead of leaving it pending for ever (sbatch refuses most of these at once)
NEVER_STARTS = frozenset(
    {"BadConstraints", "InvalidAccount", "InvalidQOS", "PartitionNodeLimit", "PartitionTimeLimit"}
    | {"DependencyNeverSatisfied", "QOSMaxWallDurationPerJobLimit", "AssocMaxWallDurationPerJobLimit"}
)


class SlurmUnavailable(Exception):
    """The SLURM commands are missing or the cluster does not answer (munge, slurmctld)."""


class SubmitError(Exception):
    """sbatch refused the job (a partition that does not exist, a bad option): its message."""


@dataclass(frozen=True)
class SlurmJob:
    """What SLURM says of one job. `state` is the bare state (sacct's "CANCELLED by 0" -> CANCELLED);
    `exit_code`/`signal` from ExitCode "code:signal" when known; `restarts` from scontrol."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    restarts: int | None = None
    nodes: str = ""  # squeue's node list of a running job ("node1", "node[1-2]")

    @property
    def moeplat_state(self) -> str:
        return job_state(self.state, listed=self.state in QUEUED | RUNNING)

    def error(self) -> str | None:
        """The moeplat job's error text for a final state; None when it succeeded."""
        if self.state == "COMPLETED":
            return None
        parts = [MEANING.get(self.state, "")]
        if self.exit_code:
            parts.append(f"exit code {self.exit_code}")
        if self.signal:
            parts.append(f"signal {self.signal}")
        if self.reason and self.reason not in ("None", "(null)"):
            parts.append(f"reason {self.reason}")
        return f"SLURM {self.state}: " + "; ".join(p for p in parts if p)


def job_state(state: str, listed: bool) -> str:
    """The moeplat job state of a SLURM state; `listed`: SLURM still lists the job as active (a
    PREEMPTED job it still lists is being requeued)."""
    state = base_state(state)
    if state in QUEUED or (state == "PREEMPTED" and listed):
        return "queued"
    if state in RUNNING:
        return "running"
    return FINAL.get(state, "failed")


def base_state(state: str) -> str:
    """sacct writes "CANCELLED by 1234"; squeue and scontrol may add a "+" (e.g. RUNNING+)."""
    return state.strip().split(" ")[0].rstrip("+").upper()


def parse_sbatch(stdout: str) -> str:
    """`sbatch --parsable` prints "JOBID" or "JOBID;CLUSTER"."""
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = line.split(";")[0].strip()
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {stdout.strip()[:300]!r}")
    return job_id


SQUEUE_FORMAT = "%i|%T|%r|%N"


def parse_squeue(text: str) -> dict[str, SlurmJob]:
    """`squeue -h -o '%i|%T|%r|%N'` lines: job id, state, reason, node list (empty while pending)."""
    jobs = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            reason = parts[2] if len(parts) > 2 else ""
            nodes = parts[3].strip() if len(parts) > 3 else ""
            jobs[parts[0]] = SlurmJob(parts[0], base_state(parts[1]), reason, nodes=nodes)
    return jobs


def said(reason: str) -> bool:
    """Whether SLURM gave a reason ("None" and "(null)" are none)."""
    return reason.strip() not in ("", "None", "(null)")


def detail(job: SlurmJob, requeued: str | None = None) -> str:
    """One line for the moeplat job's `detail` (its heartbeat): SLURM's state and why, or where it
    runs. `requeued`: the job was requeued after it ran ("" or the state that did it, PREEMPTED)."""
    state = base_state(job.state)
    if job_state(state, listed=True) == "running" and job.nodes:
        where = "nodes" if any(c in job.nodes for c in ",[") else "node"
        return f"SLURM {state} on {where} {job.nodes}"[:500]
    why = f" ({job.reason})" if said(job.reason) else ""
    if requeued is not None:
        by = f" ({requeued})" if requeued else ""
        now = f", {state.lower()}{why}" if state != requeued or why else ""  # not "(PREEMPTED), preempted"
        return f"SLURM requeued{by}{now}"[:500]
    return f"SLURM {state}{why}"[:500]


SACCT_FIELDS = "JobID,State,ExitCode,Reason"


def _exit(code_signal: str) -> tuple[int | None, int | None]:
    code, _, sig = code_signal.partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return None, None


def parse_sacct(text: str) -> dict[str, SlurmJob]:
    """`sacct -n -P -X -o JobID,State,ExitCode,Reason` lines (the allocation only, -X; a requeued
    job has a line per start: the last one is its current state)."""
    jobs = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        code, sig = _exit(parts[2])
        job_id = parts[0].split(".")[0]
        reason = parts[3] if len(parts) > 3 else ""
        jobs[job_id] = SlurmJob(job_id, base_state(parts[1]), reason, code, sig)
    return jobs


def parse_scontrol(text: str) -> SlurmJob | None:
    """`scontrol show job -o JOBID`: one line of Key=Value pairs."""
    fields = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    if "JobId" not in fields or "JobState" not in fields:
        return None
    code, sig = _exit(fields.get("ExitCode", ""))
    restarts = fields.get("Restarts", "")
    return SlurmJob(
        fields["JobId"],
        base_state(fields["JobState"]),
        fields.get("Reason", ""),
        code,
        sig,
        int(restarts) if restarts.isdigit() else None,
    )


@dataclass
class Slurm:
    """The SLURM client commands, with the environment they run in ($SLURM_CONF)."""

    env: dict[str, str] | None = None
    timeout_s: float = 60.0
    sacct_ok: bool | None = None  # None: not tried yet; False: fall back to scontrol

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                list(cmd),
                env=self.env,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout_s,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise SlurmUnavailable(f"`{cmd[0]}` not found on PATH: {_INSTALL}") from None
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd[:2])}` did not answer in {self.timeout_s:g}s") from None

    def check(self, partition: str | None = None) -> list[str]:
        """The cluster's partitions; SlurmUnavailable with what to fix when it cannot be used."""
        missing = [c for c in ("sbatch", "squeue", "scontrol", "scancel", "sinfo") if not shutil.which(c)]
        if missing:
            raise SlurmUnavailable(f"{', '.join(missing)} not found on PATH: {_INSTALL}")
        out = self._run("sinfo", "-h", "-o", "%P")
        if out.returncode != 0:
            raise SlurmUnavailable(_unreachable(out.stderr or out.stdout, self.env))
        partitions = [p.rstrip("*") for p in out.stdout.split()]
        if partition and partition not in partitions:
            raise SlurmUnavailable(
                f"--partition {partition}: no such partition (this cluster has {', '.join(partitions)})"
            )
        return partitions

    def submit(self, script: str, options: list[str], env: dict[str, str], cwd: str) -> str:
        """sbatch the script (text) with command-line options (they win over its #SBATCH lines)."""
        try:
            out = subprocess.run(
                ["sbatch", "--parsable", *options],
                input=script,
                env=env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
            )
        except FileNotFoundError:
            raise SlurmUnavailable(f"`sbatch` not found on PATH: {_INSTALL}") from None
        except subprocess.TimeoutExpired:
            raise SubmitError(f"sbatch did not answer in {self.timeout_s:g}s") from None
        if out.returncode != 0:
            lines = [ln.removeprefix("sbatch: error: ").strip() for ln in out.stderr.splitlines()]
            msg = "sbatch refused the job: " + "; ".join(ln for ln in lines if ln)[:2000]
            if "gres" in msg.lower():
                msg += (
                    " (the script asks for GPUs because the spec's parallel.accelerator is auto or gpu: "
                    "on a partition without GPUs set parallel.accelerator: cpu)"
                )
            raise SubmitError(msg)
        return parse_sbatch(out.stdout)

    def active(self, job_ids: list[str]) -> dict[str, SlurmJob] | None:
        """The jobs of `job_ids` SLURM lists as active (pending, running, completing); None when
        squeue failed (then nothing can be concluded from a job's absence)."""
        if not job_ids:
            return {}
        # -r: a job array's tasks one per line, pending ones too (else "123_[0-1]" in one line)
        out = self._run("squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", SQUEUE_FORMAT)
        if out.returncode != 0:
            if "Invalid job id" in out.stderr:  # every one of them has left slurmctld's memory
                return {}
            log.warning("squeue failed: %s", out.stderr.strip()[:300])
            return None
        return {k: v for k, v in parse_squeue(out.stdout).items() if k in job_ids}

    def ended(self, job_id: str) -> SlurmJob | None:
        """The final state of a job squeue no longer lists: sacct, else scontrol show job."""
        if self.sacct_ok is not False:
            out = self._run("sacct", "-n", "-P", "-X", "-j", job_id, "-o", SACCT_FIELDS)
            if out.returncode == 0:
                self.sacct_ok = True
                job = parse_sacct(out.stdout).get(job_id)
                if job is not None:
                    return job
            elif self.sacct_ok is None:
                self.sacct_ok = False
                log.warning(
                    "sacct is not available (%s): finished jobs are read with `scontrol show job`, "
                    "which knows them for MinJobAge seconds after they end",
                    out.stderr.strip()[:200],
                )
        out = self._run("scontrol", "show", "job", "-o", job_id)
        return parse_scontrol(out.stdout) if out.returncode == 0 else None

    def show(self, job_id: str) -> SlurmJob | None:
        out = self._run("scontrol", "show", "job", "-o", job_id)
        return parse_scontrol(out.stdout) if out.returncode == 0 else None

    def cancel(self, job_id: str, signal: str | None = None, full: bool = False) -> None:
        """scancel the job (JOBID, an array task JOBID_I, or a whole array JOBID), or with `signal`
        only signal its steps (the run's processes); `full`: the batch script's processes too
        (a script without srun steps, which execs its command)."""
        sig = [f"--signal={signal}", *(["--full"] if full else [])] if signal else []
        cmd = ["scancel", *sig, job_id]
        try:
            out = self._run(*cmd)
        except SlurmUnavailable as e:  # the caller tries again (cancel) or SLURM ends it (time limit)
            log.warning("%s: %s", " ".join(cmd), e)
            return
        if out.returncode != 0:
            log.warning("%s: %s", " ".join(cmd), out.stderr.strip()[:300])


_INSTALL = "install SLURM's client commands (Debian: apt-get install slurm-client) or add them to PATH"


def _unreachable(stderr: str, env: dict[str, str] | None) -> str:
    text = stderr.strip()[:500]
    if "munge" in text.lower():
        return (
            f"SLURM does not answer: {text} -- munge is not running or its key differs from the "
            "cluster's: start munged (systemctl start munge) and check /etc/munge/munge.key"
        )
    conf = (env if env is not None else os.environ).get("SLURM_CONF", "/etc/slurm/slurm.conf")
    return f"SLURM does not answer: {text} -- is slurmctld up, and is {conf} this cluster's slurm.conf?"
