"""A sweep group as one SLURM job array, without SLURM: the --array value, task ids, the array's
batch script (run by bash for a task id, as SLURM would), and the server's side: a claim with
`array_executor` takes the group's queued jobs together, a local worker's claim still takes one,
and a group's cancel is told apart from one job's; a sweep's batch script (one task, or an array)
asks for the devices and the parallel.slurm of its base spec."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from server_helpers import live_server, settings_for, spec_root  # noqa: F401

from moeplat.server.slurm import Slurm, SlurmJob
from moeplat.server.slurm_array import Task, array_script, array_spec, log_path, split_task_id, task_id
from moeplat.server.slurm_worker import SlurmBridge, SlurmOptions


@pytest.mark.parametrize(
    ("indices", "want"),
    [
        ([0], "0"),
        ([0, 1], "0-1"),
        ([3, 0, 1, 2], "0-3"),
        ([1, 3], "1,3"),
        ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"),
        ([2, 2, 3], "2-3"),
    ],
)
def test_array_spec_compresses_runs_of_task_ids(indices, want):
    assert array_spec(indices) == want


def test_task_ids_map_to_jobs_and_back(tmp_path):
    assert task_id("123", 4) == "123_4"
    assert split_task_id("123_4") == ("123", 4)
    assert split_task_id("123") == ("123", None)
    assert log_path(tmp_path, "123", 1) == tmp_path / "slurm-123_1.log"  # what %A_%a expands to


def _script(tmp: Path, tasks: list[Task]) -> Path:
    # the command prints what a task would run: its job id and the arguments it got
    command = ["sh", "-c", 'echo "job=$MOEPLAT_JOB_ID $*"', "sweep-worker", "--as-path", "a b.yaml"]
    text = array_script("moeplat-g7", command, tasks, ["--cpus-per-task=1", "--partition=debug"], tmp)
    path = tmp / "array.sbatch"
    path.write_text(text)
    return path


def _task(script: Path, task: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_ARRAY_TASK_ID", "MOEPLAT_JOB_ID")}
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = task
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_the_array_script_runs_each_tasks_job_with_its_worker_index(tmp_path):
    # jobs 11 and 13 of a group of 3 (job 12 went to a local worker); job 13 is a retry: index 2 + 3
    tasks = [Task(0, 11, 1, 0), Task(2, 13, 2, 5)]
    script = _script(tmp_path, tasks)
    text = script.read_text()
    assert "#SBATCH --array=0,2" in text and "#SBATCH --job-name=moeplat-g7" in text
    assert "#SBATCH --partition=debug" in text and "#SBATCH --cpus-per-task=1" in text
    first, retried = _task(script, "0"), _task(script, "2")
    assert first.returncode == 0 and first.stdout.strip() == "job=11 --as-path a b.yaml --worker-index 0"
    assert retried.stdout.strip() == "job=13 --as-path a b.yaml --worker-index 5"
    for stray in ("1", None):  # a task id that is no job of the group runs nothing
        out = _task(script, stray)
        assert out.returncode == 2 and "is no job of this sweep group" in out.stderr and not out.stdout


def _sweep(root: Path, name: str, overrides: dict | None = None) -> str:
    body = {
        "name": name,
        "extends": "tiny.yaml",
        **({"overrides": overrides} if overrides else {}),
        "search": {"model.moe.top_k": {"kind": "int", "low": 1, "high": 2}},
        "trials": {"n_trials": 4},
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return f"{name}.yaml"


def _claim(url: str, worker: str, **kw) -> dict:
    r = httpx.post(f"{url}/api/worker/claim", json={"worker": worker, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_bridge_claims_the_groups_queued_jobs_together_and_a_local_worker_one(tmp_path, spec_root):  # noqa: F811
    with live_server(settings_for(tmp_path)) as url:
        sweep = {"kind": "sweep", "path": _sweep(spec_root, "arr"), "parallel": 3}
        group = httpx.post(f"{url}/api/jobs", json=sweep).json()["group"]
        run = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml"}).json()

        local = _claim(url, "local")  # a local worker got there first: one job, as before
        assert local["job"]["group_index"] == 0 and local["group_claimed"] == []
        bridge = _claim(url, "bridge", array_executor="slurm")  # the rest of the group, together
        assert [j["job"]["group_index"] for j in bridge["group_claimed"]] == [1, 2]
        assert [j["attempt"] for j in bridge["group_claimed"]] == [1, 1]
        assert bridge["job"]["id"] == bridge["group_claimed"][0]["job"]["id"]
        g = httpx.get(f"{url}/api/groups/{group}").json()
        assert g["executor"] == "slurm" and [j["worker"] for j in g["jobs"]] == ["local", "bridge", "bridge"]
        assert all(j["state"] == "running" for j in g["jobs"])
        alone = _claim(url, "bridge", array_executor="slurm")  # a job of no group: one, no array
        assert alone["job"]["id"] == run["id"] and alone["group_claimed"] == []
        assert _claim(url, "bridge", array_executor="slurm")["job"] is None

        bad = httpx.post(f"{url}/api/worker/claim", json={"worker": "w", "array_executor": "pbs"})
        assert bad.status_code == 422 and "Traceback" not in bad.text

        def beat(job: dict) -> dict:
            body = {"worker": job["job"]["worker"], "attempt": job["attempt"]}
            return httpx.post(f"{url}/api/worker/jobs/{job['job']['id']}/heartbeat", json=body).json()

        first, second = bridge["group_claimed"]
        assert beat(first) == {"cancel": False, "group_cancel": False}
        httpx.post(f"{url}/api/jobs/{first['job']['id']}/cancel")  # one job: its task only
        assert beat(first) == {"cancel": True, "group_cancel": False}
        assert beat(second) == {"cancel": False, "group_cancel": False}
        httpx.post(f"{url}/api/groups/{group}/cancel")  # the group: the whole array
        assert beat(second) == {"cancel": True, "group_cancel": True}


class ArraySlurm(Slurm):
    """sbatch takes the array as job 77; squeue lists task 77_1 running and 77_2 pending once,
    then neither; their ends are `ends` (what scontrol would say)."""

    def __init__(self, ends: dict[str, SlurmJob]):
        super().__init__()
        self.ends, self.rounds, self.submits = ends, 1, []

    def submit(self, script, options, env, cwd):
        self.submits.append((script, options, env))
        return "77"

    def active(self, job_ids):
        if self.rounds == 0:
            return {}
        self.rounds -= 1
        return {"77_1": SlurmJob("77_1", "RUNNING"), "77_2": SlurmJob("77_2", "PENDING", "Resources")}

    def ended(self, job_id):
        return self.ends.get(job_id)


def test_the_bridge_runs_the_rest_of_a_group_as_one_array_and_each_job_ends_with_its_task(
    tmp_path,
    spec_root,  # noqa: F811
):
    ends = {"77_1": SlurmJob("77_1", "COMPLETED", exit_code=0), "77_2": SlurmJob("77_2", "FAILED", "", 1, 0)}
    slurm = ArraySlurm(ends)
    with live_server(settings_for(tmp_path)) as url:
        sweep = {"kind": "sweep", "path": _sweep(spec_root, "mixed"), "parallel": 3}
        group = httpx.post(f"{url}/api/jobs", json=sweep).json()["group"]
        local = _claim(url, "local")["job"]  # a local worker took job 0 (and runs it)
        bridge = SlurmBridge(url, name="b", work_dir=tmp_path / "b", poll_s=0.05, slurm=slurm)
        assert bridge.serve(once=True) == 2  # two moeplat jobs, one sbatch
        g = httpx.get(f"{url}/api/groups/{group}").json()
        logs = {
            j["group_index"]: httpx.get(f"{url}/api/jobs/{j['id']}/log").json()["text"] for j in g["jobs"]
        }
    ((script, options, env),) = slurm.submits
    assert "--array=1-2" in options and "MOEPLAT_JOB_ID" not in env  # each task sets its own
    ids = {j["group_index"]: j["id"] for j in g["jobs"]}
    assert f"  1) export MOEPLAT_JOB_ID={ids[1]}; WORKER_INDEX=1 ;;" in script.splitlines()
    assert f"  2) export MOEPLAT_JOB_ID={ids[2]}; WORKER_INDEX=2 ;;" in script.splitlines()
    assert "  0)" not in script  # job 0 is the local worker's
    assert [j["state"] for j in g["jobs"]] == ["running", "succeeded", "failed"], logs
    assert g["jobs"][0]["id"] == local["id"] and g["jobs"][0]["worker"] == "local"
    assert "as array task 77_1 of job array 77 (sbatch --array=1-2" in logs[1]
    assert "SLURM job 77_1 RUNNING" in logs[1] and "SLURM job 77_1 COMPLETED" in logs[1]
    assert "SLURM job 77_2 PENDING (reason: Resources)" in logs[2] and "SLURM job 77_2 FAILED" in logs[2]
    assert g["jobs"][2]["error"].startswith("SLURM FAILED"), g["jobs"][2]
    assert (tmp_path / "b" / "jobs" / f"{ids[2]}-1" / "slurm_job_id").read_text() == "77_2"


GPUS = {
    "parallel.devices": 2,
    "parallel.strategy.kind": "ddp",
    "parallel.slurm.partition": "gpu",
    "parallel.slurm.time": "02:00:00",
}


def _sbatch_lines(script: str) -> list[str]:
    return [ln.removeprefix("#SBATCH ") for ln in script.splitlines() if ln.startswith("#SBATCH ")]


@pytest.mark.parametrize("parallel", [None, 2])  # one `moeplat sweep` job; a group as one array
@pytest.mark.parametrize(
    ("overrides", "want"),
    [
        # the base spec's GPUs as `moeplat slurm` asks for a run's, its parallel.slurm over the
        # bridge's --partition/--time, the bridge's --account where the spec names none
        (
            GPUS,
            [
                "--gpus-per-node=2",
                "--cpus-per-task=3",
                "--partition=gpu",
                "--account=proj",
                "--time=02:00:00",
            ],
        ),
        # parallel.accelerator auto (the default) on one device: one GPU
        (
            None,
            [
                "--gpus-per-node=1",
                "--cpus-per-task=3",
                "--partition=debug",
                "--account=proj",
                "--time=01:00:00",
            ],
        ),
        # a CPU sweep asks for no GPUs, only its CPUs
        (
            {"parallel.accelerator": "cpu"},
            ["--cpus-per-task=3", "--partition=debug", "--account=proj", "--time=01:00:00"],
        ),
    ],
)
def test_a_sweeps_batch_script_asks_for_its_base_specs_devices_and_slurm_section(
    tmp_path,
    spec_root,  # noqa: F811
    parallel,
    overrides,
    want,
):
    slurm = ArraySlurm({f"77_{i}": SlurmJob(f"77_{i}", "COMPLETED", exit_code=0) for i in range(2)})
    slurm.rounds = 0  # nothing runs: the scripts are what is checked
    slurm.ended = lambda job_id: SlurmJob(job_id, "COMPLETED", exit_code=0)
    options = SlurmOptions(partition="debug", account="proj", time="01:00:00", cpus_per_task=3)
    with live_server(settings_for(tmp_path)) as url:
        body = {"kind": "sweep", "path": _sweep(spec_root, "dev", overrides), "parallel": parallel}
        r = httpx.post(f"{url}/api/jobs", json=body)
        assert r.status_code == 201, r.text
        bridge = SlurmBridge(
            url, name="b", work_dir=tmp_path / "b", poll_s=0.05, options=options, slurm=slurm
        )
        assert bridge.serve(once=True) == (parallel or 1)
        jobs = httpx.get(f"{url}/api/jobs").json()["jobs"]
    ((script, sbatch_options, _),) = slurm.submits
    lines = _sbatch_lines(script)
    assert ("--array=0-1" in lines) == (parallel is not None)
    assert [ln for ln in lines if not ln.startswith(("--job-name=", "--array=", "--ntasks="))] == want
    assert "--ntasks=1" in lines
    assert not any(o.startswith("--gpus") for o in sbatch_options)  # the script's lines, not sbatch's
    assert all(j["state"] == "succeeded" for j in jobs), jobs


def test_a_sweep_whose_base_spec_does_not_load_fails_saying_why(tmp_path, spec_root):  # noqa: F811
    """The base spec changed on the bridge's disk after the submit (the bridge reads it as the
    server did, at the spec root): the job fails with the spec's problem, sbatch is not called."""
    slurm = ArraySlurm({})
    with live_server(settings_for(tmp_path)) as url:
        body = {"kind": "sweep", "path": _sweep(spec_root, "gone"), "parallel": 2}
        group = httpx.post(f"{url}/api/jobs", json=body).json()["group"]
        (spec_root / "tiny.yaml").write_text("name: tiny\nmodel: {d_modell: 3}\n")
        bridge = SlurmBridge(url, name="b", work_dir=tmp_path / "b", poll_s=0.05, slurm=slurm)
        bridge.serve(once=True)
        g = httpx.get(f"{url}/api/groups/{group}").json()
    assert slurm.submits == []
    for j in g["jobs"]:
        assert j["state"] == "failed" and "the sweep's batch script cannot be rendered" in j["error"], j
        assert "Traceback" not in j["error"]
