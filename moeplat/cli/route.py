"""`moeplat route RUN --text FILE`: which experts each MoE layer chose for every token of a text.

Prints a short summary per layer (each expert's load and top tokens), writes the HTML view
(moeplat.evaluate.route_html) and, with --json, prints the whole table as JSON instead of the
summary. --log stores route.html and route.json in the run's MLflow artifacts under routing/,
where the web UI's run page shows them. docs/routing.md has the reading guide.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARTIFACT_DIR = "routing"
DEFAULT_MAX_TOKENS = 4096  # a view of a few thousand tokens stays a quick page
SUMMARY_TOKENS = 5  # top tokens per expert in the printed summary


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_route(args) -> int:
    if args.max_tokens < 1:
        return _fail("--max-tokens must be a positive number of tokens")
    if args.text is not None and not Path(args.text).is_file():
        return _fail(f"--text {args.text}: no such file (give a UTF-8 text file to route)")
    from moeplat.evaluate.load import ModelNotFound, load_trained
    from moeplat.evaluate.route import NoMoELayers, route_text
    from moeplat.evaluate.route_html import render_html

    try:
        loaded = load_trained(args.run, args.tracking_uri)
    except ModelNotFound as e:
        return _fail(str(e))
    if args.log and loaded.run_id is None:
        return _fail(f"--log needs the MLflow run of {loaded.source}: pass its run id (or its run directory)")
    text, what = _text(args, loaded)
    if not text:
        return _fail(f"{what} is empty: give a text with at least one token")
    try:
        table = route_text(loaded.model, loaded.tok, text, max_tokens=args.max_tokens, source=what)
    except NoMoELayers as e:
        return _fail(f"{loaded.source}: {e}")
    table.meta.update(run_id=loaded.run_id, step=loaded.meta.get("step"), model=loaded.source)
    page = render_html(table, title=f"routing of {loaded.meta.get('spec_name') or loaded.source}")
    out = Path(args.output)
    out.write_text(page, encoding="utf-8")
    data = json.dumps(table.to_json(), ensure_ascii=False)
    if args.json:
        print(data)
    else:
        print(summary(table))
        print(f"wrote {out}")
    if args.log:
        _log(loaded, args.tracking_uri, page, data)
    return 0


def _text(args, loaded) -> tuple[str, str]:
    """(text to route, what it is) from --text FILE, or the run's own validation text."""
    if args.text is not None:
        return Path(args.text).read_text(encoding="utf-8", errors="replace"), f"text {args.text}"
    from moeplat.evaluate.route import validation_text

    base_dir = args.data_dir or loaded.meta.get("base_dir", ".")
    return validation_text(loaded.spec, base_dir, 16 * args.max_tokens), "the run's validation text"


def _log(loaded, tracking_uri: str | None, page: str, data: str) -> None:
    from moeplat.track.artifacts import log_texts
    from moeplat.track.mlflow_run import resolve_tracking_uri

    paths = log_texts(
        resolve_tracking_uri(tracking_uri or loaded.tracking_uri, None),
        loaded.run_id,
        ARTIFACT_DIR,
        {"route.html": page, "route.json": data},
    )
    print(f"logged {', '.join(paths)} to run {loaded.run_id}", file=sys.stderr)


def summary(table) -> str:
    """Per layer: each expert's load and its top tokens by count, then by lift."""
    lines = [f"{len(table.ids)} tokens{' (cut at --max-tokens)' if table.truncated else ''}, {table.source}"]
    for lr in table.layers:
        unrouted = sum(1 for e in lr.experts if not e)
        extra = f", {unrouted} tokens to no expert" if unrouted else ""
        lines.append(f"layer {lr.layer} ({lr.router}, {lr.num_experts} experts{extra})")
        for e in range(lr.num_experts):
            count = " ".join(f"{t.token!r}:{t.count}" for t in lr.top_count[e][:SUMMARY_TOKENS])
            lift = " ".join(f"{t.token!r}:{t.lift:.1f}" for t in lr.top_lift[e][:SUMMARY_TOKENS])
            lines.append(f"  e{e:<3} load {100 * lr.load[e]:5.1f}%  top {count or '-'}  lift {lift or '-'}")
    return "\n".join(lines)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "route", help="per token, the experts each MoE layer chose: a summary and an HTML view"
    )
    p.add_argument("run", metavar="RUN", help="MLflow run id, run directory, .ckpt or model/ directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="the text to route (UTF-8)")
    src.add_argument("--val-text", action="store_true", help="route the run's own validation text")
    p.add_argument("-o", "--output", default="route.html", help="the HTML view (default: route.html)")
    p.add_argument("--json", action="store_true", help="print the whole table as JSON, not the summary")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"route the first N tokens (default {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--log", action="store_true", help="store route.html and route.json in the run (routing/)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"
    )
    p.add_argument(
        "--data-dir",
        help="with --val-text: where the spec's relative data paths resolve (default: the run's)",
    )
    p.set_defaults(fn=cmd_route)
