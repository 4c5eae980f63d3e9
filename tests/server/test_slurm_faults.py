"""The SLURM bridge's reaction to SLURM misbehaving, with a scripted stand-in for SLURM's
commands (the real cluster is in test_slurm_bridge.py): squeue failing for a while is waited out
with the job still leased; squeue losing track of a job whose end nobody knows fails it with that
said; the job's output file reaches the job log, UTF-8 split across reads included; each
heartbeat carries SLURM's current state and reason (the job's `detail`): pending, running,
requeued."""

from __future__ import annotations

import httpx
from server_helpers import live_server, settings_for, spec_root  # noqa: F401

from moeplat.server.slurm import Slurm, SlurmJob, SlurmUnavailable
from moeplat.server.slurm_worker import SlurmBridge, SlurmOptions

CPU = ["parallel.accelerator=cpu"]


class ScriptedSlurm(Slurm):
    """sbatch accepts; squeue answers from `rounds` (an exception is raised), then nothing."""

    def __init__(self, rounds, ended=None):
        super().__init__()
        self.rounds, self.end, self.cancelled = list(rounds), ended, []

    def submit(self, script, options, env, cwd):
        self.script, self.options = script, options
        return "77"

    def active(self, job_ids):
        if not job_ids:
            return {}
        now = self.rounds.pop(0) if self.rounds else {}
        if isinstance(now, Exception):
            raise now
        return now

    def ended(self, job_id):
        return self.end

    def cancel(self, job_id, signal=None, full=False):
        self.cancelled.append((job_id, signal))


def _serve(url, tmp_path, slurm) -> dict:
    bridge = SlurmBridge(
        url,
        name="b",
        work_dir=tmp_path / "b",
        poll_s=0.05,
        options=SlurmOptions(cpus_per_task=1),
        slurm=slurm,
    )
    assert bridge.serve(once=True) == 1
    return bridge


def test_squeue_failing_for_a_while_is_waited_out(tmp_path, spec_root):  # noqa: F811
    """squeue: running, an exception, a failure (None), running, then gone -> COMPLETED. The run's
    output comes in two pieces with an é cut between them."""
    running = {"77": SlurmJob("77", "RUNNING")}
    rounds = [running, SlurmUnavailable("squeue did not answer in 60s"), None, running]
    slurm = ScriptedSlurm(rounds, SlurmJob("77", "COMPLETED", "None", 0, 0))
    pieces, active = [b"caf\xc3", b"\xa9 ok\n"], slurm.active

    def active_and_output(job_ids):
        out = next(o.split("=", 1)[1] for o in slurm.options if o.startswith("--output="))
        if pieces:
            with open(out, "ab") as f:
                f.write(pieces.pop(0))
        return active(job_ids)

    slurm.active = active_and_output
    with live_server(settings_for(tmp_path)) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": CPU}).json()
        _serve(url, tmp_path, slurm)
        done = httpx.get(f"{url}/api/jobs/{job['id']}").json()
        log = httpx.get(f"{url}/api/jobs/{job['id']}/log").json()["text"]
    assert done["state"] == "succeeded", log
    assert "café ok" in log and "RUNNING" in log and "SLURM job 77 COMPLETED" in log


def test_a_job_slurm_forgot_fails_saying_so(tmp_path, spec_root):  # noqa: F811
    slurm = ScriptedSlurm([{"77": SlurmJob("77", "RUNNING")}], ended=None)
    with live_server(settings_for(tmp_path)) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": CPU}).json()
        _serve(url, tmp_path, slurm)
        done = httpx.get(f"{url}/api/jobs/{job['id']}").json()
    assert done["state"] == "failed"
    assert done["error"].startswith("SLURM job 77 ended but SLURM no longer knows its state")


def test_the_sbatch_options_of_a_run(tmp_path, spec_root):  # noqa: F811
    slurm = ScriptedSlurm([], ended=SlurmJob("77", "COMPLETED", exit_code=0))
    with live_server(settings_for(tmp_path)) as url:
        httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": CPU})
        bridge = SlurmBridge(
            url,
            name="b",
            work_dir=tmp_path / "b",
            poll_s=0.05,
            options=SlurmOptions(partition="gpu", account="proj", qos="high", time="04:00:00", signal_s=120),
            slurm=slurm,
        )
        bridge.serve(once=True)
    opts, lines = slurm.options, slurm.script.splitlines()
    assert "--open-mode=append" in opts and "--requeue" in opts and "--signal=B:USR1@120" in opts
    # the bridge's defaults go into the script, where the spec's parallel.slurm would win over them
    for want in ("--partition=gpu", "--account=proj", "--qos=high", "--time=04:00:00"):
        assert f"#SBATCH {want}" in lines
    assert (tmp_path / "b" / "jobs" / "1-1" / "slurm_job_id").read_text() == "77"


def test_the_heartbeat_says_what_slurm_does_with_the_job(tmp_path, spec_root):  # noqa: F811
    """Pending (and why), running (and where), preempted and requeued, pending again until its
    BeginTime, running again: the job's `detail` on the server follows each round; squeue failing
    for a round leaves it as it was."""
    rounds = [
        {"77": SlurmJob("77", "PENDING", "Priority")},
        {"77": SlurmJob("77", "PENDING", "Resources")},
        {"77": SlurmJob("77", "RUNNING", "None", nodes="node1")},
        None,  # squeue failed: nothing known, the detail stays
        {"77": SlurmJob("77", "PREEMPTED", "None")},
        {"77": SlurmJob("77", "PENDING", "BeginTime")},
        {"77": SlurmJob("77", "RUNNING", "None", nodes="node[1-2]")},
    ]
    slurm = ScriptedSlurm(rounds, SlurmJob("77", "COMPLETED", "None", 0, 0))
    seen, active = [], slurm.active

    def active_and_detail(job_ids):  # what the server holds after the bridge's previous round
        seen.append(httpx.get(f"{url}/api/jobs/1").json()["detail"])
        return active(job_ids)

    slurm.active = active_and_detail
    with live_server(settings_for(tmp_path)) as url:
        httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": CPU})
        _serve(url, tmp_path, slurm)
        done = httpx.get(f"{url}/api/jobs/1").json()
    assert seen == [
        None,  # submitted; no heartbeat yet
        "SLURM PENDING (Priority)",
        "SLURM PENDING (Resources)",
        "SLURM RUNNING on node node1",
        "SLURM RUNNING on node node1",
        "SLURM requeued (PREEMPTED)",
        "SLURM requeued (PREEMPTED), pending (BeginTime)",
        "SLURM RUNNING on nodes node[1-2]",  # the round that finds it gone
    ]
    assert done["state"] == "succeeded" and done["detail"] is None
