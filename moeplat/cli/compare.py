"""`moeplat compare`: the spec differences and key metrics of some runs, as a table, as JSON, or
as a self-contained HTML report (loss curves overlaid, final expert-load heatmaps side by side)."""

from __future__ import annotations

import base64
import html
import io
import json
import sys
import textwrap


def _cell(value: object, label: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if label == "last logged step":
            return str(int(value))
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def table_rows(c) -> list[list[str]]:
    """Header, the differing params, a separator (None), then the key metrics."""
    rows: list[list[str]] = [["", *(r.label for r in c.runs)]]
    rows += [[k, *(_cell(v) for v in vals)] for k, vals in c.params.items()]
    rows.append(None)
    rows += [[k, *(_cell(v, k) for v in vals)] for k, vals in c.metrics.items()]
    return rows


def format_table(c) -> str:
    rows = table_rows(c)
    cols = len(rows[0])
    widths = [max(len(r[i]) for r in rows if r is not None) for i in range(cols)]
    rule = "  ".join("-" * w for w in widths)

    def line(r: list[str]) -> str:
        first = r[0].ljust(widths[0])
        return "  ".join([first, *(v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True))]).rstrip()

    out = [line(rows[0]), rule]
    if not c.params:
        out.append("(the resolved specs are identical)" if len(c.runs) > 1 else "(one run: nothing to diff)")
    out += [rule if r is None else line(r) for r in rows[1:]]
    return "\n".join(out)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _curves_png(c) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    for ax, key in zip(fig.subplots(1, 2), ("train/loss", "val/loss"), strict=True):
        for r in c.runs:
            pts = r.curves.get(key, [])
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 20 else None, label=r.label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel("nats/token")
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize="small")
    return _png(fig)


def _loads_png(c) -> str | None:
    """Final load fraction per (MoE layer, expert), one panel per run on one colour scale."""
    from matplotlib.figure import Figure

    runs = [r for r in c.runs if r.load_LE]
    if not runs:
        return None
    vmax = max(max(row) for r in runs for row in r.load_LE)
    fig = Figure(figsize=(3.6 * len(runs) + 1, 0.5 * max(len(r.load_LE) for r in runs) + 2))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, r in zip(axes, runs, strict=True):
        im = ax.imshow(r.load_LE, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(textwrap.fill(r.label, 32), fontsize="small")
        ax.set_xticks(range(len(r.load_LE[0])))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(r.load_layers)), [str(i) for i in r.load_layers])
    fig.colorbar(im, ax=list(axes), label="load fraction (last logged)")
    return _png(fig)


def html_report(c) -> str:
    rows = table_rows(c)
    head = "".join(f"<th>{html.escape(v)}</th>" for v in rows[0])
    body = []
    for r in rows[1:]:
        if r is None:
            body.append(f'<tr class="sep"><td colspan="{len(rows[0])}"></td></tr>')
        else:
            body.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>")
    loads = _loads_png(c)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>moeplat compare</title><style>",
        "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse}",
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child{text-align:left}",
        "tr.sep td{background:#eee;padding:1px}</style></head><body>",
        "<h1>moeplat compare</h1><h2>Spec differences and key metrics</h2>",
        f"<table><tr>{head}</tr>{''.join(body)}</table>",
        "<h2>Loss curves</h2>",
        f"<img alt='loss curves' src='data:image/png;base64,{_curves_png(c)}'>",
    ]
    if loads:
        parts += [
            "<h2>Final expert load</h2>",
            f"<img alt='expert load heatmaps' src='data:image/png;base64,{loads}'>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def cmd_compare(args) -> int:
    from moeplat.track.compare import CompareError, compare
    from moeplat.track.mlflow_run import resolve_tracking_uri

    if args.report and not args.report.lower().endswith((".html", ".htm")):
        print(f"error: --report writes HTML: name a .html file (got {args.report!r})", file=sys.stderr)
        return 2
    if args.max_runs < 1:
        print("error: --max-runs must be at least 1", file=sys.stderr)
        return 2
    filters = [args.filter] if args.filter else []
    for kv in args.tags:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            print(f"error: --tag takes KEY=VALUE (got {kv!r})", file=sys.stderr)
            return 2
        filters.append(f"tags.`{key}` = '{value}'")
    try:
        c = compare(
            resolve_tracking_uri(args.tracking_uri, None),
            run_ids=args.run_ids,
            experiments=args.experiments,
            filter_string=" and ".join(filters),
            max_runs=args.max_runs,
        )
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if c.more:
        print(f"note: more runs matched; showing the {args.max_runs} newest (--max-runs)", file=sys.stderr)
    print(json.dumps(c.to_dict(), indent=2) if args.json else format_table(c))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(html_report(c))
        print(f"wrote {args.report}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("compare", help="spec differences and key metrics of runs; HTML report with curves")
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="MLflow run ids")
    p.add_argument(
        "--experiment", dest="experiments", action="append", default=[], help="runs of this experiment"
    )
    p.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="runs carrying this tag, e.g. --tag moeplat.router=topk (repeatable)",
    )
    p.add_argument("--filter", help="MLflow filter string, e.g. \"params.`model.moe.top_k` = '2'\"")
    p.add_argument("--max-runs", type=int, default=10, help="newest runs kept from a search (default 10)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"
    )
    p.add_argument("--json", action="store_true", help="the table as JSON")
    p.add_argument("--report", metavar="PATH.html", help="also write a self-contained HTML report")
    p.set_defaults(fn=cmd_compare)
