"""`moeplat sync PATH`: send the writes runs spooled while their tracking server was away.

PATH is one run directory, or a directory holding run directories (`runs/`, a sweep's
`runs/<sweep>/`): every spool under it is sent, sweep parents first so their trials attach to them
at once (in the other order they are attached when the parent is created: moeplat.track.spool)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moeplat.errors import SpecError, SpecIssue


def _run_dirs(path: Path) -> list[Path]:
    """Run directories with a spool: `path` itself, or those under it, parents first."""
    from moeplat.track.spool import SPOOL_FILE

    if (path / "run.json").is_file():
        return [path]
    found = [p.parent for p in path.rglob(SPOOL_FILE) if (p.parent / "run.json").is_file()]
    return sorted(found, key=lambda d: (d.name != "sweep-parent", str(d)))


def cmd_sync(args) -> int:
    from moeplat.track.spool import SPOOL_FILE, Spool, reachable, sync

    path = Path(args.run_dir)
    if not path.is_dir() or (not (path / "run.json").is_file() and not any(path.rglob("run.json"))):
        raise SpecError(
            SpecIssue("", f"sync {path}: not a run directory (no run.json), nor one holding runs")
        )
    run_dirs = [d for d in _run_dirs(path) if Spool(d / SPOOL_FILE).pending()]
    if not run_dirs:
        print(f"nothing to sync: no {SPOOL_FILE} in {path}")
        return 0
    for run_dir in run_dirs:
        uri = args.tracking_uri or json.loads((run_dir / "run.json").read_text()).get("tracking_uri")
        if not uri:
            raise SpecError(
                SpecIssue("", f"sync {run_dir}: run.json names no tracking URI; pass --tracking-uri")
            )
        if not reachable(uri):  # one quick request, not MLflow's minutes of retries
            print(
                f"error: tracking server {uri} unreachable: nothing sent from {run_dir}; sync again later",
                file=sys.stderr,
            )
            return 1
        n = sync(run_dir / SPOOL_FILE, uri)
        run_id = json.loads((run_dir / "run.json").read_text()).get("run_id")
        print(f"synced {n} spooled writes of {run_dir} to {uri} (MLflow run {run_id})")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "sync", help="send runs' spooled MLflow writes (made while the server was unreachable)"
    )
    p.add_argument(
        "run_dir",
        metavar="PATH",
        help="a run directory holding mlflow-spool.jsonl, or a directory of runs (e.g. runs/): all of them",
    )
    p.add_argument("--tracking-uri", help="send to this server instead of each run's own (run.json)")
    p.set_defaults(fn=cmd_sync)
