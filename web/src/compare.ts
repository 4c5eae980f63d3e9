// Page 3, compare: runs chosen by id, by job or by study; overlaid train/val loss curves,
// expert-load heatmaps side by side, and for a sweep's study the Pareto front and importances.
import { api, messageOf, type RunSummary, type Study } from "./api";
import { bars, heatmap, heatmapLegend, lineChart, PALETTE, type Point, scatter, type Series } from "./charts";
import { clear, h, link, num } from "./dom";

// val/bpb (bits per UTF-8 byte) compares runs with different tokenizers; val/loss does not.
const CURVE_KEYS = ["train/loss", "val/loss", "val/bpb"];
const MAX_RUNS = PALETTE.length;

export function comparePage(root: HTMLElement, params: URLSearchParams): () => void {
  const runsInput = h("input", { id: "run-ids", placeholder: "run ids, comma-separated", value: params.get("runs") ?? "", size: 40 });
  const jobInput = h("input", { id: "job-id", placeholder: "job id", value: params.get("job") ?? "", size: 6 });
  const studyInput = h("input", { id: "study-name", placeholder: "study name", value: params.get("study") ?? "", size: 18 });
  const go = h("button", { type: "submit", class: "primary" }, "Compare");
  const out = h("div", { id: "compare-out" });
  const form = h(
    "form",
    { class: "toolbar" },
    h("h1", {}, "Compare"),
    h("label", {}, "runs ", runsInput),
    h("label", {}, "or job ", jobInput),
    h("label", {}, "study ", studyInput),
    go,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if ((runsInput as HTMLInputElement).value.trim()) q.set("runs", (runsInput as HTMLInputElement).value.replace(/\s+/g, ""));
    if ((jobInput as HTMLInputElement).value.trim()) q.set("job", (jobInput as HTMLInputElement).value.trim());
    if ((studyInput as HTMLInputElement).value.trim()) q.set("study", (studyInput as HTMLInputElement).value.trim());
    location.hash = `#/compare?${q}`;
  });
  clear(root, h("div", { class: "page" }, form, out));

  let alive = true;
  void (async () => {
    try {
      await render(out, params, () => alive);
    } catch (e) {
      out.append(h("p", { class: "error" }, messageOf(e)));
    }
    if (alive) root.dataset.ready = "compare";
  })();
  return () => {
    alive = false;
  };
}

async function render(out: HTMLElement, params: URLSearchParams, alive: () => boolean): Promise<void> {
  const runIds = (params.get("runs") ?? "").split(",").filter(Boolean);
  const job = params.get("job");
  const studyNames = params.get("study") ? [params.get("study")!] : [];
  let runs: RunSummary[] = [];
  if (job) {
    const [jr, js] = await Promise.all([api.jobRuns(Number(job)), api.jobStudies(Number(job))]);
    runs = jr.runs;
    for (const st of js.studies) if (!studyNames.includes(st.name)) studyNames.push(st.name);
  }
  if (runIds.length) {
    const known = new Set(runs.map((r) => r.run_id));
    const more = (await api.runs(runIds.filter((id) => !known.has(id)))).runs;
    runs = [...runs, ...more];
  }
  if (!alive()) return;
  if (!runs.length && !studyNames.length) {
    clear(out, h("p", { class: "muted" }, "Choose runs by id, a job, or a study above (a job's page links here)."));
    return;
  }
  // a sweep's parent run holds no curves of its own: compare its trials
  const trials = runs.filter((r) => !isParent(r, runs));
  const shown = trials.slice(0, MAX_RUNS);
  clear(out);
  if (shown.length) {
    out.append(h("h2", {}, "Runs"), runsTable(shown, trials.length));
    const curves = h("div", { class: "row", id: "curves" }, h("p", { class: "muted" }, "loading curves…"));
    const maps = h("div", { class: "row", id: "heatmaps" }, h("p", { class: "muted" }, "loading expert load…"));
    out.append(h("h2", {}, "Loss curves"), curves, h("h2", {}, "Expert load (layer × expert)"), heatmapLegend(), maps);
    await Promise.all([renderCurves(curves, shown), renderHeatmaps(maps, shown)]);
  }
  for (const name of studyNames) {
    if (!alive()) return;
    const section = h("section", { class: "study", "data-study": name }, h("h2", {}, `Study ${name}`));
    out.append(section);
    try {
      renderStudy(section, await api.study(name), runs);
    } catch (e) {
      section.append(h("p", { class: "error" }, messageOf(e)));
    }
  }
}

function isParent(run: RunSummary, all: RunSummary[]): boolean {
  return all.some((r) => r.tags?.["mlflow.parentRunId"] === run.run_id);
}

function colorOf(i: number): string {
  return PALETTE[i % PALETTE.length];
}

// downstream-task scores (eval/<task>/<metric>: `moeplat eval --tasks`, train.eval) that any shown
// run has, sorted; their standard errors stay in MLflow
function evalKeys(runs: RunSummary[]): string[] {
  const keys = new Set<string>();
  for (const r of runs) for (const k of Object.keys(r.metrics ?? {})) if (k.startsWith("eval/") && !/_stderr(\/|$)/.test(k)) keys.add(k);
  return [...keys].sort();
}

// expert specialisation by validation source, in bits (runs validated on a mixture; docs/tracking.md):
// a column only when some shown run logged it
function specializationKeys(runs: RunSummary[]): string[] {
  return runs.some((r) => r.metrics?.["moe/specialization"] !== undefined) ? ["moe/specialization"] : [];
}

function runsTable(runs: RunSummary[], total: number): HTMLElement {
  const metrics = [...CURVE_KEYS, ...specializationKeys(runs), ...evalKeys(runs)];
  return h(
    "div",
    {},
    h(
      "table",
      { class: "grid", id: "compare-runs" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ...["", "run", "run id", "status"].map((c) => h("th", {}, c)),
          ...metrics.map((k) => h("th", { "data-metric": k }, k)),
          h("th", {}, "MLflow"),
        ),
      ),
      h(
        "tbody",
        {},
        ...runs.map((r, i) =>
          h(
            "tr",
            { "data-run": r.run_id },
            h("td", {}, h("span", { class: "swatch", style: `background:${colorOf(i)}` })),
            h("td", {}, r.name),
            h("td", { class: "mono" }, r.run_id.slice(0, 12)),
            h("td", {}, r.status),
            ...metrics.map((k) => h("td", { "data-metric": k }, num(r.metrics?.[k]))),
            h("td", {}, link(r.mlflow_url, "open in MLflow")),
          ),
        ),
      ),
    ),
    total > runs.length ? h("p", { class: "muted" }, `showing the first ${runs.length} of ${total} runs`) : null,
  );
}

async function renderCurves(box: HTMLElement, runs: RunSummary[]): Promise<void> {
  const histories = await Promise.all(
    runs.map((r) => api.history(r.run_id, CURVE_KEYS).then((x) => x.history).catch(() => ({}) as Record<string, [number, number][]>)),
  );
  clear(
    box,
    ...CURVE_KEYS.map((key) =>
      lineChart(
        key,
        runs.map<Series>((r, i) => ({ label: r.name || r.run_id, color: colorOf(i), points: histories[i][key] ?? [] })),
      ),
    ),
  );
}

async function renderHeatmaps(box: HTMLElement, runs: RunSummary[]): Promise<void> {
  const loads = await Promise.all(runs.map((r) => api.load(r.run_id).catch((e) => messageOf(e))));
  clear(
    box,
    ...runs.map((r, i) => {
      const l = loads[i];
      const title = r.name || r.run_id.slice(0, 8);
      if (typeof l === "string" || !l.layers?.length) {
        return h("figure", { class: "chart-box" }, h("figcaption", {}, title), h("p", { class: "muted" }, typeof l === "string" ? l : "no expert load logged (dense model?)"));
      }
      return heatmap(title, l.layers, l.load, l.experts);
    }),
  );
}

function renderStudy(section: HTMLElement, study: Study, runs: RunSummary[]): void {
  const urls = new Map(runs.map((r) => [r.run_id, r.mlflow_url]));
  const front = new Set(study.pareto);
  const done = study.trials.filter((t) => t.values && t.values.length);
  const metric = (i: number) => `${study.metrics[i] ?? `objective ${i}`} (${study.directions[i] ?? ""})`;
  section.append(
    h("p", {}, `${study.trials.length} trials, ${done.length} finished · `, link(study.dashboard_url, "open in optuna-dashboard")),
  );
  const points: Point[] = done.map((t) => ({
    x: study.directions.length >= 2 ? t.values![0] : t.number,
    y: study.directions.length >= 2 ? t.values![1] : t.values![0],
    front: front.has(t.number),
    label: `trial ${t.number}: ${t.values!.map(num).join(", ")}\n${Object.entries(t.params).map(([k, v]) => `${k}=${v}`).join("\n")}`,
    href: (t.run_id && urls.get(t.run_id)) || (t.run_id ? `#/compare?runs=${t.run_id}` : undefined),
  }));
  const chart =
    study.directions.length >= 2
      ? scatter("Pareto front", metric(0), metric(1), points)
      : scatter("Objective by trial", "trial", metric(0), points);
  section.append(h("div", { class: "row" }, chart, bars("Parameter importances", study.importances ?? {})));
  section.append(
    h(
      "table",
      { class: "grid" },
      h("thead", {}, h("tr", {}, ...["trial", "state", "values", "params", "run"].map((c) => h("th", {}, c)))),
      h(
        "tbody",
        {},
        ...study.trials.map((t) =>
          h(
            "tr",
            { class: front.has(t.number) ? "front" : "" },
            h("td", {}, `${t.number}${front.has(t.number) ? " ★" : ""}`),
            h("td", {}, t.state),
            h("td", {}, t.values ? t.values.map(num).join(", ") : "–"),
            h("td", { class: "mono" }, Object.entries(t.params).map(([k, v]) => `${k}=${v}`).join("  ")),
            h("td", {}, t.run_id ? link(urls.get(t.run_id) ?? `#/compare?runs=${t.run_id}`, t.run_id.slice(0, 8), !!urls.get(t.run_id)) : "–"),
          ),
        ),
      ),
    ),
  );
}
