// The moeplat web UI: a hash-routed single-page app over the server API.
//   #/editor (default)  spec editor with live errors, plan, launch
//   #/jobs, #/jobs/ID   job list and one job (log, cancel, runs, studies)
//   #/compare?runs=a,b | ?job=ID | ?study=NAME   curves, expert load, Pareto front, importances
//   #/runs/ID           one run: its routing view (docs/routing.md), or a job to make it
import "./style.css";
import { api, getToken, messageOf, setToken, setUnauthorizedHandler } from "./api";
import { comparePage } from "./compare";
import { clear, h } from "./dom";
import { editorPage } from "./editor";
import { jobPage, jobsPage } from "./jobs";
import { runPage } from "./run";

const app = document.getElementById("app")!;
const nav = document.getElementById("nav")!;
const authBar = document.getElementById("auth")!;
const version = document.getElementById("version")!;
let leave: () => void = () => {};

function route(): void {
  leave();
  delete app.dataset.ready;
  const [path, query] = (location.hash.replace(/^#/, "") || "/editor").split("?");
  const params = new URLSearchParams(query ?? "");
  const parts = path.split("/").filter(Boolean);
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.dataset.page === parts[0]);
  if (parts[0] === "jobs" && parts[1]) leave = jobPage(app, Number(parts[1]));
  else if (parts[0] === "jobs") leave = jobsPage(app);
  else if (parts[0] === "compare") leave = comparePage(app, params);
  else if (parts[0] === "runs" && parts[1]) leave = runPage(app, decodeURIComponent(parts[1]));
  else leave = editorPage(app);
}

function showTokenField(reason: string): void {
  if (!authBar.hidden && authBar.dataset.reason === reason) return;
  const input = h("input", { type: "password", id: "token", placeholder: "server token", autocomplete: "off", size: 32 });
  const form = h(
    "form",
    {},
    h("span", {}, reason, " "),
    input,
    h("button", { type: "submit", class: "primary" }, "Save token"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken((input as HTMLInputElement).value.trim() || null);
    authBar.hidden = true;
    route();
  });
  clear(authBar, form);
  authBar.dataset.reason = reason;
  authBar.hidden = false;
}

setUnauthorizedHandler(() =>
  showTokenField(getToken() ? "The server refused the stored token; enter the right one:" : "This server needs a token:"),
);

async function start(): Promise<void> {
  try {
    const health = await api.health();
    version.textContent = `moeplat ${health.version}`;
    if (health.auth && !getToken()) showTokenField("This server needs a token:");
  } catch (e) {
    version.textContent = `server unreachable: ${messageOf(e)}`;
  }
}

window.addEventListener("hashchange", route);
route();
void start();
