"""`moeplat plan --devices N --nodes M` preflight, `moeplat launch --print` (torchrun) and
`moeplat slurm` (sbatch script). Every launch first loads the spec with the layout it will run
under, so a layout the spec cannot take (strategy, ep_size divisibility) fails here, exit 2."""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path

from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.plan_text import format_preflight

GiB = 1024**3


def layout_args(p: argparse.ArgumentParser, devices_flag: str = "--devices") -> None:
    p.add_argument(devices_flag, dest="devices", type=int, help="devices (processes) per node")
    p.add_argument("--nodes", type=int, help="number of nodes")


def layout_overrides(args) -> list[str]:
    """--devices / --nodes as spec overrides (they win over the spec's parallel section)."""
    out = []
    for flag, key in (("devices", "parallel.devices"), ("nodes", "parallel.num_nodes")):
        value = getattr(args, flag, None)
        if value is not None:
            if value < 1:
                raise SpecError(SpecIssue(key, f"--{flag} must be >= 1, got {value}"))
            out.append(f"{key}={value}")
    return out


def detect_device_memory_gib() -> float | None:
    """The smallest visible GPU's memory, or None without CUDA (then memory is not checked)."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / GiB


def preflight_report(spec, p, device_memory_gib: float | None):
    from moeplat.spec.preflight import preflight

    pf = preflight(spec, p, device_memory_gib)
    return pf, format_preflight(spec, pf)


def raise_problems(pf) -> None:
    if pf.problems:
        raise SpecError([SpecIssue(path, msg) for path, msg in pf.problems])


def run_preflight(spec) -> None:
    """Before `moeplat run` starts anything: the memory check against this machine's GPU."""
    from moeplat.spec.plan import plan

    if spec.parallel.accelerator == "cpu":
        return
    pf, _ = preflight_report(spec, plan(spec), detect_device_memory_gib())
    raise_problems(pf)


def _load_layout(args, nodes: int, per_node: int):
    from moeplat.parallel.launch import layout_overrides as parallel_overrides
    from moeplat.spec import load_spec

    overrides = [*args.overrides, *parallel_overrides(nodes, per_node)]
    return load_spec(args.spec, overrides, as_path=getattr(args, "as_path", None)), overrides


def _checked(loaded, args) -> None:
    from moeplat.spec.plan import plan

    pf, _ = preflight_report(loaded.spec, plan(loaded.spec), args.device_memory)
    raise_problems(pf)


def cmd_launch(args) -> int:
    from moeplat.parallel.launch import torchrun_command

    if not args.print:
        raise SpecError(SpecIssue("", "moeplat launch only prints its command for now: add --print"))
    nodes, per_node = args.nodes or 1, args.devices or 1
    loaded, overrides = _load_layout(args, nodes, per_node)
    _checked(loaded, args)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = str(Path(args.runs_dir) / loaded.spec.name / f"torchrun-{stamp}")
    print(
        torchrun_command(
            args.spec, overrides, nodes=nodes, per_node=per_node, runs_dir=args.runs_dir, run_dir=run_dir
        )
    )
    return 0


def cmd_slurm(args) -> int:
    from moeplat.parallel.launch import sbatch_script
    from moeplat.spec import load_spec

    nodes, per_node = args.nodes, args.gpus_per_node
    if nodes is None or per_node is None:  # the spec's own layout (the SLURM bridge renders so)
        parallel = load_spec(args.spec, args.overrides, as_path=args.as_path).spec.parallel
        nodes, per_node = nodes or parallel.num_nodes, per_node or parallel.devices
    loaded, overrides = _load_layout(args, nodes, per_node)
    _checked(loaded, args)
    run_args = [*(["--as-path", args.as_path] if args.as_path else [])]
    run_args += ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
    script = sbatch_script(
        args.spec,
        overrides,
        name=loaded.spec.name,
        nodes=nodes,
        per_node=per_node,
        runs_dir=args.runs_dir,
        cpus_per_task=args.cpus_per_task,
        # the spec's parallel.slurm, else --partition/--account/--qos/--time; --sbatch lines last
        extra_sbatch=(*loaded.spec.parallel.slurm.sbatch(_slurm_defaults(args)), *args.sbatch),
        gpus=loaded.spec.parallel.accelerator != "cpu",  # a CPU run asks SLURM for no GPUs
        run_dir=args.run_dir,
        run_args=tuple(run_args),
    )
    if args.output:
        Path(args.output).write_text(script)
        os.chmod(args.output, 0o755)
        print(f"wrote {args.output}: submit it with  sbatch {args.output}")
    else:
        print(script, end="")
    return 0


def _slurm_defaults(args) -> dict[str, str | None]:
    return {k: getattr(args, k) for k in ("partition", "account", "qos", "time")}


def add_commands(sub, spec_args) -> None:
    p = sub.add_parser("launch", help="print the torchrun command that runs a spec on N nodes x G devices")
    spec_args(p)
    p.add_argument("--print", action="store_true", help="print the command line (required)")
    layout_args(p, "--gpus-per-node")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--device-memory", type=float, metavar="GiB", help="check the memory estimate against it")
    p.set_defaults(fn=cmd_launch)

    p = sub.add_parser("slurm", help="write an sbatch script (srun, one task per GPU) that runs a spec")
    spec_args(p)
    p.add_argument("--nodes", type=int, help="default: the spec's parallel.num_nodes")
    p.add_argument(
        "--gpus-per-node", type=int, help="tasks (GPUs) per node; default: the spec's parallel.devices"
    )
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH line, e.g. --sbatch=--time=04:00:00",
    )
    p.add_argument("--runs-dir", default="runs")
    p.add_argument(
        "--run-dir",
        help="the run directory (default RUNS_DIR/NAME/slurm-$SLURM_JOB_ID); resumed when present",
    )
    for key in ("partition", "account", "qos", "time"):
        p.add_argument(f"--{key}", help=f"SLURM {key} where the spec's parallel.slurm.{key} is not set")
    p.add_argument("--as-path", help="resolve the spec's relative paths as if it lived here")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for the run")
    p.add_argument("--output", "-o", help="write the script here (default: stdout)")
    p.add_argument("--device-memory", type=float, metavar="GiB", help="check the memory estimate against it")
    p.set_defaults(fn=cmd_slurm)
