"""Launchers: `moeplat plan --devices/--nodes` preflight, `moeplat launch --print` (torchrun),
`moeplat slurm` (sbatch), rank detection and the shared run directory. The sbatch script is
rendered, syntax-checked with `bash -n`, and (slow) executed with a fake `srun` on PATH that starts
its tasks on this machine with srun's environment, so Lightning's SLURM environment runs 2-process
DDP on CPU through the very srun line a cluster would run."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from moeplat.cli.main import main
from moeplat.parallel.launch import RUN_DIR_ENV, launch_rank, sbatch_script, share_run_dir, torchrun_command

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "tests" / "fixtures" / "tiny.yaml")
DDP = ["--set", "parallel.strategy.kind=ddp"]

FAKE_SRUN = """#!/bin/bash
# fake srun: SLURM_NTASKS copies of the command on this machine, with srun's environment
while [[ "$1" == --* ]]; do shift; done
n=${SLURM_NTASKS:-1}
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_NNODES=1 SLURM_NTASKS_PER_NODE=$n \\
    SLURM_NODELIST=localhost SLURM_JOB_NAME=moeplat-tiny "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def test_launch_rank_reads_each_launcher():
    assert launch_rank(4, {}) == 0
    assert launch_rank(4, {"RANK": "5", "LOCAL_RANK": "1"}) == 5  # torchrun
    assert launch_rank(4, {"SLURM_PROCID": "7"}) == 7  # srun
    assert launch_rank(4, {"LOCAL_RANK": "3", "NODE_RANK": "1"}) == 7  # Lightning's subprocesses


def test_rank_zero_shares_its_run_dir_only_while_running(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    with share_run_dir(tmp_path, rank=0, world_size=2):
        assert os.environ[RUN_DIR_ENV] == str(tmp_path.resolve())
    assert RUN_DIR_ENV not in os.environ
    with share_run_dir(tmp_path, rank=0, world_size=1):
        assert RUN_DIR_ENV not in os.environ


def test_sbatch_script_renders_and_parses(tmp_path):
    text = sbatch_script(
        "specs/quickstart.yaml",
        ["parallel.strategy.kind=ddp", "parallel.devices=8", "parallel.num_nodes=2"],
        name="quickstart",
        nodes=2,
        per_node=8,
        workdir="/work dir",
        extra_sbatch=("--time=01:00:00",),
    )
    lines = text.splitlines()
    for want in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--job-name=moeplat-quickstart"):
        assert f"#SBATCH {want}" in lines
    assert "#SBATCH --time=01:00:00" in lines
    assert "cd '/work dir'" in lines
    srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert srun[2:6] == [sys.executable, "-m", "moeplat.cli.main", "run"]
    assert srun[-2:] == ["${resume[@]}", "&"]  # --resume RUN_DIR when a requeued job finds its run
    assert srun[srun.index("--set", 7) :][-4:-2] == ["--set", "parallel.num_nodes=2"]
    (tmp_path / "job.sbatch").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


def test_torchrun_command_single_and_multi_node():
    one = torchrun_command("s.yaml", ["parallel.devices=4"], nodes=1, per_node=4, run_dir="runs/s/x")
    assert one.startswith(
        f"{RUN_DIR_ENV}=runs/s/x torchrun --nnodes=1 --nproc-per-node=4 --standalone -m moeplat.cli.main run s.yaml"
    )
    two = torchrun_command("s.yaml", [], nodes=2, per_node=8, run_dir="r")
    assert "--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500" in two


def test_launch_print_validates_the_layout(capsys):
    assert main(["launch", TINY, "--print", "--gpus-per-node", "2", *DDP]) == 0
    out = capsys.readouterr().out
    assert "--nproc-per-node=2" in out and "--set parallel.devices=2" in out
    assert main(["launch", TINY, "--print", "--gpus-per-node", "2"]) == 2  # strategy single
    assert "parallel.strategy" in capsys.readouterr().err
    assert main(["launch", TINY, "--gpus-per-node", "2", *DDP]) == 2  # --print is required


def test_slurm_refuses_what_the_spec_cannot_take(tmp_path, capsys):
    ep = ["--set", "parallel.strategy={kind: expert_parallel, ep_size: 8}"]
    assert main(["slurm", TINY, "--nodes", "2", "--gpus-per-node", "4", *ep]) == 2
    err = capsys.readouterr().err
    assert "parallel.strategy.ep_size" in err and "4 routed experts" in err
    out = tmp_path / "j.sbatch"
    assert main(["slurm", TINY, "--nodes", "2", "--gpus-per-node", "4", *DDP, "-o", str(out)]) == 0
    assert "#SBATCH --nodes=2" in out.read_text() and os.access(out, os.X_OK)


def test_plan_prints_the_preflight_and_checks_memory(capsys):
    assert main(["plan", TINY, "--devices", "2", *DDP]) == 0
    out = capsys.readouterr().out
    assert "world 2, strategy ddp" in out and "memory/device" in out and "dp_gradients" in out
    assert (
        main(
            [
                "plan",
                "--json",
                TINY,
                "--devices",
                "4",
                "--set",
                "parallel.strategy={kind: expert_parallel, ep_size: 4}",
            ]
        )
        == 0
    )
    pf = json.loads(capsys.readouterr().out)["preflight"]
    assert pf["ep_size"] == 4 and pf["comm_bytes_per_step"]["all_to_all"] > 0
    assert main(["plan", TINY, "--device-memory", "0.000001"]) == 2
    assert "parallel: needs about" in capsys.readouterr().err
    assert (
        main(
            ["plan", TINY, "--devices", "3", "--set", "parallel.strategy={kind: expert_parallel, ep_size: 2}"]
        )
        == 2
    )
    assert "parallel.strategy.ep_size" in capsys.readouterr().err


def test_run_refuses_a_layout_it_cannot_train_before_starting(tmp_path, capsys):
    """expert_parallel with train.compile is not trainable: exit 2 naming the field, before any
    process starts. (Called in-process: a layout that did start would make Lightning's
    subprocess launcher re-run this pytest command as rank 1.)"""
    ep = "parallel.strategy={kind: expert_parallel, ep_size: 2, dense: fsdp}"
    args = ["--set", ep, "--set", "parallel.devices=2", "--set", "train.compile=true"]
    assert main(["run", TINY, "--runs-dir", str(tmp_path), *args]) == 2
    assert "train.compile" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.slow
def test_sbatch_script_runs_under_a_fake_srun(tmp_path):
    """2 srun tasks -> Lightning's SLURM environment -> DDP on 2 CPU processes; one run directory,
    one MLflow run, rank 1's log collected."""
    (tmp_path / "bin").mkdir()
    srun = tmp_path / "bin" / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    job = tmp_path / "job.sbatch"
    sets = [
        "parallel.accelerator=cpu",
        "train.max_steps=3",
        "train.val_every=3",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    ]
    args = ["slurm", TINY, "--nodes", "1", "--gpus-per-node", "2", *DDP, "-o", str(job)]
    for s in sets:
        args += ["--set", s]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the script cds to the directory it was written from
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", RUN_DIR_ENV))
    }
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="2")
    out = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("run finished") == 1  # rank 1 printed into its log
    run_dir = tmp_path / "runs" / "tiny" / "slurm-4242"
    assert (run_dir / "run.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "logs" / "rank1.log").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.metrics["train/loss"] > 0


def test_a_local_multi_process_run_must_come_from_the_moeplat_command():
    """Lightning re-runs the current command line for ranks 1..N-1: only `moeplat run` may do it."""
    from moeplat.parallel.launch import local_launch_problem

    assert local_launch_problem(1, env={}, argv=["pytest"]) is None
    assert local_launch_problem(2, env={}, argv=["/x/.venv/bin/moeplat", "run"]) is None
    for launched in ({"RANK": "1"}, {"SLURM_PROCID": "0"}, {"LOCAL_RANK": "1"}):
        assert local_launch_problem(2, env=launched, argv=["pytest"]) is None
    assert "moeplat run" in local_launch_problem(2, env={}, argv=["/x/bin/pytest", "-q"])


def test_run_called_in_process_with_several_devices_exits_2_naming_the_field(tmp_path, capsys):
    ddp = ["--set", "parallel.strategy.kind=ddp", "--set", "parallel.devices=2"]
    assert main(["run", TINY, "--runs-dir", str(tmp_path), *ddp]) == 2  # pytest is not moeplat
    assert "parallel.devices" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_printed_torchrun_line_runs(tmp_path, capsys):
    """The line `moeplat launch --print` prints, executed as printed: torchrun starts 2 CPU
    processes, Lightning takes torchelastic's environment, and they make one run directory and one
    MLflow run."""
    sets = [
        "parallel.accelerator=cpu",
        "train.max_steps=3",
        "train.val_every=3",
        f"tracking.uri=sqlite:///{tmp_path}/m.db",
    ]
    args = ["launch", TINY, "--print", "--gpus-per-node", "2", *DDP, "--runs-dir", str(tmp_path / "runs")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "torchrun " in x)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", RUN_DIR_ENV))
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # torchrun from this environment
    out = subprocess.run(
        ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("run finished") == 1  # rank 1's summary went to its log
    run_dirs = [p.parent for p in (tmp_path / "runs").glob("tiny/*/run.json")]
    assert len(run_dirs) == 1 and (run_dirs[0] / "logs" / "rank1.log").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.metrics["train/loss"] > 0
