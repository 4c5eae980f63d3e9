"""Sweeps spread over workers (`moeplat submit --sweep FILE --parallel N`): the server creates the
study once and queues N sweep-worker jobs as one group; workers finish exactly n_trials together,
a killed worker's running trial is retried by the other, and bad input is refused at submit time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import optuna
import pytest
import yaml
from server_helpers import live_server, settings_for, spec_root, wait_for  # noqa: F401

from moeplat.server.worker import Worker
from moeplat.sweep.study import finished_count, progress

State = optuna.trial.TrialState
QUICK = {"train.max_steps": 6, "train.val_every": 3, "data.val_tokens": 128}
NEVER_PRUNE = {"kind": "median", "n_startup_trials": 1000}


def _sweep(root: Path, name: str, n_trials: int = 4, heartbeat_s: int = 5, overrides=None) -> str:
    body = {
        "name": name,
        "extends": "tiny.yaml",
        "overrides": overrides or QUICK,
        "search": {"model.moe.top_k": {"kind": "int", "low": 1, "high": 3}},
        "sampler": {"kind": "random"},
        "pruner": NEVER_PRUNE,
        "trials": {"n_trials": n_trials, "heartbeat_s": heartbeat_s, "max_retries": 1},
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return f"{name}.yaml"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeplat.cli.main", *args], capture_output=True, text=True, cwd=cwd
    )


def _group(url: str, group_id: int) -> dict:
    return httpx.get(f"{url}/api/groups/{group_id}").json()


def test_a_parallel_sweep_is_one_group_and_bad_input_is_refused(tmp_path, spec_root):  # noqa: F811
    s = settings_for(tmp_path)
    path = _sweep(spec_root, "spread")
    with live_server(s) as url:
        r = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": 0})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "parallel"
        r = httpx.post(f"{url}/api/jobs", json={"path": "tiny.yaml", "parallel": 2})
        assert r.status_code == 422 and "parallel is for sweeps" in r.json()["detail"]

        job = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": 2}).json()
        g = _group(url, job["group"])
        assert g["size"] == 2 and g["state"] == "queued" and g["n_trials"] == 4
        assert [j["kind"] for j in g["jobs"]] == ["sweep-worker"] * 2
        assert [j["group_index"] for j in g["jobs"]] == [0, 1]
        assert g["progress"] == {
            "n_trials": 4,
            "finished": 0,
            "complete": 0,
            "pruned": 0,
            "failed": 0,
            "running": 0,
            "waiting": 0,
        }
        assert all(j["reason"] == "waiting for a worker" for j in g["jobs"])
        # the study exists once: a second sweep of that name is refused before anything is queued
        again = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": 2})
        assert again.status_code == 422 and "already exists" in again.json()["errors"][0]["text"]
        assert len(httpx.get(f"{url}/api/jobs").json()["jobs"]) == 2

        env = {"cwd": spec_root}
        out = _cli("submit", path, "--sweep", "--parallel", "0", "--server", url, **env)
        assert out.returncode == 2 and "--parallel" in out.stderr and "Traceback" not in out.stderr
        out = _cli("submit", "tiny.yaml", "--parallel", "2", "--server", url, **env)
        assert out.returncode == 2 and "--sweep" in out.stderr
        listing = _cli("jobs", "--server", url, **env).stdout
        assert f"g{g['id']}" in listing and "0/4 trials" in listing, listing

        out = _cli("cancel", "--group", str(g["id"]), "--server", url, **env)
        assert out.returncode == 0, out.stderr
        assert _group(url, g["id"])["state"] == "cancelled"


def _run_group(url: str, tmp: Path, path: str, n: int, workers: int) -> tuple[dict, float]:
    """Submit the sweep with --parallel n, serve it with `workers` workers; (group, wall seconds)."""
    start = time.monotonic()
    job = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": n}).json()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=Worker(url, name=f"w{i}-{path}", work_dir=tmp / f"w{i}", poll_s=0.2).serve,
            kwargs={"stop": stop},
            daemon=True,
        )
        for i in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: _group(url, job["group"])["state"] not in ("queued", "running"), 900, 1, "the sweep")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return _group(url, job["group"]), time.monotonic() - start


@pytest.mark.slow
def test_two_workers_finish_exactly_n_trials_and_the_wall_time_is_printed(
    tmp_path,
    spec_root,  # noqa: F811
    monkeypatch,
    capsys,
):
    # one thread per trial process: two workers on a small machine must not oversubscribe its cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    s = settings_for(tmp_path)
    walls = {}
    with live_server(s) as url:
        for n in (1, 2):
            path = _sweep(spec_root, f"par{n}")
            group, walls[n] = _run_group(url, tmp_path, path, n, workers=n)
            assert group["state"] == "succeeded", group
            study = optuna.load_study(study_name=f"par{n}", storage=s.sweep_storage)
            trials = study.get_trials()
            assert finished_count(study) == 4 and group["progress"]["finished"] == 4, trials
            assert progress(study, 4)["complete"] == 4
            assert len({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}) == n
    with capsys.disabled():
        print(
            f"\nsweep of 4 tiny trials: --parallel 1 {walls[1]:.1f} s, --parallel 2 {walls[2]:.1f} s "
            f"({walls[1] / walls[2]:.2f}x; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
        )


@pytest.mark.slow
def test_a_killed_sweep_workers_trial_is_retried_by_the_other(tmp_path, spec_root, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    s = settings_for(tmp_path)
    catchable = {"train.max_steps": 80, "train.val_every": 5, "data.val_tokens": 128}
    path = _sweep(spec_root, "killed", n_trials=2, heartbeat_s=1, overrides=catchable)
    with live_server(s) as url:
        job = httpx.post(f"{url}/api/jobs", json={"kind": "sweep", "path": path, "parallel": 2}).json()
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=Worker(url, name=f"k{i}", work_dir=tmp_path / f"k{i}", poll_s=0.2).serve,
                kwargs={"stop": stop},
                daemon=True,
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        try:
            study = wait_for(lambda: _load(s.sweep_storage), 120, 0.5, "the study")

            def training():  # a trial inside its training loop, with most of its steps to go
                trials = study.get_trials(deepcopy=False, states=(State.RUNNING,))
                return next((t for t in trials if 0 < len(t.intermediate_values) <= 8), None)

            victim = wait_for(training, 600, 0.2, "a trial in training")
            pid = int(victim.user_attrs["worker"].split(":")[1])  # host:pid:index of its sweep-worker
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda: _group(url, job["group"])["state"] not in ("queued", "running"), 900, 1, "the end"
            )
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        g = _group(url, job["group"])
        states = sorted(j["state"] for j in g["jobs"])
        assert states == ["failed", "succeeded"], g  # the killed worker's job failed, the other finished
        trials = study.get_trials()
        assert study.get_trials()[victim.number].state == State.FAIL
        retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
        assert len(retried) == 1 and retried[0].state == State.COMPLETE, trials
        assert finished_count(study) == 2 and g["progress"]["finished"] == 2


def _load(storage: str):
    try:
        return optuna.load_study(study_name="killed", storage=storage)
    except KeyError:
        return None
