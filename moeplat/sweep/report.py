"""What a study found: status table, best trials, importances, plots, and the best trial as a spec."""

from __future__ import annotations

import collections
import logging
import tempfile
import time
from pathlib import Path

import optuna
import yaml

from moeplat.spec import load_spec
from moeplat.spec.sweep import LoadedSweep
from moeplat.sweep.space import overrides_from_params

log = logging.getLogger(__name__)


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial, or the Pareto front of a multi-objective study ([] before any completes)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA parameter importances (needs a few complete trials; {} otherwise)."""
    if len(study.directions) > 1:
        return {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 3:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError) as e:  # e.g. a single distinct value everywhere
        log.info("no importances: %s", e)
        return {}


def status(study: optuna.Study) -> dict:
    states = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    best = best_trials(study)
    return {
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "trials": dict(sorted(states.items())),
        "best": [{"number": t.number, "values": t.values, "params": t.params} for t in best],
        "importances": importances(study),
    }


def format_status(s: dict) -> str:
    lines = [f"study {s['study']} ({', '.join(s['directions'])})"]
    lines.append("trials  " + ", ".join(f"{k.lower()} {v}" for k, v in s["trials"].items()))
    for b in s["best"]:
        values = ", ".join(f"{v:.4g}" for v in b["values"])
        lines.append(
            f"best    #{b['number']}: {values}  " + " ".join(f"{k}={v}" for k, v in b["params"].items())
        )
    if s["importances"]:
        lines.append("importance " + ", ".join(f"{k} {v:.2f}" for k, v in s["importances"].items()))
    return "\n".join(lines)


def export_best(loaded: LoadedSweep, study: optuna.Study, out: str | Path, rank: int = 0) -> Path:
    """Write the best trial (or Pareto member `rank`) as a fully resolved, runnable run spec."""
    best = best_trials(study)
    if not best:
        raise ValueError(f"study {study.study_name} has no complete trial yet")
    trial = best[min(rank, len(best) - 1)]
    overrides = overrides_from_params(loaded, trial.params)
    resolved = dict(load_spec(loaded.base_path, overrides).resolved)
    resolved["name"] = f"{resolved['name']}-{loaded.sweep.name}-t{trial.number}"
    header = [f"# Best trial #{trial.number} of sweep {loaded.sweep.name}: {trial.values}"]
    header += [f"#   --set {o}" for o in overrides]
    out = Path(out)
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(resolved, sort_keys=False))
    return out


def plots(study: optuna.Study, directory: Path) -> list[Path]:
    """Optimisation history, importances and (multi-objective) Pareto front as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made = []
    jobs = (
        [("pareto_front", ovm.plot_pareto_front)]
        if len(study.directions) > 1
        else [
            ("optimization_history", ovm.plot_optimization_history),
            ("param_importances", ovm.plot_param_importances),
        ]
    )
    for name, fn in jobs:
        try:
            ax = fn(study)
        except (ValueError, RuntimeError) as e:  # too few trials for this plot
            log.info("skipping %s: %s", name, e)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def summarize_to_mlflow(study: optuna.Study, parent) -> None:
    """The sweep's parent run gets the summary: best trial(s), importances, plots."""
    s = status(study)
    now = int(time.time() * 1000)
    tags = {f"optuna.trials.{state.lower()}": n for state, n in s["trials"].items()}
    tags |= {f"optuna.best.{i}.trial": b["number"] for i, b in enumerate(s["best"])}
    parent.set_tags(tags)
    rows = [
        (f"best/{i}/objective{j}", v, 0, now)
        for i, b in enumerate(s["best"])
        for j, v in enumerate(b["values"])
    ]
    rows += [(f"importance/{k}", v, 0, now) for k, v in s["importances"].items()]
    if rows:
        parent.log_metrics(rows)
    parent.log_text(yaml.safe_dump(s, sort_keys=False), "sweep/summary.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        for path in plots(study, Path(tmp)):
            parent.log_artifact(str(path), "sweep/plots")
