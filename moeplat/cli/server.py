"""Job server commands: serve, worker, submit, jobs, cancel (docs/server.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from moeplat.errors import SpecError, SpecIssue

DEFAULT_SERVER = "http://127.0.0.1:8765"


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("MOEPLAT_SERVER", DEFAULT_SERVER),
        help="server URL ($MOEPLAT_SERVER)",
    )
    p.add_argument("--token", default=os.environ.get("MOEPLAT_TOKEN"), help="API token ($MOEPLAT_TOKEN)")


class ServerError(Exception):
    """The server refused or could not be reached (exit 1)."""


def _http(args):
    import httpx

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    return httpx.Client(base_url=args.server.rstrip("/"), headers=headers, timeout=30)


def _call(args, method: str, path: str, **kw):
    import httpx

    with _http(args) as http:
        try:
            r = http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ServerError(f"cannot reach the server at {args.server}: {e}") from None
    if r.status_code >= 400 and not (r.status_code == 422 and '"errors"' in r.text):
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text[:300]
        raise ServerError(f"server answered {r.status_code}: {detail}")
    return r


def cmd_serve(args) -> int:
    import uvicorn

    from moeplat.server.app import create_app
    from moeplat.server.security import ExposedWithoutToken, check_exposure
    from moeplat.server.settings import ServerSettings

    settings = ServerSettings.from_env(
        host=args.host,
        port=args.port,
        token=args.token,
        db_url=args.db,
        spec_roots=tuple(Path(r) for r in args.spec_root) or None,
        work_dir=args.work_dir,
        web_dir=args.web_dir,
        tracking_uri=args.tracking_uri,
        sweep_storage=args.storage,
    )
    try:
        check_exposure(settings)
    except ExposedWithoutToken as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    roots = ", ".join(str(r) for r in settings.spec_roots)
    print(f"moeplat server on http://{settings.host}:{settings.port} (jobs {settings.db_url}; specs {roots})")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def worker_kwargs(args) -> dict:
    """The `moeplat worker` flags a local worker and a SLURM bridge share."""
    return {
        "work_dir": Path(args.work_dir),
        "spec_root": Path(args.spec_root) if args.spec_root else None,
        "poll_s": args.poll,
        "grace_s": args.grace,
        **({"name": args.name} if args.name else {}),
    }


def cmd_worker(args) -> int:
    import logging

    from moeplat.cli.slurm_bridge import cmd_bridge, wants_bridge

    if wants_bridge(args):  # --executor slurm: jobs run as SLURM batch jobs, not here
        return cmd_bridge(args)
    from moeplat.server.worker import Worker, WorkerError, parse_devices

    logging.getLogger("moeplat.worker").setLevel(logging.INFO)
    try:
        devices = parse_devices(args.devices, _gpu_count)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worker = Worker(args.server, args.token, devices=devices, **worker_kwargs(args))
    owns = f"devices {','.join(devices)}" if devices is not None else "CPU, one job at a time"
    print(f"moeplat worker {worker.name} on {args.server} ({owns})", flush=True)
    try:
        n = worker.serve(once=args.once)
    except WorkerError as e:
        raise ServerError(str(e)) from None
    print(f"worker ran {n} job(s)")
    return 0


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_roots() -> list[Path]:
    raw = os.environ.get("MOEPLAT_SPEC_ROOTS")
    return [Path(p).resolve() for p in raw.split(os.pathsep) if p] if raw else [Path("specs").resolve()]


def _filename(spec: Path, given: str | None) -> str:
    """Where the server should take the spec to live: --as, else its path under a local spec root
    (./specs or $MOEPLAT_SPEC_ROOTS), else its file name."""
    if given:
        return given
    real = spec.resolve()
    for root in _local_roots():
        if real.is_relative_to(root):
            return str(real.relative_to(root))
    return spec.name


def _print_issues(errors: list[dict]) -> None:
    n = len(errors)
    print(f"error: {n} problem{'s' if n != 1 else ''} in spec:", file=sys.stderr)
    for e in errors:
        print(f"  {e['text']}", file=sys.stderr)


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of workers") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: a sweep needs at least 1 worker (--parallel 1 or more)")
    return n


def cmd_submit(args) -> int:
    if args.parallel is not None and not args.sweep:
        print(
            "error: --parallel spreads a sweep over workers: add --sweep (a run's width is its parallel.devices)",
            file=sys.stderr,
        )
        return 2
    spec = Path(args.spec)
    if args.sweep:  # locally first: the same errors as `moeplat validate` / `moeplat sweep`
        from moeplat.spec.sweep import load_sweep

        if args.overrides:
            raise SpecError(SpecIssue("", "a sweep takes no --set: edit the sweep's `overrides`"))
        load_sweep(spec)
    else:
        from moeplat.spec import load_spec

        load_spec(spec, args.overrides)
    body = {
        "kind": "sweep" if args.sweep else "run",
        "text": spec.read_text(encoding="utf-8"),
        "filename": _filename(spec, args.as_path),
        "overrides": args.overrides,
    }
    if args.name:
        body["name"] = args.name
    if args.parallel is not None:
        body["parallel"] = args.parallel
    r = _call(args, "POST", "/api/jobs", json=body)
    if r.status_code == 422:
        _print_issues(r.json()["errors"])
        return 2
    job = r.json()
    if job.get("group"):
        group = _call(args, "GET", f"/api/groups/{job['group']}").json()
        ids = ", ".join(str(j["id"]) for j in group["jobs"])
        print(f"sweep group {group['id']} queued ({group['name']}): {group['size']} worker job(s) {ids}")
    else:
        print(f"job {job['id']} queued ({job['kind']} {job['name']})", flush=True)
    return _follow(args, job["id"]) if args.follow else 0


def _follow(args, job_id: int) -> int:
    offset = 0
    while True:
        out = _call(args, "GET", f"/api/jobs/{job_id}/log", params={"offset": offset}).json()
        sys.stdout.write(out["text"])
        sys.stdout.flush()
        offset = out["offset"]
        if out["done"]:
            break
        if not out["text"]:
            time.sleep(args.poll)
    job = _call(args, "GET", f"/api/jobs/{job_id}").json()
    print(f"job {job_id} {job['state']}" + (f": {job['error']}" if job["error"] else ""))
    return 0 if job["state"] == "succeeded" else 1


def cmd_jobs(args) -> int:
    params = {"limit": args.limit, **({"state": args.state} if args.state else {})}
    jobs = _call(args, "GET", "/api/jobs", params=params).json()["jobs"]
    groups = {} if args.state else _groups(args)
    print(f"{'id':>5}  {'state':<10} {'kind':<5} {'name':<28} {'created':<20} worker")
    shown = set()
    for j in jobs:
        created = (j["created_at"] or "")[:19].replace("T", " ")
        if (g := groups.get(j.get("group"))) is not None:  # a sweep over workers: one line, its progress
            if g["id"] not in shown:
                shown.add(g["id"])
                gid, name = f"g{g['id']}", g["name"][:28]
                print(f"{gid:>5}  {g['state']:<10} {'sweep':<5} {name:<28} {created:<20} {_group_line(g)}")
            continue
        where = j["worker"] or (f"({j['reason']})" if j.get("reason") else "")
        if j.get("detail"):  # what the executor says (the SLURM bridge: state, reason, node)
            where += f" ({j['detail']})"
        print(f"{j['id']:>5}  {j['state']:<10} {j['kind']:<5} {j['name'][:28]:<28} {created:<20} {where}")
    return 0


def _groups(args) -> dict[int, dict]:
    try:
        return {g["id"]: g for g in _call(args, "GET", "/api/groups").json()["groups"]}
    except ServerError:  # a server from before job groups
        return {}


def _group_line(g: dict) -> str:
    jobs = " ".join(
        f"#{j['id']}:{j['state']}" + (f" ({j['detail']})" if j.get("detail") else "") for j in g["jobs"]
    )
    if reasons := {j["reason"] for j in g["jobs"] if j.get("reason")}:
        jobs += f" ({'; '.join(sorted(reasons))})"
    p = g.get("progress")
    if not p:
        return f"{g['size']} workers ({jobs})"
    counts = ", ".join(f"{p[k]} {k}" for k in ("complete", "running", "pruned", "failed") if p[k])
    return f"{p['finished']}/{p['n_trials']} trials{' (' + counts + ')' if counts else ''}; {g['size']} workers {jobs}"


def cmd_cancel(args) -> int:
    if (args.job is None) == (args.group is None):
        print("error: name a job, or a sweep group with --group G", file=sys.stderr)
        return 2
    if args.group is not None:
        g = _call(args, "POST", f"/api/groups/{args.group}/cancel").json()
        print(f"sweep group {g['id']}: " + ", ".join(f"job {j['id']} {j['state']}" for j in g["jobs"]))
        return 0
    job = _call(args, "POST", f"/api/jobs/{args.job}/cancel").json()
    what = "cancel requested" if job["state"] == "running" else job["state"]
    print(f"job {job['id']}: {what}")
    return 0


def _guarded(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="the job server: HTTP API, job queue and web UI")
    p.add_argument("--host", help="listen address (default 127.0.0.1; beyond loopback needs a token)")
    p.add_argument("--port", type=int, help="default 8765")
    p.add_argument("--token", default=None, help="API token (default $MOEPLAT_TOKEN)")
    p.add_argument("--db", help="jobs database URL (default $MOEPLAT_DB_URL, sqlite:///moeplat-jobs.db)")
    p.add_argument(
        "--spec-root",
        action="append",
        default=[],
        help="directory specs may come from (repeatable; default ./specs)",
    )
    p.add_argument("--work-dir", help="server files (default .moeplat/server)")
    p.add_argument("--web-dir", help="the built web UI (default web/dist)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for jobs (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--storage", help="Optuna storage for sweep jobs (default $MOEPLAT_SWEEP_STORAGE)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("worker", help="run queued jobs of a server (this or another machine)")
    _client_args(p)
    p.add_argument("--name", help="worker name (default host-pid)")
    p.add_argument(
        "--work-dir", default=".moeplat/worker", help="job files and runs/ (default .moeplat/worker)"
    )
    p.add_argument(
        "--spec-root", help="this machine's copy of the server's spec root (default: the same path)"
    )
    p.add_argument("--poll", type=float, default=2.0, help="seconds between claims while the queue is empty")
    p.add_argument("--grace", type=float, default=30.0, help="seconds from SIGINT to SIGKILL on cancel")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
    p.add_argument(
        "--devices",
        default="auto",
        help="device ids this worker owns and shares out to jobs side by side (CUDA_VISIBLE_DEVICES), "
        "e.g. 0,1,2,3; auto (default): the GPUs it sees, else cpu: one job at a time, of any width",
    )
    from moeplat.cli.slurm_bridge import add_slurm_args

    add_slurm_args(p)  # --executor slurm and its sbatch options
    p.set_defaults(fn=_guarded(cmd_worker))

    p = sub.add_parser("submit", help="queue a run (or --sweep) on a server; validated here first")
    p.add_argument("spec", help="spec (or sweep) YAML file")
    _client_args(p)
    p.add_argument("--sweep", action="store_true", help="the file is a sweep spec")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", help="job name (default: the spec's name)")
    p.add_argument(
        "--as",
        dest="as_path",
        metavar="NAME",
        help="where the spec lives on the server, relative to its spec root",
    )
    p.add_argument(
        "--follow", action="store_true", help="print the job's log until it ends; exit 1 unless it succeeded"
    )
    p.add_argument(
        "--parallel",
        type=_at_least_one,
        metavar="N",
        help="a sweep: run it as N worker jobs that join one study (n_trials stays the sweep's)",
    )
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(fn=_guarded(cmd_submit))

    p = sub.add_parser("jobs", help="list a server's jobs, newest first")
    _client_args(p)
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=_guarded(cmd_jobs))

    p = sub.add_parser("cancel", help="cancel a queued or running job (or a sweep group's jobs)")
    p.add_argument("job", type=int, nargs="?")
    p.add_argument("--group", type=int, metavar="G", help="cancel every job of sweep group G")
    _client_args(p)
    p.set_defaults(fn=_guarded(cmd_cancel))
