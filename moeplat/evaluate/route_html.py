"""The routing view: one self-contained HTML page (inline CSS and JS, no external assets) of a RouteTable.

The text is written once, one <span class="t" data-i=...> per token; a layer selector colours each
span by its heaviest expert in that layer (a fixed categorical palette, so expert 3 has the same
colour in every layer and every run) and sets its tooltip to every chosen expert with its weight.
Below, per layer, the legend (expert id, colour, load) and each expert's top tokens by count and by
lift. The text is user data: everything is escaped, and the routing data sits in a JSON script
element whose "<" are written as \\u003c, so no text can close it or become markup.
"""

from __future__ import annotations

import html
import json

from moeplat.evaluate.route import LayerRoute, RouteTable, TopToken

# Tableau 20 (categorical, colour-blind aware in its first ten); beyond 20 experts: golden-angle hues
PALETTE = [
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
    "#a0cbe8",
    "#ffbe7d",
    "#ff9d9a",
    "#86bcb6",
    "#8cd17d",
    "#f1ce63",
    "#d4a6c8",
    "#fabfd2",
    "#d7b5a6",
    "#79706e",
]
NO_EXPERT = "#ffffff"

CSS = """
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222}
#text{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;word-break:break-all;
 border:1px solid #ccc;padding:.6em;max-height:60vh;overflow:auto}
.t{border-radius:2px}.t.none{outline:1px dotted #999}
.t.mid{display:inline-block;width:3px;height:1em;vertical-align:middle;background:#bbb}
.sw{display:inline-block;width:1em;height:1em;vertical-align:middle;border:1px solid #888}
table{border-collapse:collapse;margin:.4em 1.2em .8em 0;font-size:12px}
td,th{border:1px solid #ddd;padding:1px 6px;text-align:left}
.tok{font-family:ui-monospace,monospace;white-space:pre;background:#f4f4f4}
.experts{display:flex;flex-wrap:wrap;gap:0 1.5em}.muted{color:#777}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:4px 7px;border-radius:3px;
 font:12px ui-monospace,monospace;white-space:pre;display:none}
"""

JS = """
const data = JSON.parse(document.getElementById('route-data').textContent);
const palette = data.palette, spans = document.querySelectorAll('#text .t');
const select = document.getElementById('layer'), tip = document.getElementById('tip');
function colour(e) { return e < 0 ? '#ffffff' : e < palette.length ? palette[e]
  : 'hsl(' + ((e * 137.508) % 360) + ',55%,70%)'; }
let layer = data.layers[0];
function show(k) {
  layer = data.layers[k];
  spans.forEach((s, i) => {
    const ex = layer.experts[i];
    s.style.background = colour(ex.length ? ex[0] : -1);
    s.classList.toggle('none', !ex.length);
  });
  document.querySelectorAll('section.layer').forEach(
    (el) => { el.hidden = el.dataset.layer !== String(layer.layer); });
}
function tipText(i) {
  const ex = layer.experts[i], w = layer.weights[i], dr = layer.dropped[i];
  const lines = ['token ' + i + ' ' + JSON.stringify(data.labels[data.ids[i]])
    + ' (id ' + data.ids[i] + '), layer ' + layer.layer];
  ex.forEach((e, j) => lines.push('expert ' + e + '  ' + w[j].toFixed(3)));
  if (!ex.length) lines.push('no expert (residual only)');
  dr.forEach((e) => lines.push('expert ' + e + '  dropped (capacity)'));
  return lines.join('\\n');
}
document.getElementById('text').addEventListener('mousemove', (ev) => {
  const s = ev.target.closest('.t');
  if (!s) { tip.style.display = 'none'; return; }
  tip.textContent = tipText(Number(s.dataset.i));
  tip.style.display = 'block';
  tip.style.left = Math.min(ev.clientX + 12, innerWidth - tip.offsetWidth - 4) + 'px';
  tip.style.top = (ev.clientY + 14) + 'px';
});
document.getElementById('text').addEventListener('mouseleave', () => { tip.style.display = 'none'; });
select.addEventListener('change', () => show(Number(select.value)));
show(0);
document.body.dataset.ready = '1';
"""


def colour(e: int) -> str:
    if e < 0:
        return NO_EXPERT
    return PALETTE[e] if e < len(PALETTE) else f"hsl({(e * 137.508) % 360:.1f},55%,70%)"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _script_json(data: dict) -> str:
    """JSON that cannot end its <script> element nor open a comment: <, > and & as \\u escapes."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _spans(table: RouteTable) -> str:
    out = []
    for i, piece in enumerate(table.pieces):
        cls = "t" if piece else "t mid"  # "" = a token inside a multi-byte character
        out.append(f'<span class="{cls}" data-i="{i}">{_esc(piece)}</span>')
    return "".join(out)


_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def visible(token: str) -> str:
    """A token label whose whitespace shows: a table cell of one space would look empty."""
    return token.translate(_VISIBLE) if token.strip() != token or not token else token


def _tops(title: str, rows: list[TopToken], lift: bool) -> str:
    head = "<tr><th>token</th><th>count</th>" + ("<th>lift</th>" if lift else "") + "</tr>"
    body = "".join(
        f'<tr><td class="tok">{_esc(visible(t.token))}</td><td>{t.count}</td>'
        + (f"<td>{t.lift:.2f}</td>" if lift else "")
        + "</tr>"
        for t in rows
    )
    return f"<table><caption>{title}</caption>{head}{body or '<tr><td colspan=3>none</td></tr>'}</table>"


def _layer_section(lr: LayerRoute) -> str:
    unrouted = sum(1 for e in lr.experts if not e)
    note = f" · {unrouted} tokens went to no expert" if unrouted else ""
    experts = []
    for e in range(lr.num_experts):
        experts.append(
            f'<div class="expert" data-expert="{e}"><h3><span class="sw" style="background:{colour(e)}">'
            f"</span> expert {e} <span class=muted>load {100 * lr.load[e]:.1f}%</span></h3>"
            f"{_tops('by count', lr.top_count[e], False)}{_tops('by lift', lr.top_lift[e], True)}</div>"
        )
    return (
        f'<section class="layer" data-layer="{lr.layer}"><h2>Layer {lr.layer} '
        f"<span class=muted>({_esc(lr.router)}, {lr.num_experts} experts{note})</span></h2>"
        f'<div class="experts">{"".join(experts)}</div></section>'
    )


def render_html(table: RouteTable, title: str = "moeplat routing") -> str:
    """The page (see the module docstring)."""
    options = "".join(
        f'<option value="{k}">layer {lr.layer} ({_esc(lr.router)}, {lr.num_experts} experts)</option>'
        for k, lr in enumerate(table.layers)
    )
    data = {**table.to_json(), "palette": list(PALETTE)}
    for layer in data["layers"]:  # the tables are rendered below; the script needs the decisions only
        del layer["top_count"], layer["top_lift"]
    cut = " (cut at --max-tokens)" if table.truncated else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1><p class=muted>{_esc(table.source)} · {len(table.ids)} tokens{cut}"
        f" · windows of {table.window} tokens · colour: each token's heaviest expert; hover for all</p>"
        f'<p><label>Layer <select id="layer">{options}</select></label></p>'
        f'<div id="text">{_spans(table)}</div><div id="tip"></div>'
        f"{''.join(_layer_section(lr) for lr in table.layers)}"
        f'<script type="application/json" id="route-data">{_script_json(data)}</script>'
        f"<script>{JS}</script></body></html>"
    )
