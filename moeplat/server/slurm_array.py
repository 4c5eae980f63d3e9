"""A sweep group as one SLURM job array (the SLURM bridge, moeplat.server.slurm_worker).

The bridge claims a group's queued jobs together (moeplat.server.groups.claim_rest) and submits
them with one `sbatch --array=<their group indices>`: task I of the array is the group's job of
index I, SLURM names it `JOBID_I`, its output goes to `slurm-%A_%a.log`, and it runs
`moeplat sweep-worker ... --worker-index W` with that job's MOEPLAT_JOB_ID (the MLflow tag) and
worker index (its group index, moved on by the group's size per retry). The script maps the task
id to both with a `case`, so one script serves every task and a task id that is no job of the
group stops with an error instead of running a stray worker.

A sweep's jobs (one task each, or the tasks of its array) ask SLURM for what its trials need, read
from the sweep's base spec (`sweep_sbatch`): the GPUs of parallel.devices as `moeplat slurm` asks
for a run's (`--gpus-per-node=N`; none for parallel.accelerator: cpu) and its parallel.slurm
(partition, account, QOS, time; else the bridge's), as a run job of the same spec gets them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from moeplat.server.slurm import SubmitError


@dataclass(frozen=True)
class Task:
    """One moeplat job as a task of a job array."""

    index: int  # the array task id: the job's index in its group
    job_id: int
    attempt: int
    worker_index: int  # sweep-worker --worker-index


def array_spec(indices: list[int]) -> str:
    """sbatch's --array value for these task ids: runs of consecutive ids as ranges, "0-3,5,7-8"."""
    assert indices and all(i >= 0 for i in indices), indices
    ids, parts = sorted(set(indices)), []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if i is not None:
            start = prev = i
    return ",".join(parts)


def task_id(array_id: str, index: int) -> str:
    """SLURM's name of one task of an array (squeue -r, scontrol, scancel take it)."""
    return f"{array_id}_{index}"


def split_task_id(slurm_id: str) -> tuple[str, int | None]:
    """ "123_4" -> ("123", 4); a plain job id "123" -> ("123", None)."""
    job, sep, index = slurm_id.partition("_")
    return (job, int(index)) if sep and index.isdigit() else (slurm_id, None)


def log_path(directory: Path, array_id: str, index: int) -> Path:
    """Where SLURM writes task `index`'s output under --output=DIRECTORY/slurm-%A_%a.log."""
    return directory / f"slurm-{task_id(array_id, index)}.log"


OUTPUT = "slurm-%A_%a.log"


def sweep_sbatch(
    spec_file: Path, as_path: Path, cpus_per_task: int, defaults: dict[str, str | None]
) -> list[str]:
    """#SBATCH options of one sweep worker (a task runs one trial at a time): the base spec's
    devices on one node -- a trial on N GPUs is N processes the worker starts on its own machine
    (moeplat.sweep.trial_process) -- `--cpus-per-task`, and the base spec's parallel.slurm, else
    `defaults` (the bridge's --partition/--account/--qos/--time). SubmitError when the sweep does
    not load (the job fails with its problems, as a run's `moeplat slurm` failing does)."""
    from moeplat.errors import SpecError
    from moeplat.spec.sweep import load_sweep

    try:
        parallel = load_sweep(spec_file, as_path=as_path).base.spec.parallel
    except (SpecError, OSError) as e:
        raise SubmitError(f"the sweep's batch script cannot be rendered: {e}") from None
    # as `moeplat slurm` asks for a run's GPUs (moeplat.parallel.launch.sbatch_script)
    gpus = [f"--gpus-per-node={parallel.devices}"] if parallel.accelerator != "cpu" else []
    return [*gpus, f"--cpus-per-task={cpus_per_task}", *parallel.slurm.sbatch(defaults)]


def array_script(
    name: str, command: list[str], tasks: list[Task], sbatch_lines: list[str], workdir: Path
) -> str:
    """The batch script of a job array whose tasks run `command --worker-index W`, each as its own
    moeplat job (MOEPLAT_JOB_ID)."""
    cases = [
        f"  {t.index}) export MOEPLAT_JOB_ID={t.job_id}; WORKER_INDEX={t.worker_index} ;;"
        for t in sorted(tasks, key=lambda t: t.index)
    ]
    stray = (
        '  *) echo "error: array task ${SLURM_ARRAY_TASK_ID:-(none)} is no job of this sweep group" >&2; '
        "exit 2 ;;"
    )
    return "\n".join(
        [
            "#!/bin/bash",
            "# Written by the moeplat SLURM bridge: a sweep group as a job array, one sweep worker per task",
            f"#SBATCH --job-name={name}",
            f"#SBATCH --array={array_spec([t.index for t in tasks])}",
            "#SBATCH --ntasks=1",
            *(f"#SBATCH {line}" for line in sbatch_lines),
            "set -euo pipefail",
            f"cd {shlex.quote(str(workdir))}",
            'case "${SLURM_ARRAY_TASK_ID:-}" in',
            *cases,
            stray,
            "esac",
            "exec " + " ".join(shlex.quote(c) for c in command) + ' --worker-index "$WORKER_INDEX"',
            "",
        ]
    )
