"""`moeplat worker --executor slurm`: the SLURM bridge's flags, start-up check and loop
(moeplat.server.slurm_worker; docs/server.md)."""

from __future__ import annotations

import argparse
import logging
import sys

SLURM_FLAGS = ("partition", "account", "qos", "time")


def add_slurm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        choices=["local", "slurm"],
        default="local",
        help="local (default): run jobs on this machine; slurm: a bridge on a login node that submits "
        "each job with sbatch and follows it",
    )
    g = p.add_argument_group("--executor slurm (sbatch options for every job; default: the cluster's)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--time", help="time limit, e.g. 04:00:00 (a run checkpoints and requeues before it)")
    g.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per task (per GPU); default 8")
    g.add_argument(
        "--signal-seconds",
        type=int,
        default=90,
        help="SIGUSR1 comes this many seconds before the time limit; the run stops, the job requeues",
    )
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="another sbatch option for every job, e.g. --sbatch=--mem=32G (repeatable)",
    )
    g.add_argument("--max-jobs", type=int, default=16, help="SLURM jobs in flight at once; default 16")


def wants_bridge(args) -> bool:
    return args.executor == "slurm" or any(getattr(args, f) for f in SLURM_FLAGS)


def cmd_bridge(args) -> int:
    from moeplat.server.slurm import SlurmUnavailable
    from moeplat.server.slurm_worker import SlurmBridge, SlurmOptions
    from moeplat.server.worker import WorkerError

    if args.executor != "slurm":
        given = [f"--{f}" for f in SLURM_FLAGS if getattr(args, f)]
        print(f"error: {', '.join(given)}: only with --executor slurm", file=sys.stderr)
        return 2
    for flag in ("cpus_per_task", "signal_seconds", "max_jobs"):
        if getattr(args, flag) < 1:
            print(
                f"error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}", file=sys.stderr
            )
            return 2
    logging.getLogger("moeplat.worker").setLevel(logging.INFO)
    options = SlurmOptions(
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        signal_s=args.signal_seconds,
        extra=tuple(args.sbatch),
    )
    from moeplat.cli.server import worker_kwargs

    bridge = SlurmBridge(
        args.server, args.token, options=options, max_jobs=args.max_jobs, **worker_kwargs(args)
    )
    try:
        partitions = bridge.check()
    except SlurmUnavailable as e:
        print(f"error: the SLURM bridge cannot start: {e}", file=sys.stderr)
        return 2 if str(e).startswith("--partition") else 1
    print(
        f"moeplat SLURM bridge {bridge.name} on {args.server} (partitions {', '.join(partitions)}; "
        f"up to {args.max_jobs} SLURM jobs at once)",
        flush=True,
    )
    try:
        n = bridge.serve(once=args.once)
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bridge submitted {n} job(s)")
    return 0
