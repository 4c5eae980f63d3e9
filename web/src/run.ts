// Page 4, one run (#/runs/ID): its summary and its routing view (docs/routing.md), the page that
// `moeplat route RUN --log` stored as the run's routing/route.html artifact. The view holds text
// from the run's data, so it is shown in an iframe sandboxed to scripts only (srcdoc, an opaque
// origin: it cannot read this page, its token or the API). Without a view, a form queues a route
// job (POST /api/runs/ID/routing) that a worker runs; the view appears when the job succeeds.
import { api, type Job, messageOf } from "./api";
import { stateBadge } from "./jobs";
import { clear, every, h, link, num } from "./dom";

const POLL_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export function runPage(root: HTMLElement, runId: string): () => void {
  const head = h("div", { class: "job-head", id: "run-head" });
  const view = h("div", { id: "routing" });
  const text = h("textarea", {
    id: "route-text",
    rows: 5,
    cols: 80,
    placeholder: "text to route (empty: the run's own validation text)",
  });
  const submit = h("button", { type: "submit", class: "primary", id: "route-submit" }, "Analyse routing");
  const status = h("span", { id: "route-status", class: "muted" });
  const form = h("form", { id: "route-form" }, h("p", {}, text), h("p", {}, submit, " ", status));
  clear(
    root,
    h(
      "div",
      { class: "page" },
      h("div", { class: "toolbar" }, h("h1", {}, "Run"), h("span", { class: "muted" }, runId)),
      head,
      h("h2", {}, "Routing"),
      view,
      h("h3", {}, "Make a routing view"),
      form,
    ),
  );
  let stopPoll: () => void = () => {};

  async function showView(): Promise<void> {
    const { html } = await api.routing(runId);
    if (html === null) {
      clear(view, h("p", { class: "muted", id: "no-routing" }, "No routing view yet: make one below (or run ", h("code", {}, `moeplat route ${runId} --text FILE --log`), ")."));
      return;
    }
    const frame = h("iframe", { id: "routing-view", sandbox: "allow-scripts", title: "routing view", style: "width:100%;height:80vh;border:1px solid #ccc" });
    (frame as HTMLIFrameElement).srcdoc = html;
    clear(view, frame);
  }

  function follow(job: Job): void {
    stopPoll();
    const jobLink = h("a", { href: `#/jobs/${job.id}` }, `job #${job.id}`);
    stopPoll = every(POLL_MS, async () => {
      const now = await api.job(job.id);
      clear(status, jobLink, " ", stateBadge(now));
      if (!FINAL.has(now.state)) return;
      stopPoll();
      submit.disabled = false;
      if (now.state === "succeeded") await showView();
      else status.append(" ", h("span", { class: "error" }, now.error ?? `the route job ${now.state}`));
    });
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    try {
      follow(await api.route(runId, (text as HTMLTextAreaElement).value));
    } catch (e) {
      submit.disabled = false;
      clear(status, h("span", { class: "error" }, messageOf(e)));
    }
  });

  void (async () => {
    try {
      const [{ runs }] = await Promise.all([api.runs([runId]), showView()]);
      const r = runs[0];
      clear(
        head,
        h(
          "table",
          { class: "kv" },
          h("tr", {}, h("th", {}, "name"), h("td", {}, r.name || r.run_id)),
          h("tr", {}, h("th", {}, "status"), h("td", {}, r.status)),
          h("tr", {}, h("th", {}, "val/loss"), h("td", {}, num(r.metrics?.["val/loss"]))),
          h("tr", {}, h("th", {}, "links"), h("td", {}, link(r.mlflow_url, "open in MLflow"), " · ", h("a", { href: `#/compare?runs=${encodeURIComponent(runId)}` }, "curves & load"))),
        ),
      );
    } catch (e) {
      clear(head, h("p", { class: "error" }, messageOf(e)));
    }
    root.dataset.ready = "run";
  })();
  return () => stopPoll();
}
