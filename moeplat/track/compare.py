"""Read MLflow runs of `moeplat run` back for `moeplat compare`: which runs, how their resolved
specs differ, their key metrics, loss curves and final expert loads. Plain dataclasses out; the
printing and plotting live in moeplat.cli.compare.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from moeplat.track.mlflow_run import absolute_sqlite

# (row label, metric key, how it is summarised): "last" is MLflow's latest value, "min" the
# minimum over the history, "steps" the last step at which a loss (CURVES) was logged.
KEY_METRICS: tuple[tuple[str, str, str], ...] = (
    ("val/loss (final)", "val/loss", "last"),
    ("val/loss (best)", "val/loss", "min"),
    ("val/bpb (final)", "val/bpb", "last"),  # bits per byte: comparable across tokenizers
    ("val/bpb (best)", "val/bpb", "min"),
    ("train/loss (final)", "train/loss", "last"),
    ("data/unigram_baseline", "data/unigram_baseline", "last"),
    ("data/unigram_baseline_bpb", "data/unigram_baseline_bpb", "last"),
    ("data/bytes_per_token", "data/bytes_per_token", "last"),
    ("moe/all/maxvio (last)", "moe/all/maxvio", "last"),
    ("moe/all/dropped_frac (last)", "moe/all/dropped_frac", "last"),
    # expert specialisation by validation source, bits (a mixture's runs; moeplat.train.specialization)
    ("moe/specialization (last)", "moe/specialization", "last"),
    ("perf/tokens_per_s (last)", "perf/tokens_per_s", "last"),
    ("perf/wall_s", "perf/wall_s", "last"),
    ("last logged step", "*", "steps"),
)
CURVES = ("train/loss", "val/loss")
EVAL_PREFIX = "eval/"
_STDERR = re.compile(r"_stderr(/|$)")
_LOAD = re.compile(r"^moe/layer(\d+)/load/e(\d+)$")
_SPECIALIZATION = re.compile(r"^moe/layer\d+/specialization$")
MAX_LAYER_ROWS = 8  # per-layer specialisation rows only while the table stays short


class CompareError(ValueError):
    """A selection that names no runs, an unknown run or experiment, a bad filter string: the
    user's mistake, reported in one line (exit code 2)."""


@dataclass(frozen=True)
class RunData:
    run_id: str
    name: str
    experiment: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # MLflow's latest value of every metric
    curves: dict[str, list[tuple[int, float]]]  # CURVES key -> (step, value) sorted by step
    load_LE: list[list[float]]  # final load fraction per MoE layer (rows) and expert (columns)
    load_layers: list[int]  # the model layer index of each row of load_LE

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


@dataclass(frozen=True)
class Comparison:
    runs: list[RunData]
    params: dict[str, list[str | None]]  # only the spec params whose values differ across runs
    metrics: dict[str, list[float | None]] = field(default_factory=dict)  # KEY_METRICS rows
    more: bool = False  # the selection matched more runs than were kept (max_runs)

    def to_dict(self) -> dict:
        return {
            "runs": [
                {"run_id": r.run_id, "name": r.name, "experiment": r.experiment, "status": r.status}
                for r in self.runs
            ],
            "params": self.params,
            "metrics": self.metrics,
            "truncated": self.more,
        }


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    uri = absolute_sqlite(tracking_uri)
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        path = uri.removeprefix("sqlite:///")
        path = path if path.startswith("/") else "/" + path
        if not os.path.exists(path):  # MlflowClient would silently create an empty store
            raise CompareError(f"no MLflow store at {path} (pass --tracking-uri)")
    return MlflowClient(uri)


def select_runs(
    client,
    run_ids: list[str] = (),
    experiments: list[str] = (),
    filter_string: str = "",
    max_runs: int = 10,
) -> tuple[list, bool]:
    """The runs named by id, then those matching the experiments and/or filter string (newest
    first, at most max_runs of them); duplicates dropped. Returns (runs, more_matched)."""
    from mlflow.exceptions import MlflowException

    if not (run_ids or experiments or filter_string):
        raise CompareError("name run ids, --experiment or --filter to select runs")
    runs = []
    for rid in run_ids:
        try:
            runs.append(client.get_run(rid))
        except MlflowException as e:
            raise CompareError(f"unknown run id {rid!r}") from e
    more = False
    if experiments or filter_string:
        exp_ids = []
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise CompareError(f"unknown experiment {name!r}")
            exp_ids.append(exp.experiment_id)
        if not exp_ids:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        try:
            found = client.search_runs(
                exp_ids, filter_string, max_results=max_runs + 1, order_by=["attributes.start_time DESC"]
            )
        except MlflowException as e:
            raise CompareError(f"bad --filter {filter_string!r}: {e.message.splitlines()[0]}") from e
        more = len(found) > max_runs
        runs += list(found[:max_runs])
    seen: set[str] = set()
    unique = [r for r in runs if not (r.info.run_id in seen or seen.add(r.info.run_id))]
    if not unique:
        raise CompareError("no runs matched the selection")
    return unique, more


def _final_load(metrics: dict[str, float]) -> tuple[list[list[float]], list[int]]:
    cells: dict[int, dict[int, float]] = {}
    for key, value in metrics.items():
        m = _LOAD.match(key)
        if m:
            cells.setdefault(int(m[1]), {})[int(m[2])] = value
    layers = sorted(cells)
    n_experts = max((max(c) + 1 for c in cells.values()), default=0)
    return [[cells[layer].get(e, 0.0) for e in range(n_experts)] for layer in layers], layers


def read_run(client, run, experiment_names: dict[str, str]) -> RunData:
    curves = {}
    for key in CURVES:
        hist = client.get_metric_history(run.info.run_id, key)
        curves[key] = sorted((m.step, m.value) for m in hist)
    load_LE, layers = _final_load(run.data.metrics)
    exp_id = run.info.experiment_id
    if exp_id not in experiment_names:
        experiment_names[exp_id] = client.get_experiment(exp_id).name
    return RunData(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        experiment=experiment_names[exp_id],
        status=run.info.status,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        curves=curves,
        load_LE=load_LE,
        load_layers=layers,
    )


def differing_params(runs: list[RunData]) -> dict[str, list[str | None]]:
    """Spec params (and plan.* counts) whose values are not the same in every run; a param that
    some runs lack counts as differing (None there)."""
    keys = sorted(set().union(*(r.params for r in runs)))
    rows = {k: [r.params.get(k) for r in runs] for k in keys}
    return {k: v for k, v in rows.items() if len(set(v)) > 1}


def _summary(r: RunData, key: str, how: str) -> float | None:
    if how == "last":
        return r.metrics.get(key)
    if how == "steps":
        steps = [s for pts in r.curves.values() for s, _ in pts]
        return float(max(steps)) if steps else None
    hist = r.curves.get(key, [])
    return float(min(v for _, v in hist)) if hist else None


def key_metrics(runs: list[RunData]) -> dict[str, list[float | None]]:
    rows = {label: [_summary(r, key, how) for r in runs] for label, key, how in KEY_METRICS}
    rows |= {key: [r.metrics.get(key) for r in runs] for key in specialization_keys(runs) + eval_keys(runs)}
    return {label: v for label, v in rows.items() if any(x is not None for x in v)}


def eval_keys(runs: list[RunData]) -> list[str]:
    """Downstream-task scores (eval/<task>/<metric>, `moeplat eval --tasks`, train.eval) that any of
    the runs has, sorted; their standard errors are left to the JSON of the runs themselves."""
    keys = {k for r in runs for k in r.metrics if k.startswith(EVAL_PREFIX)}
    return sorted(k for k in keys if not _STDERR.search(k))


def specialization_keys(runs: list[RunData]) -> list[str]:
    """moe/layerNN/specialization of any of the runs, sorted; none past MAX_LAYER_ROWS layers
    (the mean, moe/specialization, is a row of its own)."""
    keys = sorted({k for r in runs for k in r.metrics if _SPECIALIZATION.match(k)})
    return keys if len(keys) <= MAX_LAYER_ROWS else []


def compare(
    tracking_uri: str,
    run_ids: list[str] = (),
    experiments: list[str] = (),
    filter_string: str = "",
    max_runs: int = 10,
) -> Comparison:
    client = _client(tracking_uri)
    found, more = select_runs(client, run_ids, experiments, filter_string, max_runs)
    names: dict[str, str] = {}
    runs = [read_run(client, r, names) for r in found]
    return Comparison(runs=runs, params=differing_params(runs), metrics=key_metrics(runs), more=more)
