// Page 1, the spec editor: CodeMirror 6 with YAML, schema completion and hover, errors from
// POST /api/validate on their lines (debounced), the plan from POST /api/plan, and launch buttons.
import { autocompletion } from "@codemirror/autocomplete";
import { yaml } from "@codemirror/lang-yaml";
import { type Diagnostic, forceLinting, lintGutter, linter } from "@codemirror/lint";
import { Compartment, EditorState } from "@codemirror/state";
import { EditorView, hoverTooltip, keymap } from "@codemirror/view";
import { basicSetup } from "codemirror";
import { indentWithTab } from "@codemirror/commands";
import { api, type Issue, messageOf, type PlanResult, type SpecKind } from "./api";
import { bytes, clear, h, si } from "./dom";
import examples from "./examples.gen.json";
import { SchemaIndex, schemaCompletion, schemaHover } from "./schema";

interface Example {
  label: string;
  path: string;
  kind: SpecKind;
  text: string;
}

const DRAFT_KEY = "moeplat.draft";
const LINT_DELAY_MS = 400;

interface Draft {
  kind: SpecKind;
  text: string;
  filename: string;
}

function loadDraft(): Draft {
  try {
    const d = JSON.parse(localStorage.getItem(DRAFT_KEY) ?? "null");
    if (d && typeof d.text === "string") return d;
  } catch {
    /* a broken draft: start from the first example */
  }
  const first = (examples as Example[])[0];
  return { kind: "run", text: first?.text ?? "name: my-experiment\n", filename: "spec.yaml" };
}

const schemas: Partial<Record<SpecKind, Promise<SchemaIndex | null>>> = {};
function schemaFor(kind: SpecKind): Promise<SchemaIndex | null> {
  schemas[kind] ??= api
    .schema(kind)
    .then((s) => new SchemaIndex(s))
    .catch(() => {
      delete schemas[kind];
      return null;
    });
  return schemas[kind]!;
}

/** The issue is about the edited text (not a file it extends): it can be shown on its line. */
function inEditedText(issue: Issue, filename: string): boolean {
  if (issue.line === null || issue.line === undefined) return false;
  if (!issue.file) return true;
  const base = (p: string) => p.replace(/\\/g, "/").split("/").pop();
  return issue.file === filename || issue.file.endsWith("/" + filename) || base(issue.file) === base(filename);
}

export function editorPage(root: HTMLElement): () => void {
  let draft = loadDraft();
  let schema: SchemaIndex | null = null;
  let planSeq = 0;
  const schemaSlot = new Compartment();

  const kindButtons = (["run", "sweep"] as SpecKind[]).map((k) =>
    h("button", { class: "toggle", "data-kind": k, type: "button" }, k),
  );
  const exampleSelect = h(
    "select",
    { id: "example", title: "load an example spec (replaces the editor's text)" },
    h("option", { value: "" }, "Load example…"),
    ...(examples as Example[]).map((e, i) => h("option", { value: String(i) }, e.label)),
  );
  const launch = h("button", { id: "launch", class: "primary", type: "button" }, "Launch run");
  // a sweep may be spread over workers: N sweep-worker jobs joining one study (POST /api/jobs parallel)
  const workersInput = h("input", {
    id: "parallel",
    type: "number",
    min: 1,
    step: 1,
    placeholder: "1 job",
    size: 4,
    title: "workers for this sweep: that many jobs join one Optuna study (empty: one job runs every trial)",
  }) as HTMLInputElement;
  const workersLabel = h("label", { class: "muted", id: "parallel-label" }, "workers ", workersInput);
  const status = h("span", { id: "editor-status", class: "status" });
  const problems = h("div", { id: "problems", class: "problems" });
  const planBox = h("div", { id: "plan", class: "plan" }, h("p", { class: "muted" }, "The plan appears once the spec is valid."));
  const editorHost = h("div", { id: "editor", class: "editor-host" });
  const filenameInput = h("input", {
    id: "filename",
    class: "filename",
    size: 28,
    title: "where the text lives: a file name under the server's first spec root (extends: resolves from there)",
  }) as HTMLInputElement;

  const layout = h(
    "div",
    { class: "editor-page" },
    h(
      "div",
      { class: "toolbar" },
      h("span", { class: "seg" }, ...kindButtons),
      exampleSelect,
      h("label", { class: "muted" }, "as ", filenameInput),
      h("span", { class: "spacer" }),
      status,
      workersLabel,
      launch,
    ),
    h(
      "div",
      { class: "columns" },
      h("div", { class: "main-col" }, editorHost, problems),
      h("aside", { class: "side-col" }, h("h2", {}, "Plan"), planBox),
    ),
  );
  clear(root, layout);

  const renderKind = () => {
    for (const b of kindButtons) b.classList.toggle("on", b.dataset.kind === draft.kind);
    launch.textContent = draft.kind === "sweep" ? "Launch sweep" : "Launch run";
    workersLabel.style.display = draft.kind === "sweep" ? "" : "none"; // (a CSS display beats [hidden])
    filenameInput.value = draft.filename;
  };

  const save = () => localStorage.setItem(DRAFT_KEY, JSON.stringify(draft));

  const renderProblems = (issues: Issue[], error?: string) => {
    if (error) {
      clear(problems, h("div", { class: "problem error" }, `Server: ${error}`));
      return;
    }
    if (!issues.length) {
      clear(problems, h("div", { class: "problem ok" }, "✓ valid"));
      return;
    }
    clear(
      problems,
      h("div", { class: "problems-head" }, `${issues.length} problem${issues.length === 1 ? "" : "s"}`),
      ...issues.map((issue) => {
        const here = inEditedText(issue, draft.filename);
        const row = h(
          "div",
          { class: `problem error${here ? " jump" : ""}`, "data-line": here ? String(issue.line) : null },
          here ? h("span", { class: "lineno" }, `line ${issue.line}`) : h("span", { class: "lineno" }, issue.file ?? "spec"),
          " ",
          issue.text || `${issue.path}: ${issue.message}`,
        );
        if (here) row.addEventListener("click", () => gotoLine(issue.line!));
        return row;
      }),
    );
  };

  const renderPlan = (result: PlanResult | null, error?: string) => {
    if (error || !result) {
      clear(planBox, h("p", { class: "error" }, error ?? "no plan"));
      return;
    }
    if (!result.ok || !result.plan) {
      clear(planBox, h("p", { class: "muted" }, "Fix the problems to see the plan."));
      return;
    }
    const p = result.plan;
    const pre = p.preflight ?? {};
    const memory: Record<string, number> = pre.memory_bytes ?? p.memory_bytes ?? {};
    const row = (label: string, value: string, id?: string) =>
      h("tr", {}, h("th", {}, label), h("td", id ? { "data-plan": id } : {}, value));
    const pct = p.total_params ? ` (${((100 * p.active_params) / p.total_params).toFixed(1)}%)` : "";
    clear(
      planBox,
      h(
        "table",
        { class: "kv" },
        row("total params", si(p.total_params), "total_params"),
        row("active params", si(p.active_params) + pct, "active_params"),
        row("expert params", si(p.expert_params)),
        row("FLOPs/token (fwd)", si(p.flops_per_token_fwd), "flops_per_token"),
        row("FLOPs/token (train)", si(p.flops_per_token_train)),
        row("tokens/step", si(p.tokens_per_step)),
        row("MoE layers", Array.isArray(p.moe_layers) ? `${p.moe_layers.length} of ${p.layers?.length ?? "?"}` : "–"),
        pre.world_size ? row("devices", `${pre.world_size} (ep ${pre.ep_size ?? 1})`) : null,
      ),
      h("h3", {}, "Memory per device"),
      h(
        "table",
        { class: "kv" },
        ...Object.entries(memory).map(([k, v]) =>
          row(k.replace(/_/g, " "), bytes(v), k === "total" ? "memory_total" : undefined),
        ),
      ),
      ...(pre.problems ?? []).map((pr: [string, string]) => h("p", { class: "error" }, `${pr[0]}: ${pr[1]}`)),
    );
  };

  const refreshPlan = async (text: string) => {
    const seq = ++planSeq;
    try {
      const result = await api.plan(text, draft.kind, draft.filename);
      if (seq === planSeq) renderPlan(result);
    } catch (e) {
      if (seq === planSeq) renderPlan(null, messageOf(e));
    }
  };

  const lintSource = async (view: EditorView): Promise<Diagnostic[]> => {
    const text = view.state.doc.toString();
    status.textContent = "checking…";
    let result;
    try {
      result = await api.validate(text, draft.kind, draft.filename);
    } catch (e) {
      status.textContent = "";
      renderProblems([], messageOf(e));
      return [];
    }
    status.textContent = result.ok ? `valid${result.name ? `: ${result.name}` : ""}` : "invalid";
    status.className = `status ${result.ok ? "ok" : "bad"}`;
    renderProblems(result.errors);
    if (result.ok) void refreshPlan(text);
    else renderPlan({ ok: false, errors: result.errors, plan: null, text: null });
    const doc = view.state.doc;
    return result.errors
      .filter((issue) => inEditedText(issue, draft.filename))
      .map((issue) => {
        const line = doc.line(Math.min(Math.max(issue.line!, 1), doc.lines));
        const message = [issue.path, issue.message].filter(Boolean).join(": ") + (issue.hint ? `; ${issue.hint}` : "");
        return { from: line.from, to: line.to, severity: "error", message };
      });
  };

  const view = new EditorView({
    parent: editorHost,
    state: EditorState.create({
      doc: draft.text,
      extensions: [
        basicSetup,
        keymap.of([indentWithTab]),
        yaml(),
        EditorState.tabSize.of(2),
        linter(lintSource, { delay: LINT_DELAY_MS }),
        lintGutter(),
        schemaSlot.of([]),
        EditorView.updateListener.of((u) => {
          if (u.docChanged) {
            draft.text = u.state.doc.toString();
            save();
          }
        }),
      ],
    }),
  });

  const installSchema = async () => {
    const kind = draft.kind;
    const index = await schemaFor(kind);
    if (kind !== draft.kind) return;
    schema = index;
    view.dispatch({
      effects: schemaSlot.reconfigure([
        autocompletion({ override: [schemaCompletion(() => schema)] }),
        hoverTooltip(schemaHover(() => schema), { hideOnChange: true }),
      ]),
    });
  };

  function gotoLine(n: number) {
    const line = view.state.doc.line(Math.min(n, view.state.doc.lines));
    view.dispatch({ selection: { anchor: line.from }, scrollIntoView: true });
    view.focus();
  }

  const setText = (text: string) => {
    view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } });
  };

  for (const b of kindButtons) {
    b.addEventListener("click", () => {
      draft.kind = b.dataset.kind as SpecKind;
      save();
      renderKind();
      void installSchema();
      forceLinting(view);
    });
  }
  filenameInput.addEventListener("change", () => {
    draft.filename = filenameInput.value.trim() || "spec.yaml";
    save();
    forceLinting(view);
  });
  exampleSelect.addEventListener("change", () => {
    const e = (examples as Example[])[Number(exampleSelect.value)];
    exampleSelect.value = "";
    if (!e) return;
    draft = { kind: e.kind, text: e.text, filename: e.path };
    save();
    renderKind();
    void installSchema();
    setText(e.text);
  });
  launch.addEventListener("click", async () => {
    launch.disabled = true;
    status.textContent = "submitting…";
    try {
      const raw = workersInput.value.trim();
      const parallel = draft.kind === "sweep" && raw ? Number(raw) : undefined;
      if (parallel !== undefined && !(Number.isInteger(parallel) && parallel >= 1)) {
        throw new Error(`workers must be a whole number, 1 or more (got ${raw})`);
      }
      const job = await api.submit({ kind: draft.kind, text: view.state.doc.toString(), filename: draft.filename, parallel });
      location.hash = `#/jobs/${job.id}`;
    } catch (e: any) {
      status.textContent = `not launched: ${messageOf(e)}`;
      status.className = "status bad";
      if (e?.body?.errors) renderProblems(e.body.errors);
    } finally {
      launch.disabled = false;
    }
  });

  renderKind();
  // test hook and console convenience: the live editor
  (window as any).moeplatEditor = view;
  void installSchema().finally(() => {
    // "editor ready": CodeMirror mounted and the schema loaded (the load time the tests measure)
    root.dataset.ready = "editor";
    (window as any).moeplatReadyAt ??= performance.now();
  });
  return () => {
    delete (window as any).moeplatEditor;
    view.destroy();
  };
}
