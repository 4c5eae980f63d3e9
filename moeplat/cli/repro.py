"""`moeplat repro`: train the runs the findings need (several seeds, one MLflow experiment) and
write the results page (docs/results.md by default)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path


def _seeds(text: str) -> list[int]:
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError("--seeds needs at least two different non-negative seeds, e.g. 0,1,2")
    return seeds


def cmd_repro(args) -> int:
    from moeplat.repro.findings import FINDINGS, LR_GRID, lr_variant
    from moeplat.track.mlflow_run import resolve_tracking_uri

    try:
        seeds = _seeds(args.seeds or ("0,1" if args.quick else "0,1,2"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    known = {f.key: f for f in FINDINGS}
    wanted = [k.strip() for k in args.only.split(",")] if args.only else list(known)
    unknown = [k for k in wanted if k not in known]
    if unknown:
        print(f"error: --only: unknown finding(s) {unknown}; choose from {sorted(known)}", file=sys.stderr)
        return 2
    findings = [known[k] for k in wanted]
    from moeplat.repro.report import results_page
    from moeplat.repro.runner import run_all

    uri = resolve_tracking_uri(args.tracking_uri, None)
    pairs = [(v, s) for v in dict.fromkeys(v for f in findings for v in f.variants) for s in seeds]
    pairs += [(lr_variant(v, lr), seeds[0]) for f in findings for v in f.lr_sweep for lr in LR_GRID]
    records = run_all(
        pairs, quick=args.quick, tracking_uri=uri, runs_root=Path(args.runs_dir), jobs=args.jobs
    )
    page = results_page(findings, records, seeds, _header(args, seeds, uri))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(page)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _header(args, seeds: list[int], uri: str) -> str:
    import torch

    try:
        git = ["git", "-C", str(Path(__file__).resolve().parents[2]), "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    scale = (
        "reduced (`--quick`: a 2-layer d 64 model, 40 steps)"
        if args.quick
        else "the quick-start's (600 steps)"
    )
    return "\n".join(
        [
            "# Results: the field's MoE findings at quick-start scale",
            "",
            f"Regenerate with `moeplat repro{' --quick' if args.quick else ''}` (runs already finished in the "
            "tracking store are reused). Every variant is the quick-start with only the setting the "
            "finding is about changed; nothing is tuned per finding. Mean ± sample standard deviation "
            f"over seeds {', '.join(map(str, seeds))}; MaxVio, experts per token and specialisation are means "
            "over the last 20% of logged steps. A verdict compares the means and says on how many seeds the "
            "difference has the claimed sign; where a finding does not reproduce, the numbers stand. "
            "On a CPU the figures depend a little on how many threads a run used (the order of its "
            "floating-point sums): `--jobs N` trains each run on the CPUs / N threads.",
            "",
            f"Scale: {scale}. Generated {date.today().isoformat()} at commit {commit or 'unknown'} with torch "
            f"{torch.__version__} on {platform.machine()} with {os.cpu_count()} CPUs; runs in {uri}.",
        ]
    )


def add_commands(sub) -> None:
    p = sub.add_parser("repro", help="reproduce the field's MoE findings (several seeds) into a results page")
    p.add_argument("--quick", action="store_true", help="a reduced version (small model, few steps; for CI)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0,1)")
    p.add_argument("--only", help="comma-separated finding keys (default: all)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, CPU threads split between them (default 1)"
    )
    p.add_argument("-o", "--output", default="docs/results.md", help="results page (default docs/results.md)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default runs/)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"
    )
    p.set_defaults(fn=cmd_repro)
