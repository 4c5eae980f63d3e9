"""The SLURM bridge (`moeplat worker --executor slurm`) against a real one-node SLURM cluster
(tests/slurm_cluster.py: munged, slurmctld, slurmd started by the test session) and a live job
server: a 2-process CPU run submitted with sbatch ends succeeded with one MLflow run; a cancel
reaches SLURM; a failing run fails the job with SLURM's state and the run's error; SLURM's warning
signal stops the run, the job requeues itself and resumes into the same MLflow run with every
metric step once; bad input (a partition that does not exist, munge down) is refused clearly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import httpx
import pytest
from mlflow import MlflowClient
from resume_checks import assert_exact_history, trained_through
from server_helpers import live_server, settings_for, spec_root, wait_for  # noqa: F401
from slurm_cluster import PARTITION, SHORT, slurm_cluster  # noqa: F401

from moeplat.cli.main import main
from moeplat.server.slurm import Slurm, SlurmUnavailable
from moeplat.server.slurm_worker import SlurmBridge, SlurmOptions

TWO_CPU = [
    "parallel.devices=2",
    "parallel.accelerator=cpu",
    "parallel.strategy.kind=ddp",
    "train.max_steps=6",
    "train.val_every=3",
    "data.val_tokens=256",
]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 ranks on 2 cores; sbatch exports it to the job


def _bridge(url, tmp_path, **kw) -> SlurmBridge:
    opts = {"partition": PARTITION, "cpus_per_task": 1, "signal_s": 60, **kw.pop("options", {})}
    return SlurmBridge(
        url, name="bridge", work_dir=tmp_path / "bridge", poll_s=0.3, options=SlurmOptions(**opts), **kw
    )


def _thread(bridge: SlurmBridge) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=bridge.serve, kwargs={"stop": stop}, daemon=True)
    thread.start()
    return thread, stop


def _job(url: str, job_id: int) -> dict:
    return httpx.get(f"{url}/api/jobs/{job_id}").json()


def _log(url: str, job_id: int) -> str:
    return httpx.get(f"{url}/api/jobs/{job_id}/log").json()["text"]


def _ended(url: str, job_id: int, timeout_s: float = 300) -> dict:
    return wait_for(
        lambda: (j := _job(url, job_id))["state"] not in ("queued", "running") and j,
        timeout_s,
        0.5,
        "the end",
    )


def _slurm_id(url: str, job_id: int) -> str:
    found = wait_for(lambda: re.search(r"as job (\d+)", _log(url, job_id)), 60, 0.2, "sbatch")
    return found.group(1)


def _runs(tracking_uri: str, job_id: int) -> list:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("tiny-tests")
    return client.search_runs([exp.experiment_id], f"tags.`moeplat.job_id` = '{job_id}'") if exp else []


@pytest.mark.slow
def test_a_two_process_run_through_sbatch(tmp_path, spec_root, slurm_cluster, capsys):  # noqa: F811
    s = settings_for(tmp_path)
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": TWO_CPU}).json()
        bridge = _bridge(url, tmp_path)
        assert bridge.serve(once=True) == 1
        done, log = _job(url, job["id"]), _log(url, job["id"])
    assert done["state"] == "succeeded" and done["exit_code"] == 0, log[-3000:]
    latency = float(re.search(r"RUNNING \(([\d.]+)s after sbatch\)", log).group(1))
    with capsys.disabled():
        print(f"\nSLURM submit -> running latency: {latency:.1f}s (one-node test cluster)")
    assert "run finished" in log  # rank 0's output reached the job's log through the tailed file
    (run,) = _runs(s.tracking_uri, job["id"])  # one MLflow run for the two ranks
    assert run.info.status == "FINISHED"
    assert run.data.tags["moeplat.devices"] == "2"
    steps = [m.step for m in MlflowClient(s.tracking_uri).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == sorted(set(steps)) and max(steps) == 5


@pytest.mark.slow
def test_cancel_reaches_slurm(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    s = settings_for(tmp_path)
    with live_server(s) as url:
        long = [*TWO_CPU, "train.max_steps=100000"]
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": long}).json()
        bridge = _bridge(url, tmp_path, grace_s=20)
        thread, stop = _thread(bridge)
        try:
            slurm_id = _slurm_id(url, job["id"])
            wait_for(lambda: "RUNNING" in _log(url, job["id"]) and _runs(s.tracking_uri, job["id"]), 180, 0.5)
            httpx.post(f"{url}/api/jobs/{job['id']}/cancel")
            done = _ended(url, job["id"], 120)
        finally:
            stop.set()
            thread.join(timeout=60)
        log = _log(url, job["id"])
    assert done["state"] == "cancelled", log[-3000:]
    squeue = subprocess.run(["squeue", "-h", "-j", slurm_id], capture_output=True, text=True)
    assert squeue.stdout.strip() == ""  # the SLURM job is gone
    (run,) = _runs(s.tracking_uri, job["id"])
    assert run.info.status == "KILLED"  # SIGINT reached the run: it closed its MLflow run


@pytest.mark.slow
def test_a_failing_run_fails_the_job_with_slurms_state(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    s = settings_for(tmp_path)
    with live_server(s) as url:
        # a learning rate that makes the loss infinite: the run stops with an error (FiniteLoss)
        bad = [*TWO_CPU, "train.optimizer.lr=1e30"]
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": bad}).json()
        assert _bridge(url, tmp_path).serve(once=True) == 1
        done, log = _job(url, job["id"]), _log(url, job["id"])
    assert done["state"] == "failed", log[-3000:]
    assert done["error"].startswith("SLURM FAILED: the batch script exited with a non-zero code")
    assert "the run said: error:" in done["error"], done["error"]


@pytest.mark.slow
def test_the_warning_signal_requeues_and_the_run_resumes(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the run
    stops resumable, the job requeues itself, the same SLURM job starts again and resumes the run
    from its last checkpoint into the same MLflow run; each metric step is logged once."""
    max_steps, val_every = 48, 16  # long enough that the signal, sent at step 3, finds it training
    sets = [
        *TWO_CPU,
        f"train.max_steps={max_steps}",
        f"train.val_every={val_every}",
        "train.checkpoint_every=1000",  # no periodic checkpoint: the one it resumes from is SIGUSR1's
        "train.log_every=1",
        "data.val_tokens=128",
    ]
    s = settings_for(tmp_path)
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": sets}).json()
        bridge = _bridge(url, tmp_path)
        thread, stop = _thread(bridge)
        try:
            slurm_id = _slurm_id(url, job["id"])
            run_dir = tmp_path / "bridge" / "runs" / f"job-{job['id']}" / "run"
            wait_for(lambda: trained_through(run_dir) >= 3, 240, 0.2, "step 3")
            subprocess.run(["scancel", "--batch", "--signal=USR1", slurm_id], check=True)
            done = _ended(url, job["id"], 400)
        finally:
            stop.set()
            thread.join(timeout=60)
        log = _log(url, job["id"])
    assert done["state"] == "succeeded" and done["attempts"] == 1, log[-4000:]
    assert "requeued" in log and "moeplat: resuming" in log, log[-4000:]
    resumed_at = int(re.search(r"resumed at step (\d+)", log).group(1))
    assert resumed_at >= 4, log[-3000:]  # the signal came after step 3: checkpointed at a later step
    (run,) = _runs(s.tracking_uri, job["id"])  # the requeued job continued the same MLflow run
    assert run.info.status == "FINISHED"
    client = MlflowClient(s.tracking_uri)
    assert_exact_history(client, run.info.run_id, max_steps, list(range(val_every - 1, max_steps, val_every)))


def test_a_partition_that_does_not_exist(tmp_path, spec_root, slurm_cluster, capsys):  # noqa: F811
    """At start: the bridge refuses, naming the flag. At submit (a bridge started before the
    partition went away, or given it with --sbatch): sbatch's error fails the job at once."""
    with live_server(settings_for(tmp_path)) as url:
        with pytest.raises(SlurmUnavailable, match="--partition nowhere: no such partition"):
            _bridge(url, tmp_path, options={"partition": "nowhere"}).check()
        args = ["worker", "--server", url, "--executor", "slurm", "--partition", "nowhere", "--once"]
        assert main(args) == 2
        assert "no such partition (this cluster has debug, short)" in capsys.readouterr().err
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": TWO_CPU}).json()
        bridge = _bridge(url, tmp_path, options={"extra": ("--partition=nowhere",)})
        t0 = time.monotonic()
        assert bridge.serve(once=True) == 1
        done = _job(url, job["id"])
    assert done["state"] == "failed" and "invalid partition" in done["error"].lower(), done
    assert time.monotonic() - t0 < 60  # failed at submit, not left pending


def test_the_specs_parallel_slurm_wins_over_the_bridges_defaults(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    """parallel.slurm.partition names a partition the cluster lacks; the bridge's own --partition
    is a good one: the spec's is used (and refused by sbatch)."""
    with live_server(settings_for(tmp_path)) as url:
        sets = [*TWO_CPU, "parallel.slurm.partition=nowhere"]
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": sets}).json()
        assert _bridge(url, tmp_path).serve(once=True) == 1  # --partition debug
        done = _job(url, job["id"])
    assert done["state"] == "failed" and "invalid partition" in done["error"].lower(), done


def test_a_job_slurm_would_keep_pending_for_ever_fails_with_the_reason(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    """--time beyond the partition's MaxTime: sbatch takes it (EnforcePartLimits=NO, SLURM's
    default) and SLURM keeps it PENDING with reason PartitionTimeLimit for ever. The bridge writes
    the reason into the job's log, cancels it and fails the job with it."""
    with live_server(settings_for(tmp_path)) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": TWO_CPU}).json()
        bridge = _bridge(url, tmp_path, options={"partition": SHORT, "time": "00:10:00"})
        assert bridge.serve(once=True) == 1
        done, log = _job(url, job["id"]), _log(url, job["id"])
    assert done["state"] == "failed", log
    assert "PENDING (reason: PartitionTimeLimit)" in log
    assert done["error"].startswith("SLURM PENDING with reason PartitionTimeLimit"), done["error"]


def test_a_gpu_spec_on_a_cluster_without_gpus(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    """parallel.accelerator auto renders --gpus-per-node: this cluster has no GPUs (no gres), so
    sbatch refuses, and the job's error says which spec key to change."""
    with live_server(settings_for(tmp_path)) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml"}).json()
        assert _bridge(url, tmp_path).serve(once=True) == 1
        done = _job(url, job["id"])
    assert done["state"] == "failed" and "set parallel.accelerator: cpu" in done["error"], done


def test_munge_down_refuses_to_start(tmp_path, slurm_cluster):  # noqa: F811
    """A slurm.conf whose munge socket has no munged behind it: what a login node with munge down
    sees. The bridge refuses to start and says munge."""
    conf = tmp_path / "slurm.conf"
    text = slurm_cluster.conf.read_text()
    conf.write_text(re.sub(r"AuthInfo=socket=\S+", f"AuthInfo=socket={tmp_path / 'no-munge.socket'}", text))
    slurm = Slurm(env={**slurm_cluster.env, "SLURM_CONF": str(conf)}, timeout_s=60)
    with pytest.raises(SlurmUnavailable, match="munge is not running"):
        slurm.check()


@pytest.mark.slow
def test_a_killed_bridges_job_is_taken_over_by_the_next_bridge(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    """kill -9 of a bridge while its SLURM job trains: the SLURM job trains on, the server requeues
    the moeplat job after the heartbeat timeout, and a bridge with the same work directory cancels
    the earlier SLURM job, submits the next one behind it (--dependency=afterany) and resumes the
    run from its checkpoint into the same MLflow run."""
    sets = [  # long enough that the first SLURM job still trains when the next bridge takes over
        *TWO_CPU,
        "train.max_steps=80",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.val_every=40",
    ]
    s = settings_for(tmp_path, heartbeat_timeout_s=3.0, reap_every_s=0.5)
    work = tmp_path / "bridge"
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "overrides": sets}).json()
        code = (
            "from moeplat.server.slurm_worker import SlurmBridge, SlurmOptions; "
            f"SlurmBridge({url!r}, name='doomed', work_dir={str(work)!r}, poll_s=0.3, "
            f"options=SlurmOptions(partition={PARTITION!r}, cpus_per_task=1)).serve()"
        )
        doomed = subprocess.Popen([sys.executable, "-c", code])
        try:
            first = _slurm_id(url, job["id"])
            run_dir = work / "runs" / f"job-{job['id']}" / "run"
            wait_for(lambda: trained_through(run_dir) >= 3, 240, 0.2, "step 3")
        finally:
            doomed.kill()
            doomed.wait()
        wait_for(lambda: _job(url, job["id"])["state"] == "queued", 60, 0.3, "the requeue")
        bridge = _bridge(url, tmp_path)
        assert bridge.serve(once=True) == 1
        done, log = _job(url, job["id"]), _log(url, job["id"])
    assert done["state"] == "succeeded" and done["attempts"] == 2, log[-4000:]
    assert f"SLURM job {first} of an earlier attempt was still in SLURM: cancelled" in log
    assert "resumed at step" in log, log[-3000:]
    (run,) = _runs(s.tracking_uri, job["id"])
    steps = [m.step for m in MlflowClient(s.tracking_uri).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(80))
