"""`moeplat eval RUN --tasks T1,T2`: a run's final model on lm-evaluation-harness tasks
(moeplat.evaluate.harness); the metrics are printed and logged into the run's MLflow run as
eval/<task>/<metric> at the step the model was saved."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _usage(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _task_list(text: str) -> list[str] | None:
    tasks = [t.strip() for t in text.split(",")]
    return tasks if all(tasks) and len(set(tasks)) == len(tasks) else None


def _options_problem(args) -> str | None:
    if _task_list(args.tasks) is None:
        return "--tasks takes task names separated by commas, each once (e.g. --tasks hellaswag,arc_easy)"
    for flag in ("val_tokens", "data_dir", "register"):
        if getattr(args, flag, None) is not None:
            return f"--{flag.replace('_', '-')} belongs to the validation-loss evaluation: leave it out with --tasks"
    if args.include_path is not None and not Path(args.include_path).is_dir():
        return f"--include-path {args.include_path}: no such directory (of task YAML files)"
    if args.num_fewshot is not None and args.num_fewshot < 0:
        return "--num-fewshot must be >= 0"
    if args.limit is not None and args.limit < 1:
        return "--limit must be a positive number of documents per task"
    if args.batch_size < 1:
        return "--batch-size must be >= 1"
    return None


def cmd_eval_tasks(args) -> int:
    problem = _options_problem(args)
    if problem:
        return _usage(problem)
    from moeplat.evaluate.harness import UnknownTask, default_device, eval_metrics, run_tasks
    from moeplat.evaluate.load import ModelNotFound, load_trained

    tasks = _task_list(args.tasks)
    try:
        loaded = load_trained(args.run_id, args.tracking_uri)
        results = run_tasks(
            loaded,
            tasks,
            include_path=args.include_path,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device or default_device(),
        )
    except (ModelNotFound, UnknownTask) as e:
        return _usage(str(e))
    except (OSError, ValueError) as e:  # a task's data unreachable or unreadable, a request too long
        hint = " (a task's data comes from the Hugging Face Hub on first use: it needs internet access once)"
        print(f"error: {e}{hint if isinstance(e, ConnectionError) else ''}", file=sys.stderr)
        return 1
    step = loaded.meta.get("step")
    logged = None
    if not args.no_log and loaded.run_id and loaded.tracking_uri:
        logged = _log(loaded, eval_metrics(results), step, tasks, args)
    if args.json:
        out = {"source": loaded.source, "run_id": loaded.run_id, "step": step, "results": results}
        print(json.dumps({**out, "logged_to": logged}, indent=2))
        return 0
    print(f"{loaded.source}, step {step}")
    print(format_results(results))
    if logged:
        print(f"logged as eval/<task>/<metric> at step {step} into run {loaded.run_id} ({logged})")
    elif not args.no_log:
        print("not logged: no MLflow run is known for this model (pass a run id, or a run directory)")
    return 0


def _log(loaded, metrics: dict[str, float], step, tasks: list[str], args) -> str:
    """Log into the model's MLflow run; the tags say how each task was run (a --limit or few-shot
    score is not comparable to a full zero-shot one)."""
    from importlib.metadata import version

    from moeplat.track.model_store import log_metrics_to_run

    how = json.dumps({"num_fewshot": args.num_fewshot, "limit": args.limit, "lm_eval": version("lm_eval")})
    tags = {f"moeplat.eval.{t}": how for t in tasks}
    log_metrics_to_run(loaded.tracking_uri, loaded.run_id, metrics, step or 0, tags)
    return loaded.tracking_uri


def format_results(results: dict[str, dict[str, float]]) -> str:
    """task, metric, value, stderr: one line per metric (stderr beside its metric)."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or "_stderr/" in name:
                continue
            err = metrics.get(name.replace("/", "_stderr/", 1) if "/" in name else f"{name}_stderr")
            rows.append((task, name, _num(value), "-" if err is None else _num(err)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(
            [
                r[0].ljust(widths[0]),
                r[1].ljust(widths[1]),
                *(v.rjust(w) for v, w in zip(r[2:], widths[2:], strict=True)),
            ]
        )
        for r in rows
    ]
    return "\n".join(lines)


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"  # a tiny model's word perplexity is huge


def add_task_options(p) -> None:
    g = p.add_argument_group("downstream tasks (lm-evaluation-harness)")
    g.add_argument(
        "--tasks", metavar="T1,T2", help="evaluate on these lm-eval tasks instead of validation loss"
    )
    g.add_argument("--include-path", metavar="DIR", help="directory of custom task YAML files")
    g.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples (default: each task's)")
    g.add_argument("--limit", type=int, metavar="N", help="at most N documents per task (a quick look)")
    g.add_argument(
        "--batch-size", type=int, default=16, help="requests per forward (default 16; 1 = each alone)"
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    g.add_argument("--seed", type=int, default=0, help="few-shot sampling and generation seed (default 0)")
    g.add_argument("--no-log", action="store_true", help="do not log eval/<task>/<metric> into the run")


def final_eval_hook(spec):
    """What `moeplat run` hands moeplat.train.run for train.eval (None without it). The task names
    are looked up now, so that a typo is a spec error before training rather than after it."""
    if spec.train.eval is None:
        return None
    from moeplat.errors import SpecError, SpecIssue
    from moeplat.evaluate.harness import UnknownTask, end_of_run, task_manager

    try:
        task_manager(spec.train.eval.tasks, spec.train.eval.include_dir)
    except UnknownTask as e:
        raise SpecError(SpecIssue("train.eval.tasks", str(e))) from None
    return end_of_run
