"""Search space -> Optuna define-by-run: sample each parameter, in dependency order, when its
`when:` condition holds on the configuration sampled so far."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import optuna
import yaml

from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.sweep import CategoricalDist, FloatDist, IntDist, LoadedSweep, SweepSpec, to_override_text

_MISSING = object()


def ordered_params(sweep: SweepSpec) -> list[str]:
    """Search keys such that a parameter comes after every parameter its `when` reads."""
    deps = {
        key: {
            other
            for w in (dist.when or {})
            for other in sweep.search
            if w == other or w.startswith(other + ".")
        }
        for key, dist in sweep.search.items()
    }
    order: list[str] = []
    while len(order) < len(deps):
        ready = [k for k in deps if k not in order and deps[k] <= set(order)]
        if not ready:
            cycle = sorted(k for k in deps if k not in order)
            raise SpecError(SpecIssue("search", f"`when` conditions form a cycle among {cycle}"))
        order.extend(ready)
    return order


def get_path(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return _MISSING
    return tree


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = copy.deepcopy(value)


def _holds(when: dict | None, config: dict) -> bool:
    for path, wanted in (when or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if get_path(config, path) not in allowed:
            return False
    return True


def _choice_label(value: Any) -> Any:
    """Optuna categorical choices must be scalars: mappings and lists travel as their YAML text."""
    return value if value is None or isinstance(value, bool | int | float | str) else to_override_text(value)


def suggest(trial: optuna.Trial, loaded: LoadedSweep) -> list[str]:
    """Sample one configuration; returns the trial's `--set` overrides (fixed ones first)."""
    config = copy.deepcopy(loaded.base.resolved)
    sampled: list[str] = []
    for key in ordered_params(loaded.sweep):
        dist = loaded.sweep.search[key]
        if not _holds(dist.when, config):
            continue
        if isinstance(dist, IntDist):
            value = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, FloatDist):
            value = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            labels = [_choice_label(c) for c in dist.choices]
            label = trial.suggest_categorical(key, labels)
            value = dist.choices[labels.index(label)]
        _set_path(config, key, value)
        sampled.append(f"{key}={to_override_text(value)}")
    return loaded.fixed_overrides() + sampled


def grid_space(sweep: SweepSpec) -> dict[str, list]:
    """The finite search space the grid sampler enumerates."""
    space = {}
    for key, dist in sweep.search.items():
        if isinstance(dist, CategoricalDist):
            space[key] = [_choice_label(c) for c in dist.choices]
        elif isinstance(dist, IntDist):
            space[key] = list(range(dist.low, dist.high + 1, dist.step))
        elif dist.step is not None:
            space[key] = [float(v) for v in np.arange(dist.low, dist.high + dist.step / 2, dist.step)]
        else:
            raise SpecError(SpecIssue(f"search.{key}", "the grid sampler needs a step for float parameters"))
    return space


def overrides_from_params(loaded: LoadedSweep, params: dict[str, Any]) -> list[str]:
    """The overrides of a finished trial, from its recorded parameters (for export)."""
    out = loaded.fixed_overrides()
    for key in ordered_params(loaded.sweep):
        if key in params:
            dist = loaded.sweep.search[key]
            value = params[key]
            if isinstance(dist, CategoricalDist) and isinstance(value, str):
                labels = [_choice_label(c) for c in dist.choices]
                value = dist.choices[labels.index(value)] if value in labels else yaml.safe_load(value)
            out.append(f"{key}={to_override_text(value)}")
    return out
