"""`moeplat eval RUN_ID`: rebuild a run's final model from its MLflow model/ artifact and print val loss;
`moeplat eval RUN --tasks T1,T2`: score it on lm-evaluation-harness tasks instead (moeplat.cli.eval_tasks)."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path


def cmd_eval(args) -> int:
    if args.tasks is not None:
        from moeplat.cli.eval_tasks import cmd_eval_tasks

        return cmd_eval_tasks(args)
    from moeplat.track.mlflow_run import resolve_tracking_uri
    from moeplat.track.model_store import RunNotFound, download_model, register_model

    val_tokens = args.val_tokens
    if val_tokens is not None and val_tokens != "all":
        if not val_tokens.isdigit() or int(val_tokens) < 1:
            print("error: --val-tokens must be a positive number of tokens or 'all'", file=sys.stderr)
            return 2
        val_tokens = int(val_tokens)
    uri = resolve_tracking_uri(args.tracking_uri, None)
    with tempfile.TemporaryDirectory(prefix="moeplat-eval-") as tmp:
        try:
            model_dir, run = download_model(uri, args.run_id, tmp)
        except RunNotFound as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        from moeplat.train.model_artifact import evaluate, load_model_artifact

        spec, model, meta = load_model_artifact(model_dir)
        base_dir = args.data_dir or meta["base_dir"]
        if not Path(base_dir).is_dir():
            print(f"error: the run's data directory {base_dir} is not here: pass --data-dir", file=sys.stderr)
            return 2
        if isinstance(val_tokens, int) and val_tokens < spec.data.seq_len:
            print(f"error: --val-tokens must be at least one sequence ({spec.data.seq_len})", file=sys.stderr)
            return 2
        val_tokens = val_tokens or spec.data.val_tokens
        loss = evaluate(spec, model, base_dir, val_tokens)
    version = register_model(uri, args.run_id, args.register) if args.register else None
    result = {
        "run_id": args.run_id,
        "run_name": run.info.run_name,
        "step": meta["step"],
        "val_tokens": val_tokens,
        "val/loss": loss,
        "val/ppl": math.exp(min(loss, 50.0)),
        "logged_val/loss": run.data.metrics.get("val/loss"),
    }
    if version is not None:
        result["registered"] = f"{args.register} version {version}"
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"run {args.run_id} ({run.info.run_name}), step {meta['step']}, validation tokens per source: {val_tokens}"
    )
    print(f"val/loss {loss:.6f}  val/ppl {result['val/ppl']:.4f}")
    if version is not None:
        print(f"registered as model {args.register!r} version {version}")
    return 0


def add_commands(sub) -> None:
    from moeplat.cli.eval_tasks import add_task_options

    p = sub.add_parser(
        "eval", help="a run's final model: its validation loss, or lm-evaluation-harness tasks (--tasks)"
    )
    p.add_argument(
        "run_id",
        metavar="RUN",
        help="MLflow run id (of a finished `moeplat run`); with --tasks also a run directory, "
        "a .ckpt of one, or a model/ directory",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"
    )
    p.add_argument(
        "--val-tokens",
        metavar="N|all",
        help="validation tokens per source, or all (default: the spec's data.val_tokens)",
    )
    p.add_argument(
        "--data-dir", help="directory the spec's relative data paths resolve against (default: the run's)"
    )
    p.add_argument("--register", metavar="NAME", help="also register the model in the MLflow model registry")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_task_options(p)
    p.set_defaults(fn=cmd_eval)
