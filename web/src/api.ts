// The server's HTTP API (docs/server.md, /openapi.json): a typed fetch wrapper that adds the bearer
// token when one is stored and asks for one when the server answers 401.

export interface Issue {
  path: string;
  message: string;
  line: number | null;
  file: string | null;
  hint: string | null;
  text: string;
}

export interface Job {
  id: number;
  kind: "run" | "sweep" | "route" | "sweep-worker";
  name: string;
  state: "queued" | "running" | "succeeded" | "failed" | "cancelled";
  created_at: string | null;
  started_at: string | null;
  finished_at: string | null;
  heartbeat_at: string | null;
  worker: string | null;
  exit_code: number | null;
  error: string | null;
  cancel_requested: boolean;
  attempts: number;
  study: string | null;
  storage: string | null;
  devices: number;
  reason: string | null;
  /** what the executor says of a running job (the SLURM bridge: "SLURM PENDING (Resources)") */
  detail: string | null;
  group: number | null;
  group_index: number | null;
}

/** A sweep spread over workers: `size` sweep-worker jobs joining one study. */
export interface Group {
  id: number;
  kind: string;
  name: string;
  size: number;
  study: string | null;
  n_trials: number | null;
  created_at: string | null;
  state: Job["state"];
  jobs: Job[];
  progress: {
    n_trials: number;
    finished: number;
    complete: number;
    pruned: number;
    failed: number;
    running: number;
    waiting: number;
  } | null;
}

export interface RunSummary {
  run_id: string;
  name: string;
  status: string;
  experiment: string;
  start_time: string | number | null;
  params: Record<string, string>;
  metrics: Record<string, number>;
  tags: Record<string, string>;
  mlflow_url: string | null;
}

export interface StudySummary {
  name: string;
  n_trials: number;
  best_values: number[] | null;
  directions: string[];
  dashboard_url: string | null;
}

export interface Trial {
  number: number;
  state: string;
  values: number[] | null;
  params: Record<string, unknown>;
  run_id: string | null;
}

export interface Study {
  name: string;
  directions: string[];
  metrics: string[];
  trials: Trial[];
  pareto: number[];
  importances: Record<string, number>;
  dashboard_url: string | null;
}

export interface ExpertLoad {
  layers: string[];
  experts: number;
  load: number[][];
}

export interface ValidateResult {
  ok: boolean;
  name: string | null;
  hash: string | null;
  errors: Issue[];
}

export interface PlanResult {
  ok: boolean;
  errors: Issue[];
  plan: Record<string, any> | null;
  text: string | null;
}

export type SpecKind = "run" | "sweep";

const TOKEN_KEY = "moeplat.token";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly detail: string,
    readonly body: any,
  ) {
    super(`${status}: ${detail}`);
  }
}

export function getToken(): string | null {
  return localStorage.getItem(TOKEN_KEY);
}

export function setToken(token: string | null): void {
  if (token) localStorage.setItem(TOKEN_KEY, token);
  else localStorage.removeItem(TOKEN_KEY);
}

/** Called when a request is refused with 401; the app shows the token field. */
let onUnauthorized: () => void = () => {};
export function setUnauthorizedHandler(handler: () => void): void {
  onUnauthorized = handler;
}

export async function request<T>(method: string, path: string, body?: unknown): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  const token = getToken();
  if (token) headers["Authorization"] = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data: any = null;
  const text = await response.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text };
  }
  if (response.status === 401) onUnauthorized();
  if (!response.ok) {
    const detail = typeof data?.detail === "string" ? data.detail : JSON.stringify(data?.detail ?? response.statusText);
    throw new ApiError(response.status, detail, data);
  }
  return data as T;
}

const q = encodeURIComponent;

export const api = {
  health: () => request<{ ok: boolean; version: string; auth: boolean }>("GET", "/api/health"),
  schema: (kind: SpecKind) => request<any>("GET", `/api/schema${kind === "sweep" ? "?kind=sweep" : ""}`),
  validate: (text: string, kind: SpecKind, filename?: string) =>
    request<ValidateResult>("POST", "/api/validate", { text, kind, overrides: [], filename }),
  plan: (text: string, kind: SpecKind, filename?: string) =>
    request<PlanResult>("POST", "/api/plan", { text, kind, overrides: [], filename }),
  submit: (body: {
    kind: SpecKind;
    text: string;
    filename?: string;
    name?: string;
    overrides?: string[];
    parallel?: number;
  }) => request<Job>("POST", "/api/jobs", body),
  groups: (limit = 20) => request<{ groups: Group[] }>("GET", `/api/groups?limit=${limit}`),
  group: (id: number) => request<Group>("GET", `/api/groups/${id}`),
  cancelGroup: (id: number) => request<Group>("POST", `/api/groups/${id}/cancel`),
  jobs: (limit = 100) => request<{ jobs: Job[] }>("GET", `/api/jobs?limit=${limit}`),
  job: (id: number) => request<Job>("GET", `/api/jobs/${id}`),
  log: (id: number, offset: number) =>
    request<{ text: string; offset: number; done: boolean }>("GET", `/api/jobs/${id}/log?offset=${offset}`),
  cancel: (id: number) => request<Job>("POST", `/api/jobs/${id}/cancel`),
  jobRuns: (id: number) => request<{ runs: RunSummary[] }>("GET", `/api/jobs/${id}/runs`),
  jobStudies: (id: number) => request<{ studies: StudySummary[] }>("GET", `/api/jobs/${id}/studies`),
  runs: (ids: string[]) => request<{ runs: RunSummary[] }>("GET", `/api/runs?ids=${ids.map(q).join(",")}`),
  history: (runId: string, keys: string[]) =>
    request<{ history: Record<string, [number, number][]> }>(
      "GET",
      `/api/runs/${q(runId)}/history?keys=${keys.map(q).join(",")}`,
    ),
  load: (runId: string) => request<ExpertLoad>("GET", `/api/runs/${q(runId)}/load`),
  routing: (runId: string) => request<{ html: string | null }>("GET", `/api/runs/${q(runId)}/routing`),
  route: (runId: string, text: string) => request<Job>("POST", `/api/runs/${q(runId)}/routing`, { text: text || null }),
  study: (name: string) => request<Study>("GET", `/api/studies/${q(name)}`),
};

/** A short readable message for any thrown value. */
export function messageOf(error: unknown): string {
  if (error instanceof ApiError) return error.detail;
  if (error instanceof Error) return error.message;
  return String(error);
}
