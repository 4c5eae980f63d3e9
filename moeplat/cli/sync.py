"""`moeplat sync RUN_DIR`: send the writes a run spooled while its tracking server was away."""

from __future__ import annotations

import json
from pathlib import Path

from moeplat.errors import SpecError, SpecIssue


def cmd_sync(args) -> int:
    from moeplat.track.spool import SPOOL_FILE, Spool, sync

    run_dir = Path(args.run_dir)
    state_file = run_dir / "run.json"
    if not state_file.is_file():
        raise SpecError(SpecIssue("", f"sync {run_dir}: not a run directory (no run.json)"))
    spool = Spool(run_dir / SPOOL_FILE)
    if not spool.pending():
        print(f"nothing to sync: {run_dir} has no {SPOOL_FILE}")
        return 0
    uri = args.tracking_uri or json.loads(state_file.read_text()).get("tracking_uri")
    if not uri:
        raise SpecError(SpecIssue("", f"sync {run_dir}: run.json names no tracking URI; pass --tracking-uri"))
    n = sync(spool.path, uri)
    print(f"synced {n} spooled writes of {run_dir} to {uri}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "sync", help="send a run's spooled MLflow writes (made while the server was unreachable)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory holding mlflow-spool.jsonl")
    p.add_argument("--tracking-uri", help="send to this server instead of the run's own (run.json)")
    p.set_defaults(fn=cmd_sync)
