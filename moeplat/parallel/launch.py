"""Launching a spec on several processes: which rank this process is, one run directory shared by
every rank, per-rank log files, and the torchrun command line and SLURM sbatch script.

Three ways in, one code path (moeplat.train.run.run on every rank):
  local   `moeplat run` with parallel.devices = N > 1: Lightning's subprocess launcher re-executes
          the same command line for ranks 1..N-1 (LOCAL_RANK set); rank 0 exports the run
          directory it created ($MOEPLAT_RUN_DIR) before they start, so all ranks share it.
  torchrun  every rank starts at once with RANK set; the printed command sets $MOEPLAT_RUN_DIR.
  srun    every task starts at once with SLURM_PROCID set (Lightning's SLURM environment); the
          sbatch script sets $MOEPLAT_RUN_DIR from the job id.
Only rank 0 creates and logs the MLflow run; the others write run_dir/logs/rank<N>.log.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path

RUN_DIR_ENV = "MOEPLAT_RUN_DIR"  # the same name as moeplat.train.run.RUN_DIR_ENV


def launch_rank(devices_per_node: int, env: dict | None = None) -> int:
    """The global rank of this process as its launcher set it (0 when started by hand)."""
    env = os.environ if env is None else env
    for key in ("RANK", "SLURM_PROCID"):  # torchrun / torch elastic, srun
        if key in env:
            return int(env[key])
    if "LOCAL_RANK" in env:  # Lightning's subprocess launcher
        return int(env.get("NODE_RANK", 0)) * devices_per_node + int(env["LOCAL_RANK"])
    return 0


LAUNCHER_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK")
# `python -m` entry points whose command line is a training run that may be re-run per rank: the
# CLI, and a multi-device sweep trial (moeplat.sweep.trial_process)
ENTRY_MODULES = ("moeplat.cli.main", "moeplat.sweep.trial_process")


def local_launch_problem(
    world_size: int, env: dict | None = None, argv: list[str] | None = None
) -> str | None:
    """Why this process cannot start a local multi-process run, or None.

    Lightning's subprocess launcher starts ranks 1..N-1 by re-running this process's own command
    line. That is right for `moeplat run ...`; from another program (pytest, a notebook, a script
    calling moeplat.train.run.run) it would start that program again in every rank (a pytest run
    hung this way). Under torchrun or srun (rank variables set) nothing is re-run."""
    env = os.environ if env is None else env
    if world_size == 1 or any(key in env for key in LAUNCHER_ENV):
        return None
    argv = sys.argv if argv is None else argv
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if Path(argv[0]).name == "moeplat" or getattr(main_spec, "name", "") in ENTRY_MODULES:
        return None
    return (
        f"{world_size} local processes must be started by the `moeplat run` command (Lightning starts "
        "the other ranks by re-running this process's command line); run it from a shell, or use "
        "`moeplat launch --print` (torchrun)"
    )


@contextlib.contextmanager
def share_run_dir(run_dir: Path, rank: int, world_size: int):
    """Rank 0 of a multi-process run exports its run directory for the ranks it is about to start
    (they inherit the environment at trainer.fit) and takes it back afterwards, so a later run in
    the same process opens a fresh one."""
    if world_size == 1 or rank != 0 or RUN_DIR_ENV in os.environ:
        yield
        return
    os.environ[RUN_DIR_ENV] = str(Path(run_dir).resolve())
    try:
        yield
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


@contextlib.contextmanager
def rank_logs(run_dir: Path, rank: int, world_size: int):
    """Ranks other than 0 write their stdout and stderr (Python's and the C++ runtime's: file
    descriptors 1 and 2) to run_dir/logs/rank<N>.log; rank 0 keeps the console."""
    if world_size == 1 or rank == 0:
        yield
        return
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(logs / f"rank{rank}.log", "ab", buffering=0) as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def moeplat_command() -> list[str]:
    """How to start moeplat with this interpreter (also where `moeplat` is not on PATH)."""
    return [sys.executable, "-m", "moeplat.cli.main"]


def layout_overrides(nodes: int, per_node: int) -> list[str]:
    return [f"parallel.devices={per_node}", f"parallel.num_nodes={nodes}"]


def _run_args(spec_path: str, overrides: list[str], runs_dir: str) -> list[str]:
    args = ["run", spec_path, "--no-progress", "--runs-dir", runs_dir]
    for o in overrides:
        args += ["--set", o]
    return args


def torchrun_command(
    spec_path: str,
    overrides: list[str],
    *,
    nodes: int,
    per_node: int,
    runs_dir: str = "runs",
    run_dir: str,
    master: str = "$MASTER_ADDR:29500",
) -> str:
    """One line to start on every node (torch elastic; Lightning detects it and launches nothing)."""
    tr = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={per_node}"]
    if nodes > 1:
        tr += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master}", "--rdzv-id=moeplat"]
    else:
        tr += ["--standalone"]
    cmd = [*tr, "-m", "moeplat.cli.main", *_run_args(spec_path, overrides, runs_dir)]
    return f"{RUN_DIR_ENV}={shlex.quote(run_dir)} " + " ".join(_quote(c) for c in cmd)


def _quote(arg: str) -> str:
    return arg if arg.startswith("--rdzv-endpoint=$") else shlex.quote(arg)


SBATCH = """#!/bin/bash
# Written by `moeplat slurm`: {name} on {nodes} node(s) x {per_node} {unit}(s), one task per {unit}.
# Lightning reads its ranks from srun's environment (SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST).
#SBATCH --job-name=moeplat-{name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={per_node}
{gpus}#SBATCH --cpus-per-task={cpus}
#SBATCH --output=%x-%j.out
{extra}
set -euo pipefail
cd {workdir}
# every rank writes into this one run directory; rank 0 creates the MLflow run
export {env}={run_dir}
mkdir -p "${env}"
# a requeued job (same SLURM_JOB_ID) finds its run here: it resumes from the last checkpoint into
# the same MLflow run
resume=()
if [ -f "${env}/run.json" ]; then
  echo "moeplat: resuming ${env} (restart ${{SLURM_RESTART_COUNT:-0}})"
  resume=(--resume "${env}")
fi
# SIGUSR1 (sbatch --signal=B:USR1@SECONDS, before the time limit or a preemption): the run
# checkpoints at its next step, sends its metrics, closes its MLflow run and exits 75; then the job
# requeues itself and resumes above (a run that finished meanwhile exits 0: nothing to requeue)
step=
requeue() {{
  echo "moeplat: SIGUSR1 (time limit or preemption near): checkpointing the run, then requeueing"
  [ -n "$step" ] && kill -USR1 "$step" 2>/dev/null || true
  code=0
  wait "$step" || code=$?
  [ "$code" -ne 0 ] && scontrol requeue "$SLURM_JOB_ID" && exit 0
  exit "$code"
}}
trap requeue USR1
srun --kill-on-bad-exit=1 {command} "${{resume[@]}}" &
step=$!
wait "$step"
"""


def sbatch_script(
    spec_path: str,
    overrides: list[str],
    *,
    name: str,
    nodes: int,
    per_node: int,
    runs_dir: str = "runs",
    workdir: str | None = None,
    cpus_per_task: int = 8,
    extra_sbatch: tuple[str, ...] = (),
    python: list[str] | None = None,
    gpus: bool = True,
    run_dir: str | None = None,
    run_args: tuple[str, ...] = (),
) -> str:
    """A ready sbatch script: one srun task per GPU (per process with `gpus` False: a CPU run),
    each running `moeplat run` on the spec (with `run_args` added: --as-path, --tracking-uri).
    The run directory is `run_dir`, by default runs_dir/name/slurm-$SLURM_JOB_ID (a requeued job
    keeps its id, so it finds its run again)."""
    cmd = [*(python or moeplat_command()), *_run_args(spec_path, overrides, runs_dir), *run_args]
    default_dir = f"{shlex.quote(runs_dir)}/{shlex.quote(name)}/slurm-${{SLURM_JOB_ID}}"
    return SBATCH.format(
        name=name,
        nodes=nodes,
        per_node=per_node,
        unit="GPU" if gpus else "process",
        gpus=f"#SBATCH --gpus-per-node={per_node}\n" if gpus else "",
        cpus=cpus_per_task,
        extra="\n".join(f"#SBATCH {line}" for line in extra_sbatch),
        workdir=shlex.quote(workdir or os.getcwd()),
        env=RUN_DIR_ENV,
        run_dir=shlex.quote(run_dir) if run_dir else default_dir,
        command=" ".join(shlex.quote(c) for c in cmd),
    )
