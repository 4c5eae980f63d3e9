// Small inline-SVG charts (no chart library): overlaid line curves, a layer x expert heatmap,
// a two-objective scatter with its Pareto front, and horizontal bars.
import { h } from "./dom";

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

function s<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number> = {}, ...kids: (Node | string)[]) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const kid of kids) el.append(kid);
  return el;
}

/** Tick labels without float noise: 5.4 not 5.400, 1e+6 as 1M-style exponent. */
function tick(v: number): string {
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(1);
  return String(Number(v.toPrecision(6)));
}

function ticks(lo: number, hi: number, n = 5): number[] {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= step0) ?? step0;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function extent(values: number[], pad = 0.05): [number, number] {
  const finite = values.filter(Number.isFinite);
  if (!finite.length) return [0, 1];
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (lo === hi) {
    lo -= Math.abs(lo) * 0.1 || 1;
    hi += Math.abs(hi) * 0.1 || 1;
  }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

interface Frame {
  svg: SVGSVGElement;
  x: (v: number) => number;
  y: (v: number) => number;
}

function axes(width: number, height: number, xr: [number, number], yr: [number, number], xlabel: string, ylabel: string): Frame {
  const m = { l: 56, r: 12, t: 10, b: 38 };
  const x = (v: number) => m.l + ((v - xr[0]) / (xr[1] - xr[0])) * (width - m.l - m.r);
  const y = (v: number) => height - m.b - ((v - yr[0]) / (yr[1] - yr[0])) * (height - m.t - m.b);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "chart" });
  for (const t of ticks(xr[0], xr[1])) {
    svg.append(s("line", { x1: x(t), x2: x(t), y1: m.t, y2: height - m.b, class: "grid" }));
    svg.append(s("text", { x: x(t), y: height - m.b + 14, "text-anchor": "middle", class: "tick" }, tick(t)));
  }
  for (const t of ticks(yr[0], yr[1])) {
    svg.append(s("line", { x1: m.l, x2: width - m.r, y1: y(t), y2: y(t), class: "grid" }));
    svg.append(s("text", { x: m.l - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, tick(t)));
  }
  svg.append(s("rect", { x: m.l, y: m.t, width: width - m.l - m.r, height: height - m.t - m.b, class: "frame" }));
  svg.append(s("text", { x: (m.l + width - m.r) / 2, y: height - 4, "text-anchor": "middle", class: "label" }, xlabel));
  svg.append(s("text", { x: 12, y: (m.t + height - m.b) / 2, "text-anchor": "middle", class: "label", transform: `rotate(-90 12 ${(m.t + height - m.b) / 2})` }, ylabel));
  return { svg, x, y };
}

export interface Series {
  label: string;
  points: [number, number][];
  color: string;
}

/** Overlaid curves of several runs for one metric. */
export function lineChart(title: string, series: Series[], width = 520, height = 280): HTMLElement {
  const all = series.flatMap((se) => se.points);
  const box = h("figure", { class: "chart-box", "data-chart": title });
  box.append(h("figcaption", {}, title));
  if (!all.length) {
    box.append(h("p", { class: "muted" }, "no data logged"));
    return box;
  }
  const f = axes(width, height, extent(all.map((p) => p[0]), 0), extent(all.map((p) => p[1])), "step", title);
  for (const se of series) {
    if (!se.points.length) continue;
    const d = se.points.map(([sx, sy], i) => `${i ? "L" : "M"}${f.x(sx).toFixed(1)},${f.y(sy).toFixed(1)}`).join("");
    f.svg.append(s("path", { d, class: "series", stroke: se.color, "data-series": se.label }, s("title", {}, se.label)));
    if (se.points.length <= 30) {
      for (const [sx, sy] of se.points) f.svg.append(s("circle", { cx: f.x(sx), cy: f.y(sy), r: 2.5, fill: se.color }));
    }
  }
  box.append(f.svg);
  box.append(
    h(
      "div",
      { class: "legend" },
      ...series.map((se) => h("span", { class: "legend-item" }, h("span", { class: "swatch", style: `background:${se.color}` }), " ", se.label)),
    ),
  );
  return box;
}

/** Blue (below uniform) - white (uniform 1/E) - red (above), so every heatmap shares one scale. */
function loadColor(frac: number, experts: number): string {
  const ratio = frac * experts; // 1 at perfect balance
  const t = Math.max(-1, Math.min(1, Math.log2(Math.max(ratio, 1e-6)) / 2)); // +-1 at 4x / 0.25x
  const mix = (a: number, b: number) => Math.round(a + (b - a) * Math.abs(t));
  return t >= 0 ? `rgb(255,${mix(255, 40)},${mix(255, 40)})` : `rgb(${mix(255, 37)},${mix(255, 99)},255)`;
}

/** layers x experts; each cell the fraction of the layer's routed tokens the expert received. */
export function heatmap(title: string, layers: string[], load: number[][], experts: number): HTMLElement {
  const cell = Math.max(14, Math.min(36, Math.floor(360 / Math.max(experts, 1))));
  const left = 64;
  const top = 22;
  const width = left + experts * cell + 8;
  const height = top + layers.length * cell + 8;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "chart heatmap" });
  for (let e = 0; e < experts; e++) {
    if (experts <= 32 || e % 4 === 0) svg.append(s("text", { x: left + e * cell + cell / 2, y: top - 6, "text-anchor": "middle", class: "tick" }, String(e)));
  }
  layers.forEach((layer, li) => {
    svg.append(s("text", { x: left - 6, y: top + li * cell + cell / 2 + 4, "text-anchor": "end", class: "tick" }, layer));
    (load[li] ?? []).forEach((frac, e) => {
      svg.append(
        s(
          "rect",
          { x: left + e * cell, y: top + li * cell, width: cell - 1, height: cell - 1, fill: loadColor(frac, experts), class: "cell" },
          s("title", {}, `${layer} expert ${e}: ${(100 * frac).toFixed(1)}% of tokens (uniform ${(100 / experts).toFixed(1)}%)`),
        ),
      );
      if (cell >= 30) {
        const dark = Math.abs(Math.log2(Math.max(frac * experts, 1e-6))) > 1.2;
        svg.append(
          s("text", { x: left + e * cell + cell / 2, y: top + li * cell + cell / 2 + 4, "text-anchor": "middle", class: `cell-label${dark ? " dark" : ""}` }, (100 * frac).toFixed(0)),
        );
      }
    });
  });
  return h("figure", { class: "chart-box", "data-heatmap": title }, h("figcaption", {}, title), svg);
}

export function heatmapLegend(): HTMLElement {
  const stops = [0.25, 0.5, 1, 2, 4].map((r) =>
    h("span", { class: "legend-cell", style: `background:${loadColor(r / 8, 8)}` }, `${r}×`),
  );
  return h("div", { class: "legend" }, "cells: % of the layer's routed tokens; colour: load relative to uniform ", ...stops);
}

export interface Point {
  x: number;
  y: number;
  label: string;
  front: boolean;
  href?: string;
}

/** Trials of a two-objective study; the Pareto front highlighted and joined. */
export function scatter(title: string, xlabel: string, ylabel: string, points: Point[], width = 520, height = 320): HTMLElement {
  const box = h("figure", { class: "chart-box", "data-chart": title }, h("figcaption", {}, title));
  if (!points.length) {
    box.append(h("p", { class: "muted" }, "no finished trials"));
    return box;
  }
  const f = axes(width, height, extent(points.map((p) => p.x)), extent(points.map((p) => p.y)), xlabel, ylabel);
  const front = points.filter((p) => p.front).sort((a, b) => a.x - b.x);
  if (front.length > 1) {
    const d = front.map((p, i) => `${i ? "L" : "M"}${f.x(p.x).toFixed(1)},${f.y(p.y).toFixed(1)}`).join("");
    f.svg.append(s("path", { d, class: "front-line" }));
  }
  for (const p of points) {
    const dot = s("circle", { cx: f.x(p.x), cy: f.y(p.y), r: p.front ? 6 : 4, class: p.front ? "dot front" : "dot" }, s("title", {}, p.label));
    if (p.href) {
      const a = s("a", { href: p.href, target: "_blank" }, dot);
      f.svg.append(a);
    } else f.svg.append(dot);
  }
  box.append(f.svg);
  return box;
}

export function bars(title: string, values: Record<string, number>): HTMLElement {
  const entries = Object.entries(values).sort((a, b) => b[1] - a[1]);
  const box = h("figure", { class: "chart-box", "data-chart": title }, h("figcaption", {}, title));
  if (!entries.length) {
    box.append(h("p", { class: "muted" }, "not enough finished trials for importances"));
    return box;
  }
  const max = Math.max(...entries.map((e) => e[1]), 1e-12);
  box.append(
    h(
      "div",
      { class: "bars" },
      ...entries.map(([k, v]) =>
        h(
          "div",
          { class: "bar-row" },
          h("span", { class: "bar-label", title: k }, k),
          h("span", { class: "bar-track" }, h("span", { class: "bar", style: `width:${((100 * v) / max).toFixed(1)}%` })),
          h("span", { class: "bar-value" }, v.toFixed(3)),
        ),
      ),
    ),
  );
  return box;
}
