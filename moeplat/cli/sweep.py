"""Sweep commands: sweep, sweep-worker, sweep-status, sweep-export."""

from __future__ import annotations

import argparse
import json
import os


def _storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: the sweep's storage, $MOEPLAT_SWEEP_STORAGE, sqlite:///optuna.db)",
    )


def _open(args, create: bool = False):
    """The sweep named on the command line: a sweep file, or (except for `sweep`) the name of a
    study in the storage, whose sweep file was recorded when it was created."""
    from moeplat.errors import SpecError, SpecIssue
    from moeplat.spec.sweep import load_sweep

    target = getattr(args, "study", None) or args.sweep
    if not target:
        raise SpecError(SpecIssue("", "name a sweep file or --study NAME"))
    if not create and not os.path.isfile(target) and not target.endswith((".yaml", ".yml")):
        from moeplat.sweep.study import sweep_file_of

        target = sweep_file_of(target, args.storage)
    loaded = load_sweep(target, as_path=getattr(args, "as_path", None))  # before optuna is imported
    from moeplat.sweep.study import open_study, storage_url

    url = storage_url(loaded.sweep, args.storage)
    return loaded, url, (None if create else open_study(loaded, url, create=False))


def cmd_sweep(args) -> int:
    from moeplat.cli.main import quiet_lightning

    loaded, url, _ = _open(args, create=True)
    quiet_lightning(args)  # after loading: a bad sweep is refused before the training imports
    from moeplat.sweep.launch import run_sweep
    from moeplat.sweep.report import format_status, status

    study = run_sweep(
        loaded,
        url,
        workers=args.workers,
        resume=args.resume,
        tracking_uri=args.tracking_uri,
        runs_root=args.runs_dir,
    )
    print(format_status(status(study)))
    print(f"storage {url}   (optuna-dashboard {url})")
    return 0


def cmd_sweep_worker(args) -> int:
    from moeplat.sweep.worker import work

    loaded, url, _ = _open(args)
    worker = args.worker_index if args.worker_index is not None else os.getpid()
    work(loaded, url, tracking_uri=args.tracking_uri, runs_root=args.runs_dir, worker=worker)
    return 0


def cmd_sweep_status(args) -> int:
    from moeplat.sweep.report import format_status, status

    _, _, study = _open(args)
    s = status(study)
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


def cmd_sweep_export(args) -> int:
    from moeplat.sweep.report import export_best

    loaded, _, study = _open(args)
    try:
        path = export_best(loaded, study, args.output, rank=args.rank)
    except ValueError as e:
        print(f"error: {e}")
        return 1
    print(f"wrote {path}: run it with `moeplat run {path}`")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("sweep", help="run an Optuna sweep over spec fields (one MLflow child run per trial)")
    p.add_argument("sweep", help="sweep spec YAML")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument(
        "--resume", action="store_true", help="continue the study: finished trials are not repeated"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument(
        "--as-path", metavar="PATH", help="treat the sweep file as if it lived at PATH (relative extends)"
    )
    _storage_arg(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("sweep-worker", help="join a running sweep (this or another machine, shared storage)")
    p.add_argument(
        "sweep", nargs="?", help="sweep spec YAML, or the study name (its file is recorded in the study)"
    )
    p.add_argument("--study", help="the study name (instead of the sweep file)")
    p.add_argument(
        "--worker-index", type=int, help="seeds this worker's sampler (default: from the process id)"
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument(
        "--as-path", metavar="PATH", help="treat the sweep file as if it lived at PATH (relative extends)"
    )
    _storage_arg(p)
    p.set_defaults(fn=cmd_sweep_worker)

    p = sub.add_parser("sweep-status", help="trials by state, best so far, parameter importances")
    p.add_argument("sweep", help="sweep spec YAML or study name")
    p.add_argument("--json", action="store_true")
    _storage_arg(p)
    p.set_defaults(fn=cmd_sweep_status)

    p = sub.add_parser("sweep-export", help="write the best trial as a runnable spec")
    p.add_argument("sweep", help="sweep spec YAML or study name")
    p.add_argument("--best", action="store_true", help="the best trial (default; Pareto front: --rank)")
    p.add_argument("--rank", type=int, default=0, help="which member of a Pareto front")
    p.add_argument("-o", "--output", required=True)
    _storage_arg(p)
    p.set_defaults(fn=cmd_sweep_export)
