"""A `--parallel N` sweep through the SLURM bridge runs as ONE SLURM job array (`sbatch
--array=0-(N-1)`) on a real one-node cluster (tests/slurm_cluster.py): task I is the group's job of
index I (`JOBID_I`), each job follows its own task (state, log, end), the study ends with exactly
n_trials from both tasks, and cancelling the group is one `scancel JOBID` of the whole array.
Prints the submit -> RUNNING latency of the array's tasks and the sweep's wall time with
--parallel 1 and 2 under SLURM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import optuna
import pytest
import yaml
from mlflow import MlflowClient
from server_helpers import live_server, settings_for, spec_root, wait_for  # noqa: F401
from slurm_cluster import PARTITION, slurm_cluster  # noqa: F401

from moeplat.server.slurm import Slurm
from moeplat.server.slurm_worker import SlurmBridge, SlurmOptions
from moeplat.sweep.study import finished_count

State = optuna.trial.TrialState
QUICK = {"train.max_steps": 6, "train.val_every": 3, "data.val_tokens": 128}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # two sweep workers on a 2-core machine: one thread each (sbatch exports it to the tasks)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")


class RecordingSlurm(Slurm):
    """The real SLURM commands, remembering what the bridge asked of sbatch and scancel."""

    def __init__(self):
        super().__init__()
        self.submits: list[list[str]] = []
        self.cancels: list[tuple[str, str | None, bool]] = []

    def submit(self, script, options, env, cwd):
        self.submits.append(list(options))
        return super().submit(script, options, env, cwd)

    def cancel(self, job_id, signal=None, full=False):
        self.cancels.append((job_id, signal, full))
        super().cancel(job_id, signal, full)


def _sweep(
    root: Path, name: str, n_trials: int = 4, overrides: dict | None = None, heartbeat_s: int = 5
) -> str:
    body = {
        "name": name,
        "extends": "tiny.yaml",
        # the test cluster has no GPUs: a sweep of an `auto` spec would ask SLURM for one
        "overrides": {"parallel.accelerator": "cpu", **(overrides or QUICK)},
        "search": {"model.moe.top_k": {"kind": "int", "low": 1, "high": 3}},
        "sampler": {"kind": "random"},
        "pruner": {"kind": "median", "n_startup_trials": 1000},
        "trials": {"n_trials": n_trials, "heartbeat_s": heartbeat_s, "max_retries": 1},
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return f"{name}.yaml"


def _bridge(url: str, work: Path, slurm: Slurm, **kw) -> SlurmBridge:
    options = SlurmOptions(partition=PARTITION, cpus_per_task=1)
    return SlurmBridge(url, name="bridge", work_dir=work, poll_s=0.3, options=options, slurm=slurm, **kw)


def _log(url: str, job_id: int) -> str:
    return httpx.get(f"{url}/api/jobs/{job_id}/log").json()["text"]


def _group(url: str, group_id: int) -> dict:
    return httpx.get(f"{url}/api/groups/{group_id}").json()


def _array_of(url: str, job_id: int) -> tuple[str, int]:
    found = wait_for(lambda: re.search(r"as array task (\d+)_(\d+)", _log(url, job_id)), 60, 0.2, "sbatch")
    return found.group(1), int(found.group(2))


@pytest.mark.slow
def test_a_parallel_sweep_is_one_job_array_and_finishes_exactly_n_trials(
    tmp_path,
    spec_root,  # noqa: F811
    slurm_cluster,  # noqa: F811
    capsys,
):
    s = settings_for(tmp_path)
    walls, latencies = {}, []
    with live_server(s) as url:
        for n in (1, 2):
            path, slurm = _sweep(spec_root, f"arr{n}"), RecordingSlurm()
            start = time.monotonic()
            job = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": n}).json()
            assert _bridge(url, tmp_path / f"bridge{n}", slurm).serve(once=True) == n
            walls[n] = time.monotonic() - start
            g = _group(url, job["group"])
            logs = {j["id"]: _log(url, j["id"]) for j in g["jobs"]}
            assert g["state"] == "succeeded" and g["executor"] == "slurm", (g, logs)
            assert [j["state"] for j in g["jobs"]] == ["succeeded"] * n, logs
            (options,) = slurm.submits  # ONE sbatch for the group
            assert ("--array=0" if n == 1 else f"--array=0-{n - 1}") in options and any(
                o.endswith("slurm-%A_%a.log") for o in options
            )
            tasks = [_array_of(url, j["id"]) for j in g["jobs"]]
            assert len({a for a, _ in tasks}) == 1  # one array ...
            assert [i for _, i in tasks] == [j["group_index"] for j in g["jobs"]]  # ... task I = job I
            for log in logs.values():
                latencies += [float(x) for x in re.findall(r"RUNNING \(([\d.]+)s after sbatch\)", log)]
            study = optuna.load_study(study_name=f"arr{n}", storage=s.sweep_storage)
            trials = study.get_trials()
            assert finished_count(study) == 4 and g["progress"]["finished"] == 4, trials
            assert g["progress"]["complete"] == 4 and g["progress"]["running"] == 0
            indices = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in trials if "worker" in t.user_attrs}
            assert indices == {str(i) for i in range(n)}, trials  # trials from every array task
            client = MlflowClient(s.tracking_uri)
            exp = client.get_experiment_by_name("tiny-tests")
            runs = client.search_runs([exp.experiment_id], f"tags.`optuna.study` = 'arr{n}'")
            # each task exported its own job's id: the trials' runs carry the job that ran them
            assert {r.data.tags["moeplat.job_id"] for r in runs} == {str(j["id"]) for j in g["jobs"]}
    with capsys.disabled():
        print(
            f"\nSLURM job array: submit -> RUNNING {min(latencies):.1f}-{max(latencies):.1f}s per task; "
            f"sweep of 4 tiny trials under SLURM: --parallel 1 {walls[1]:.1f}s, --parallel 2 "
            f"{walls[2]:.1f}s ({walls[1] / walls[2]:.2f}x; load {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores)"
        )


@pytest.mark.slow
def test_cancelling_the_group_scancels_the_whole_array(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    s = settings_for(tmp_path)
    forever = {"train.max_steps": 100000, "train.val_every": 1000, "data.val_tokens": 128}
    path = _sweep(spec_root, "arrcancel", n_trials=2, overrides=forever)
    slurm = RecordingSlurm()
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": 2}).json()
        bridge = _bridge(url, tmp_path / "bridge", slurm, grace_s=20)
        stop = threading.Event()
        thread = threading.Thread(target=bridge.serve, kwargs={"stop": stop}, daemon=True)
        thread.start()
        try:
            ids = [j["id"] for j in _group(url, job["group"])["jobs"]]
            array = _array_of(url, ids[0])[0]
            wait_for(lambda: all("RUNNING" in _log(url, i) for i in ids), 180, 0.5, "both tasks running")
            wait_for(lambda: _group(url, job["group"])["progress"]["running"] == 2, 300, 0.5, "two trials")
            httpx.post(f"{url}/api/groups/{job['group']}/cancel")
            ended = wait_for(
                lambda: (g := _group(url, job["group"]))["state"] not in ("queued", "running") and g,
                180,
                0.5,
                "the cancel",
            )
        finally:
            stop.set()
            thread.join(timeout=60)
        logs = [_log(url, i) for i in ids]
    assert [j["state"] for j in ended["jobs"]] == ["cancelled", "cancelled"], logs
    assert slurm.cancels[0] == (array, "INT", True)  # the whole array (JOBID), not task by task
    assert all(f"scancel {array} (the whole array)" in log for log in logs)
    squeue = subprocess.run(["squeue", "-h", "-r", "-j", array], capture_output=True, text=True)
    assert squeue.stdout.strip() == ""  # no task of the array is left in SLURM
    # the Ctrl-C reached each task's sweep worker (--full: the batch step): no trial is left running
    trials = optuna.load_study(study_name="arrcancel", storage=s.sweep_storage).get_trials()
    assert trials and all(t.state == State.FAIL and t.user_attrs.get("interrupted") for t in trials), trials


@pytest.mark.slow
def test_a_task_killed_mid_trial_is_retried_by_the_other_task(tmp_path, spec_root, slurm_cluster):  # noqa: F811
    """kill -9 of one array task's sweep worker while its trial trains: that task (and its job)
    fails, the surviving task fails the silent trial after its Optuna heartbeat grace and retries
    it; the study ends with exactly n_trials."""
    s = settings_for(tmp_path)
    catchable = {"train.max_steps": 80, "train.val_every": 5, "data.val_tokens": 128}
    path = _sweep(spec_root, "arrkill", n_trials=2, overrides=catchable, heartbeat_s=1)
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": 2}).json()
        stop = threading.Event()
        bridge = _bridge(url, tmp_path / "bridge", RecordingSlurm())
        thread = threading.Thread(target=bridge.serve, kwargs={"stop": stop}, daemon=True)
        thread.start()
        try:
            study = wait_for(lambda: _study(s.sweep_storage, "arrkill"), 120, 0.5, "the study")

            def training():  # a trial inside its training loop, with most of its steps to go
                trials = study.get_trials(deepcopy=False, states=(State.RUNNING,))
                return next((t for t in trials if 0 < len(t.intermediate_values) <= 8), None)

            victim = wait_for(training, 600, 0.2, "a trial in training")
            os.kill(int(victim.user_attrs["worker"].split(":")[1]), signal.SIGKILL)  # host:pid:index
            g = wait_for(
                lambda: (g := _group(url, job["group"]))["state"] not in ("queued", "running") and g,
                900,
                1,
                "the end",
            )
        finally:
            stop.set()
            thread.join(timeout=60)
        logs = [_log(url, j["id"]) for j in g["jobs"]]
    assert sorted(j["state"] for j in g["jobs"]) == ["failed", "succeeded"], logs
    killed = next(j for j in g["jobs"] if j["state"] == "failed")
    assert killed["error"].startswith("SLURM FAILED"), killed
    trials = study.get_trials()
    assert trials[victim.number].state == State.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].state == State.COMPLETE, trials
    assert finished_count(study) == 2 and g["progress"]["finished"] == 2


def _study(storage: str, name: str):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
