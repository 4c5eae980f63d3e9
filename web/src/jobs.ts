// Page 2, jobs: the list with live state (polled every 2 s) and one job's view with its live log,
// a cancel button, and the MLflow runs and Optuna studies it produced.
import { api, type Group, type Job, messageOf, type RunSummary, type StudySummary } from "./api";
import { clear, duration, every, h, link, num, time } from "./dom";

const POLL_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export function stateBadge(job: Job): HTMLElement {
  const label = job.state === "running" && job.cancel_requested ? "cancelling" : job.state;
  return h("span", { class: `badge state-${job.state}`, "data-state": job.state }, label);
}

/** "3 of 4 trials finished (2 complete, 1 running)": a sweep group's study progress. */
export function progressText(g: Group): string {
  const p = g.progress;
  if (!p) return `${g.size} workers, study not readable yet`;
  const parts = (["complete", "running", "pruned", "failed", "waiting"] as const)
    .filter((k) => p[k] > 0)
    .map((k) => `${p[k]} ${k}`);
  return `${p.finished} of ${p.n_trials} trials finished${parts.length ? ` (${parts.join(", ")})` : ""}`;
}

function jobRow(job: Job): HTMLElement {
  return h(
    "tr",
    { "data-job": String(job.id) },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, `#${job.id}`)),
    h("td", {}, job.kind),
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name)),
    h("td", {}, stateBadge(job)),
    h("td", {}, time(job.created_at)),
    h("td", {}, duration(job.started_at, job.finished_at)),
    h(
      "td",
      { class: "muted", "data-reason": job.reason ?? null, "data-detail": job.detail ?? null },
      job.worker ?? (job.reason ? `(${job.reason})` : ""),
      job.detail ? ` (${job.detail})` : "",
    ),
    h("td", {}, job.state === "succeeded" ? h("a", { href: `#/compare?job=${job.id}` }, "compare") : ""),
  );
}

/** One row for a sweep spread over workers: its state, its study's progress, links to its jobs. */
function groupRow(g: Group): HTMLElement {
  const first = g.jobs[0];
  const started = g.jobs.map((j) => j.started_at).filter(Boolean).sort()[0] ?? null;
  const ended = g.jobs.every((j) => FINAL.has(j.state)) ? g.jobs.map((j) => j.finished_at ?? "").sort().pop() ?? null : null;
  return h(
    "tr",
    { "data-group": String(g.id) },
    h("td", {}, h("a", { href: `#/jobs/${first.id}` }, `g${g.id}`)),
    h("td", {}, `sweep ×${g.size}`),
    h("td", {}, h("a", { href: `#/jobs/${first.id}` }, g.name)),
    h("td", {}, h("span", { class: `badge state-${g.state}`, "data-state": g.state }, g.state)),
    h("td", {}, time(g.created_at)),
    h("td", {}, duration(started, ended)),
    h(
      "td",
      { class: "muted" },
      progressText(g),
      " · ",
      ...g.jobs.flatMap((j, i) => [
        i ? " " : "",
        h("a", { href: `#/jobs/${j.id}` }, `#${j.id}`),
        j.detail ? h("span", { "data-detail": j.detail }, ` (${j.detail})`) : "",
      ]),
    ),
    h("td", {}, g.state === "succeeded" ? h("a", { href: `#/compare?study=${encodeURIComponent(g.study ?? "")}` }, "compare") : ""),
  );
}

export function jobsPage(root: HTMLElement): () => void {
  const body = h("tbody");
  const note = h("p", { class: "muted" });
  clear(
    root,
    h(
      "div",
      { class: "page" },
      h("div", { class: "toolbar" }, h("h1", {}, "Jobs"), h("span", { class: "spacer" }), note),
      h(
        "table",
        { class: "grid", id: "jobs" },
        h(
          "thead",
          {},
          h("tr", {}, ...["id", "kind", "name", "state", "created", "duration", "worker", ""].map((c) => h("th", {}, c))),
        ),
        body,
      ),
    ),
  );
  const stop = every(POLL_MS, async () => {
    try {
      const [{ jobs }, { groups }] = await Promise.all([api.jobs(), api.groups()]);
      const byId = new Map(groups.map((g) => [g.id, g]));
      const shown = new Set<number>();
      note.textContent = `${jobs.length} job${jobs.length === 1 ? "" : "s"} · refreshed ${new Date().toLocaleTimeString()}`;
      const rows: HTMLElement[] = [];
      for (const job of jobs) {
        const g = job.group !== null ? byId.get(job.group) : undefined;
        if (!g) rows.push(jobRow(job));
        else if (!shown.has(g.id)) {
          shown.add(g.id);
          rows.push(groupRow(g));
        }
      }
      clear(
        body,
        ...(rows.length
          ? rows
          : [h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs yet: launch one from the editor."))]),
      );
    } catch (e) {
      note.textContent = `cannot list jobs: ${messageOf(e)}`;
    }
  });
  root.dataset.ready = "jobs";
  return stop;
}

function runsTable(runs: RunSummary[]): HTMLElement {
  if (!runs.length) return h("p", { class: "muted" }, "No MLflow runs yet.");
  const keys = ["train/loss", "val/loss", "val/bpb"];
  return h(
    "table",
    { class: "grid", id: "job-runs" },
    h("thead", {}, h("tr", {}, ...["run", "status", ...keys, "MLflow", "", ""].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      ...runs.map((r) =>
        h(
          "tr",
          { "data-run": r.run_id },
          h("td", {}, r.name || r.run_id.slice(0, 8)),
          h("td", {}, r.status),
          ...keys.map((k) => h("td", {}, num(r.metrics?.[k]))),
          h("td", {}, link(r.mlflow_url, "open in MLflow")),
          h("td", {}, h("a", { href: `#/compare?runs=${r.run_id}` }, "curves & load")),
          h("td", {}, h("a", { href: `#/runs/${r.run_id}`, class: "run-link" }, "routing")),
        ),
      ),
    ),
  );
}

function studiesTable(studies: StudySummary[]): HTMLElement | null {
  if (!studies.length) return null;
  return h(
    "table",
    { class: "grid", id: "job-studies" },
    h("thead", {}, h("tr", {}, ...["study", "trials", "best", "Optuna", ""].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      ...studies.map((s) =>
        h(
          "tr",
          {},
          h("td", {}, s.name),
          h("td", {}, String(s.n_trials)),
          h("td", {}, s.best_values ? s.best_values.map(num).join(", ") : "–"),
          h("td", {}, link(s.dashboard_url, "optuna-dashboard")),
          h("td", {}, h("a", { href: `#/compare?study=${encodeURIComponent(s.name)}` }, "Pareto & importances")),
        ),
      ),
    ),
  );
}

export function jobPage(root: HTMLElement, id: number): () => void {
  const head = h("div", { class: "job-head" });
  const logBox = h("pre", { id: "log", class: "log" });
  const results = h("div", { id: "job-results" });
  const groupBox = h("div", { id: "job-group" });
  const cancel = h("button", { id: "cancel", class: "danger", type: "button" }, "Cancel");
  const follow = h("input", { type: "checkbox", id: "follow", checked: true });
  clear(
    root,
    h(
      "div",
      { class: "page" },
      h(
        "div",
        { class: "toolbar" },
        h("a", { href: "#/jobs" }, "← jobs"),
        h("h1", {}, `Job #${id}`),
        h("span", { class: "spacer" }),
        h("label", { class: "muted" }, follow, " follow log"),
        cancel,
      ),
      head,
      groupBox,
      h("h2", {}, "Log"),
      logBox,
      h("h2", {}, "Results"),
      results,
    ),
  );

  let offset = 0;
  let logDone = false;
  let lastState = "";
  let resultsShownFor = "";
  let ticks = 0;
  const stops: (() => void)[] = [];

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      renderHead(await api.cancel(id));
    } catch (e) {
      head.append(h("p", { class: "error" }, messageOf(e)));
    }
  });

  function renderHead(job: Job) {
    lastState = job.state;
    cancel.hidden = FINAL.has(job.state);
    cancel.disabled = job.cancel_requested;
    clear(
      head,
      h(
        "table",
        { class: "kv" },
        h("tr", {}, h("th", {}, "name"), h("td", {}, `${job.name} (${job.kind})`)),
        h("tr", {}, h("th", {}, "state"), h("td", { id: "job-state" }, stateBadge(job))),
        h("tr", {}, h("th", {}, "created"), h("td", {}, time(job.created_at))),
        h("tr", {}, h("th", {}, "ran"), h("td", {}, `${duration(job.started_at, job.finished_at)}${job.worker ? ` on ${job.worker}` : ""}`)),
        job.exit_code !== null ? h("tr", {}, h("th", {}, "exit code"), h("td", {}, String(job.exit_code))) : null,
        job.error ? h("tr", {}, h("th", {}, "error"), h("td", { class: "error" }, job.error)) : null,
        job.study ? h("tr", {}, h("th", {}, "study"), h("td", {}, job.study)) : null,
        job.reason ? h("tr", {}, h("th", {}, "waiting"), h("td", { id: "job-reason" }, job.reason)) : null,
        job.detail ? h("tr", {}, h("th", {}, "executor"), h("td", { id: "job-detail" }, job.detail)) : null,
      ),
    );
  }

  async function renderGroup(job: Job) {
    if (job.group === null) return;
    const gid = job.group;
    try {
      const g = await api.group(gid);
      const cancelGroup = h("button", { id: "cancel-group", class: "danger", type: "button" }, "Cancel sweep");
      cancelGroup.hidden = FINAL.has(g.state);
      cancelGroup.addEventListener("click", async () => {
        (cancelGroup as HTMLButtonElement).disabled = true;
        await api.cancelGroup(gid).catch((e) => groupBox.append(h("p", { class: "error" }, messageOf(e))));
      });
      clear(
        groupBox,
        h("h2", {}, `Sweep group g${g.id}`),
        h(
          "table",
          { class: "kv" },
          h("tr", {}, h("th", {}, "workers"), h("td", {}, `this is worker ${(job.group_index ?? 0) + 1} of ${g.size}`)),
          h("tr", {}, h("th", {}, "progress"), h("td", { id: "group-progress" }, progressText(g))),
          h(
            "tr",
            {},
            h("th", {}, "jobs"),
            h(
              "td",
              {},
              ...g.jobs.flatMap((j, i) => [i ? " · " : "", h("a", { href: `#/jobs/${j.id}` }, `#${j.id}`), " ", stateBadge(j)]),
            ),
          ),
        ),
        cancelGroup,
      );
    } catch (e) {
      clear(groupBox, h("p", { class: "error" }, `sweep group unavailable: ${messageOf(e)}`));
    }
  }

  async function refreshResults(job: Job) {
    // while running: every third poll (runs appear as they start); once more when the job ends
    ticks++;
    if (FINAL.has(job.state) ? resultsShownFor === job.state : ticks % 3 !== 1) return;
    resultsShownFor = job.state;
    try {
      const [{ runs }, { studies }] = await Promise.all([api.jobRuns(id), api.jobStudies(id)]);
      const ids = runs.map((r) => r.run_id).join(",");
      clear(
        results,
        runs.length > 0 ? h("p", {}, h("a", { href: `#/compare?job=${id}`, id: "compare-link" }, `Compare ${runs.length === 1 ? "this run" : `these ${runs.length} runs`}`), " ", h("span", { class: "muted" }, ids)) : null,
        runsTable(runs),
        studiesTable(studies),
      );
    } catch (e) {
      clear(results, h("p", { class: "error" }, `results unavailable: ${messageOf(e)}`));
    }
  }

  stops.push(
    every(POLL_MS, async () => {
      try {
        const job = await api.job(id);
        renderHead(job);
        await renderGroup(job);
        // runs appear while the job runs; poll them every few ticks then once more at the end
        if (job.state !== "queued") await refreshResults(job);
      } catch (e) {
        clear(head, h("p", { class: "error" }, messageOf(e)));
      }
    }),
  );
  stops.push(
    every(1000, async () => {
      if (logDone) return;
      try {
        const chunk = await api.log(id, offset);
        if (chunk.text) {
          const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 8;
          logBox.append(chunk.text);
          if ((follow as HTMLInputElement).checked || atBottom) logBox.scrollTop = logBox.scrollHeight;
        }
        offset = chunk.offset;
        logDone = chunk.done && FINAL.has(lastState);
      } catch {
        /* the head shows the error */
      }
    }),
  );
  root.dataset.ready = "job";
  return () => stops.forEach((s) => s());
}
