"""SLURM's answers as the bridge reads them (no SLURM needed): sbatch / squeue / sacct / scontrol
output, the SLURM -> moeplat job state mapping and the error text a job ends with; the sbatch
script a CPU or GPU run gets; the bridge's refusals without SLURM."""

from __future__ import annotations

import pytest

from moeplat.cli.main import main
from moeplat.parallel.launch import sbatch_script
from moeplat.server.slurm import (
    Slurm,
    SlurmJob,
    SlurmUnavailable,
    SubmitError,
    job_state,
    parse_sacct,
    parse_sbatch,
    parse_scontrol,
    parse_squeue,
)


@pytest.mark.parametrize(
    ("state", "listed", "want"),
    [
        ("PENDING", True, "queued"),
        ("REQUEUED", True, "queued"),
        ("REQUEUE_HOLD", True, "queued"),
        ("CONFIGURING", True, "queued"),
        ("SUSPENDED", True, "queued"),
        ("PREEMPTED", True, "queued"),  # still listed: being requeued, it resumes
        ("RUNNING", True, "running"),
        ("COMPLETING", True, "running"),
        ("COMPLETED", False, "succeeded"),
        ("CANCELLED by 0", False, "cancelled"),  # sacct's spelling
        ("FAILED", False, "failed"),
        ("TIMEOUT", False, "failed"),
        ("PREEMPTED", False, "failed"),  # gone from squeue: it was not requeued
        ("NODE_FAIL", False, "failed"),
        ("OUT_OF_MEMORY", False, "failed"),
        ("BOOT_FAIL", False, "failed"),
        ("DEADLINE", False, "failed"),
        ("SOMETHING_NEW", False, "failed"),  # a state this code does not know ends the job
    ],
)
def test_slurm_states_map_to_job_states(state, listed, want):
    assert job_state(state, listed) == want


def test_final_states_explain_themselves():
    assert SlurmJob("7", "COMPLETED", exit_code=0).error() is None
    timeout = SlurmJob("7", "TIMEOUT", "TimeLimit", 0, 15).error()
    assert timeout.startswith("SLURM TIMEOUT: the job reached its time limit") and "signal 15" in timeout
    oom = SlurmJob("7", "OUT_OF_MEMORY", "OutOfMemory", 0, 9).error()
    assert oom.startswith("SLURM OUT_OF_MEMORY:") and "--mem" in oom
    failed = SlurmJob("7", "FAILED", "NonZeroExitCode", 1, 0).error()
    assert failed == (
        "SLURM FAILED: the batch script exited with a non-zero code; exit code 1; reason NonZeroExitCode"
    )
    assert SlurmJob("7", "NODE_FAIL").error().startswith("SLURM NODE_FAIL: a node of the job failed")


def test_parse_sbatch():
    assert parse_sbatch("42\n") == "42"
    assert parse_sbatch("42;cluster-a\n") == "42"
    with pytest.raises(SubmitError, match="no job id"):
        parse_sbatch("Submitted batch job\n")


def test_parse_squeue():
    text = "12|PENDING|Priority|\n13|RUNNING|None|node1\n14|PENDING|PartitionTimeLimit\n\n"
    jobs = parse_squeue(text)
    assert jobs["12"] == SlurmJob("12", "PENDING", "Priority")
    assert jobs["13"].moeplat_state == "running" and jobs["13"].nodes == "node1"
    assert jobs["14"].reason == "PartitionTimeLimit"


def test_parse_sacct_takes_the_last_line_of_a_requeued_job():
    text = "21|REQUEUED|0:0|None\n21|COMPLETED|0:0|None\n22|CANCELLED by 0|0:15|None\n23|FAILED|3:0|NonZeroExitCode\n"
    jobs = parse_sacct(text)
    assert jobs["21"].state == "COMPLETED"
    assert (jobs["22"].state, jobs["22"].signal) == ("CANCELLED", 15)
    assert (jobs["23"].exit_code, jobs["23"].moeplat_state) == (3, "failed")


def test_parse_scontrol_show_job():
    # one line of `scontrol show job -o` (slurm 22.05), shortened
    text = (
        "JobId=5 JobName=moeplat-tiny UserId=root(0) JobState=TIMEOUT Reason=TimeLimit Dependency=(null) "
        "Requeue=1 Restarts=2 BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:01:01 TimeLimit=00:01:00 "
        "Command=/tmp/x/job.sbatch WorkDir=/tmp/x StdOut=/tmp/x/slurm.log"
    )
    job = parse_scontrol(text)
    assert job == SlurmJob("5", "TIMEOUT", "TimeLimit", 0, 15, 2)
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified") is None


def test_the_sbatch_script_of_a_cpu_run_asks_for_no_gpus_and_resumes_its_run_dir():
    text = sbatch_script(
        "/specs/tiny.yaml",
        ["parallel.devices=2"],
        name="tiny",
        nodes=1,
        per_node=2,
        cpus_per_task=1,
        gpus=False,
        run_dir="/work/runs/job-3/run",
        run_args=("--tracking-uri", "sqlite:////m.db"),
    )
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=2" in text
    assert "export MOEPLAT_RUN_DIR=/work/runs/job-3/run" in text
    assert 'resume=(--resume "$MOEPLAT_RUN_DIR")' in text  # when its run.json exists
    assert "trap requeue USR1" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "--tracking-uri sqlite:////m.db" in text


def test_a_missing_sbatch_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands here
    with pytest.raises(SlurmUnavailable, match="sbatch, squeue, scontrol, scancel, sinfo not found on PATH"):
        Slurm().check()


def test_worker_flags_for_slurm_need_the_slurm_executor(capsys):
    assert main(["worker", "--partition", "gpu", "--once"]) == 2
    assert "--partition: only with --executor slurm" in capsys.readouterr().err
    assert main(["worker", "--executor", "slurm", "--max-jobs", "0"]) == 2
    assert "--max-jobs must be >= 1" in capsys.readouterr().err


def test_the_bridge_refuses_to_start_without_slurm(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["worker", "--executor", "slurm", "--server", "http://127.0.0.1:9", "--once"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the SLURM bridge cannot start:") and "not found on PATH" in err


def test_parallel_slurm_takes_names_and_times_only(capsys):
    """Its values become #SBATCH lines of a bash script: a space or a newline is refused."""
    from moeplat.spec import load_spec

    tiny = "tests/fixtures/tiny.yaml"
    ok = load_spec(tiny, ["parallel.slurm.partition=gpu-a100", "parallel.slurm.time=1-12:00:00"])
    assert ok.spec.parallel.slurm.sbatch({"partition": "cpu", "qos": "low"}) == [
        "--partition=gpu-a100",
        "--qos=low",
        "--time=1-12:00:00",
    ]
    bad = ["--set", "parallel.slurm.partition=gpu\n#SBATCH --x", "--set", "parallel.slurm.time=4h"]
    assert main(["validate", tiny, *bad]) == 2
    err = capsys.readouterr().err
    assert "parallel.slurm.partition" in err and "is not a SLURM name" in err
    assert "parallel.slurm.time" in err and "HH:MM:SS" in err
