"""`moeplat` command line. Exit codes: 0 ok, 2 invalid spec or usage, 1 failure at run time."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from moeplat.errors import SpecError
from moeplat.track.telemetry import no_telemetry
from moeplat.train.quiet import quiet_libraries
from moeplat.train.quiet import quiet_lightning as quiet_lightning_logs

# before any command can import mlflow, and inherited by every process a command starts
no_telemetry()


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="path to a spec YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value by dotted path, e.g. --set model.moe.top_k=1 (repeatable)",
    )


def _load(args):
    from moeplat.spec import load_spec

    return load_spec(args.spec, args.overrides, as_path=getattr(args, "as_path", None))


def _sweep(args):
    """(the loaded sweep, the key that made it one) when args.spec is a sweep file, else
    (None, None). validate/show/plan read both kinds; they say on stderr how they read a sweep."""
    from moeplat.errors import SpecIssue
    from moeplat.spec.sweep import load_sweep
    from moeplat.spec.sweep_plan import file_kind

    kind, why = file_kind(args.spec)
    if kind == "run":
        return None, None
    print(f"{args.spec}: read as a sweep file (it has `{why}`)", file=sys.stderr)
    if args.overrides or getattr(args, "devices", None) or getattr(args, "nodes", None):
        msg = "--set, --devices and --nodes apply to run specs: a sweep sets values in its `overrides`"
        raise SpecError(SpecIssue("", msg, args.spec))
    return load_sweep(args.spec), why


def cmd_validate(args) -> int:
    sweep, _ = _sweep(args)
    if sweep is not None:
        base = sweep.base
        print(
            f"ok: {args.spec} is a valid sweep ({sweep.sweep.name}, {len(sweep.sweep.search)} parameters "
            f"searched) over the valid run spec {os.path.normpath(sweep.base_path)} "
            f"({base.spec.name}, hash {base.spec_hash})"
        )
        return 0
    loaded = _load(args)
    print(f"ok: {args.spec} is a valid run spec ({loaded.spec.name}, hash {loaded.spec_hash})")
    return 0


def cmd_show(args) -> int:
    import yaml

    sweep, _ = _sweep(args)
    if sweep is not None:  # the sweep as validated (defaults filled in) and its base as trials see it
        data = {"sweep": sweep.sweep.model_dump(mode="json", exclude_none=True), "base": sweep.base.resolved}
    else:
        loaded = _load(args)
        data = loaded.resolved
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        text = yaml.safe_dump(data, sort_keys=False)
        if sweep is None:  # model.vocab_size: auto, as validation resolved it
            text = text.replace(
                "\n  vocab_size: auto\n", f"\n  vocab_size: auto  # = {loaded.spec.model.vocab_size}\n", 1
            )
        print(text, end="")
    return 0


def cmd_plan(args) -> int:
    from moeplat.cli.launch import layout_overrides, preflight_report, raise_problems
    from moeplat.spec import load_spec
    from moeplat.spec.plan import plan
    from moeplat.spec.plan_text import format_plan

    sweep, why = _sweep(args)
    if sweep is not None:
        return _plan_sweep(args, sweep, why)
    loaded = load_spec(args.spec, [*args.overrides, *layout_overrides(args)])
    p = plan(loaded.spec)
    memory = args.device_memory
    if memory is None and loaded.spec.parallel.accelerator != "cpu":
        from moeplat.cli.launch import detect_device_memory_gib

        memory = detect_device_memory_gib()
    pf, text = preflight_report(loaded.spec, p, memory)
    if args.json:
        print(json.dumps({**p.to_dict(), "preflight": pf.to_dict()}, indent=2))
    else:
        print(format_plan(loaded.spec, p) + "\n" + text)
    raise_problems(pf)  # exit 2 when the estimate exceeds the device's memory
    return 0


def _plan_sweep(args, sweep, why: str) -> int:
    """The range of the counts over the search space, then the base spec's own plan."""
    from moeplat.spec.plan import plan
    from moeplat.spec.plan_text import format_plan, format_sweep
    from moeplat.spec.sweep_plan import plan_range

    r = plan_range(sweep)
    base = plan(sweep.base.spec)
    if args.json:
        print(json.dumps({"kind": "sweep", "range": r.to_dict(), "base": base.to_dict()}, indent=2))
    else:
        print(
            format_sweep(sweep, why, r)
            + "\n\nbase spec (fixed overrides applied)\n"
            + format_plan(sweep.base.spec, base)
        )
    return 0


def cmd_schema(args) -> int:
    from moeplat.spec.schema import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_run(args) -> int:
    from moeplat.errors import SpecIssue
    from moeplat.spec.sweep_plan import file_kind

    kind, why = file_kind(args.spec)
    if kind == "sweep":  # read as a run spec, its sweep keys would be so many "unknown key" errors
        msg = f"a sweep file (it has `{why}`), not a run spec: run it with `moeplat sweep {args.spec}`"
        raise SpecError(SpecIssue("", msg, args.spec))
    loaded = _load(args)  # before the seconds of torch/Lightning imports: a bad spec is refused at once
    quiet_lightning(args)
    from moeplat.cli.launch import run_preflight
    from moeplat.cli.report import format_summary
    from moeplat.train.run import run

    run_preflight(loaded.spec)  # moeplat.cli.launch: the same checks as `moeplat plan --devices`
    from moeplat.cli.eval_tasks import final_eval_hook

    final_eval = final_eval_hook(loaded.spec)  # train.eval's task names are checked before training
    result = run(
        loaded,
        runs_root=args.runs_dir,
        resume=args.resume,
        tracking_uri=args.tracking_uri,
        progress=not args.no_progress,
        final_eval=final_eval,
    )
    if result.rank == 0:  # the other ranks of a multi-process run: their log is run_dir/logs
        print(format_summary(loaded.spec, result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeplat", description="Declarative Mixture-of-Experts experiments."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec; exit 0, or 2 with every problem listed")
    _spec_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("show", help="print the fully resolved spec (after extends, ${...} and --set)")
    _spec_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("plan", help="parameters, active parameters, FLOPs per token, memory estimate")
    _spec_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--devices", type=int, help="devices per node (overrides parallel.devices)")
    p.add_argument("--nodes", type=int, help="nodes (overrides parallel.num_nodes)")
    p.add_argument(
        "--device-memory",
        type=float,
        metavar="GiB",
        help="check the per-device memory estimate against this (default: the GPU's, when there is one)",
    )
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("schema", help="print the JSON Schema of spec files (for editor completion)")
    p.set_defaults(fn=cmd_schema)

    p = sub.add_parser("run", help="train a spec and log it to MLflow")
    _spec_args(p)
    p.add_argument(
        "--resume", metavar="RUN_DIR|last", help="continue a run from its last checkpoint and MLflow run"
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: spec, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--runs-dir", default="runs", help="where run directories and checkpoints go (default: runs)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--as-path",
        metavar="PATH",
        help="treat the spec as if it lived at PATH: relative extends/data paths resolve from there "
        "(the job server runs its copy of a submitted spec this way)",
    )
    p.set_defaults(fn=cmd_run)

    from moeplat.cli import bench, compare, data, launch, models, repro, server, sweep, sync, tokenizer
    from moeplat.cli import eval as eval_cmd
    from moeplat.cli import generate as generate_cmd
    from moeplat.cli import route as route_cmd

    sweep.add_commands(sub)
    server.add_commands(sub)
    compare.add_commands(sub)
    bench.add_commands(sub)
    launch.add_commands(sub, _spec_args)
    eval_cmd.add_commands(sub)
    route_cmd.add_commands(sub)
    generate_cmd.add_commands(sub)
    sync.add_commands(sub)
    tokenizer.add_commands(sub, _spec_args)
    data.add_commands(sub, _spec_args)
    models.add_commands(sub)
    repro.add_commands(sub)
    return parser


# `run` and `sweep` call quiet_lightning themselves, once their spec is loaded.
TRAINING_COMMANDS = {"sweep-worker", "bench", "eval", "repro"}


def quiet_lightning(args) -> None:
    if not args.verbose:
        quiet_lightning_logs()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(args.verbose)
    if args.command in TRAINING_COMMANDS and not args.verbose:
        quiet_lightning_logs()
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"error: {e.format()}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # e.g. `moeplat schema | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        interrupt = sys.modules.get("moeplat.train.interrupt")  # loaded where a run was training
        preempted = interrupt is not None and interrupt.preempted()  # SLURM's warning: requeue
        print("interrupted" + (" by SIGUSR1: resumable" if preempted else ""), file=sys.stderr)
        if os.environ.get("SLURM_PROCID", "0") != "0":
            # an srun task other than rank 0, which holds the MLflow run: leaving non-zero, srun's
            # --kill-on-bad-exit would kill rank 0 while it sends its last metric rows
            return 0
        return interrupt.PREEMPTED_EXIT if preempted else 130
    except Exception as e:  # a run-time failure: say what, keep the traceback for -v
        logging.getLogger("moeplat").debug("traceback", exc_info=True)
        print(f"error: {type(e).__name__}: {e} (rerun with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
