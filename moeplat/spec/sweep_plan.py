"""What `validate`, `show` and `plan` need to read a sweep file: which kind of file a spec path is,
and the range of the plan's counts over a sweep's search space.

The range is found by planning (spec-only counting, no torch) every combination of each searched
parameter's extremes and every categorical choice, each trial spec built exactly as a sweep trial
is (the base spec with the fixed and sampled values as `--set` overrides). A `when` parameter
counts only in the combinations where its condition holds, as in moeplat.sweep.space.suggest.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moeplat.errors import SpecError
from moeplat.spec.loader import load_spec
from moeplat.spec.plan import plan
from moeplat.spec.safe_yaml import compose_checked, read_spec_bytes
from moeplat.spec.sweep import CategoricalDist, FloatDist, IntDist, LoadedSweep, to_override_text

SWEEP_KEYS = ("search", "trials")  # top-level keys only a sweep file has
MAX_POINTS = 512  # combinations planned before falling back to one parameter at a time
METRICS = ("active_params", "total_params", "flops_per_token_train")


def file_kind(path: str | Path) -> tuple[str, str | None]:
    """("sweep", the key that says so) or ("run", None). Read by the bounded reader; a file it
    cannot read or parse is left to the run-spec loader, which words that error."""
    path = Path(path)
    try:
        if not path.is_file():
            return "run", None
        node = compose_checked(read_spec_bytes(path), str(path))
    except (OSError, yaml.YAMLError):
        return "run", None
    if isinstance(node, yaml.MappingNode):
        keys = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
        for key in SWEEP_KEYS:
            if key in keys:
                return "sweep", key
    return "run", None


def candidates(dist) -> list[Any]:
    """The values that bound a parameter: an int/float range's ends (the last on its step grid),
    every categorical choice."""
    if isinstance(dist, CategoricalDist):
        return list(dist.choices)
    if isinstance(dist, IntDist):
        return [dist.low, dist.low + (dist.high - dist.low) // dist.step * dist.step]
    assert isinstance(dist, FloatDist)
    if dist.step is None:
        return [dist.low, dist.high]
    return [dist.low, dist.low + math.floor((dist.high - dist.low) / dist.step + 1e-9) * dist.step]


@dataclass
class Extreme:
    value: float
    point: dict[str, Any]  # the searched values that give it


@dataclass
class SweepRange:
    points: int  # combinations planned
    invalid: int  # combinations the run spec refuses (a trial would fail at once)
    exhaustive: bool  # every combination of the candidates, or one parameter at a time
    low: dict[str, Extreme] = field(default_factory=dict)
    high: dict[str, Extreme] = field(default_factory=dict)
    over_constraint: int = 0  # combinations a max_*_params constraint rejects before training

    def to_dict(self) -> dict:
        return {
            "points": self.points,
            "invalid": self.invalid,
            "exhaustive": self.exhaustive,
            "over_constraint": self.over_constraint,
            **{m: {"min": self.low[m].__dict__, "max": self.high[m].__dict__} for m in self.low},
        }


def _points(loaded: LoadedSweep) -> tuple[list[dict[str, Any]], bool]:
    keys = list(loaded.sweep.search)
    values = [candidates(loaded.sweep.search[k]) for k in keys]
    if math.prod(len(v) for v in values) <= MAX_POINTS:
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)], True
    # Too many: each parameter alone over its candidates, the others at the base spec's value.
    return [{k: v} for k, vs in zip(keys, values, strict=True) for v in vs], False


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not (isinstance(tree, dict) and part in tree):
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = copy.deepcopy(value)


def _applied(loaded: LoadedSweep, point: dict[str, Any]) -> dict[str, Any]:
    """The values of `point` a trial would sample: those whose `when` holds, in search order
    (a `when` on a later parameter is evaluated against the values set so far)."""
    config, out = copy.deepcopy(loaded.base.resolved), {}
    pending = dict(point)
    while pending:  # parameters whose condition reads another searched one wait for it
        progressed = False
        for key in list(pending):
            when = loaded.sweep.search[key].when or {}
            if any(w == p or w.startswith(p + ".") for w in when for p in pending if p != key):
                continue
            value = pending.pop(key)
            progressed = True
            if all(_get(config, w) in (a if isinstance(a, list) else [a]) for w, a in when.items()):
                _set(config, key, value)
                out[key] = value
        if not progressed:  # a `when` cycle: moeplat sweep refuses it; count nothing more
            break
    return out


def plan_range(loaded: LoadedSweep) -> SweepRange:
    points, exhaustive = _points(loaded)
    result = SweepRange(points=0, invalid=0, exhaustive=exhaustive)
    limits = {c.kind: c.value for c in loaded.sweep.constraints}
    seen: set[str] = set()
    for point in points:
        applied = _applied(loaded, point)
        overrides = loaded.fixed_overrides() + [f"{k}={to_override_text(v)}" for k, v in applied.items()]
        if (key := "\n".join(overrides)) in seen:
            continue  # a `when` that did not hold made two points the same trial
        seen.add(key)
        result.points += 1
        try:
            p = plan(load_spec(loaded.base_path, overrides).spec)
        except SpecError:
            result.invalid += 1
            continue
        if p.active_params > limits.get("max_active_params", math.inf) or p.total_params > limits.get(
            "max_total_params", math.inf
        ):
            result.over_constraint += 1
        for m in METRICS:
            v = float(getattr(p, m))
            if m not in result.low or v < result.low[m].value:
                result.low[m] = Extreme(v, applied)
            if m not in result.high or v > result.high[m].value:
                result.high[m] = Extreme(v, applied)
    return result
