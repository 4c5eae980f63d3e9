"""Sweep specs: a base run spec, fixed overrides and a search space over dotted spec paths.

Validated like run specs (strict, every error with file:line and did-you-mean). No optuna here:
moeplat/sweep turns a SweepSpec into an Optuna study.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PositiveInt, ValidationError, model_validator

from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.base import Seed, Strict, check
from moeplat.spec.diagnostics import did_you_mean, fields_at, issues_from_validation, walk
from moeplat.spec.loader import LoadedSpec, _origin_of, _read_text, _read_yaml, inside, load_spec
from moeplat.spec.root import Spec

Scalar = bool | int | float | str | None


class _Dist(Strict):
    when: dict[str, Scalar | list[Scalar]] | None = Field(
        None,
        description="Sample this parameter only when every listed spec path has the given value (or one of "
        "the listed values), evaluated after the parameters it depends on are sampled.",
    )


class IntDist(_Dist):
    kind: Literal["int"]
    low: int
    high: int
    step: PositiveInt = 1
    log: bool = False

    @model_validator(mode="after")
    def _cross(self) -> IntDist:
        problems = (
            [] if self.low <= self.high else [("high", f"high ({self.high}) must be >= low ({self.low})")]
        )
        if self.log and (self.low < 1 or self.step != 1):
            problems.append(("log", "log scale needs low >= 1 and step 1"))
        return check(problems) or self


class FloatDist(_Dist):
    kind: Literal["float"]
    low: float
    high: float
    step: Annotated[float, Field(gt=0)] | None = None
    log: bool = False

    @model_validator(mode="after")
    def _cross(self) -> FloatDist:
        problems = (
            [] if self.low <= self.high else [("high", f"high ({self.high}) must be >= low ({self.low})")]
        )
        if self.log and (self.low <= 0 or self.step is not None):
            problems.append(("log", "log scale needs low > 0 and no step"))
        return check(problems) or self


class CategoricalDist(_Dist):
    """Choices may be scalars or whole mappings (e.g. a router or capacity variant)."""

    kind: Literal["categorical"]
    choices: Annotated[list[Any], Field(min_length=1)]


Distribution = Annotated[IntDist | FloatDist | CategoricalDist, Field(discriminator="kind")]


class Objective(Strict):
    """metric: a run result (val/loss, val/ppl, val/bpb, perf/tokens_per_s) or a plan count
    (plan.active_params, ...). val/bpb, bits per UTF-8 byte, compares trials whose tokenizers differ."""

    metric: Literal[
        "val/loss",
        "val/ppl",
        "val/bpb",
        "perf/tokens_per_s",
        "plan.active_params",
        "plan.total_params",
        "plan.flops_per_token_train",
    ]
    direction: Literal["minimize", "maximize"] = "minimize"


class MaxActiveParams(Strict):
    """Reject, before training, trials whose active parameters per token (from `plan`) exceed value."""

    kind: Literal["max_active_params"]
    value: PositiveInt


class MaxTotalParams(Strict):
    kind: Literal["max_total_params"]
    value: PositiveInt


Constraint = Annotated[MaxActiveParams | MaxTotalParams, Field(discriminator="kind")]


class TPE(Strict):
    kind: Literal["tpe"]
    multivariate: bool = True
    n_startup_trials: Annotated[int, Field(ge=0)] = 5


class RandomSampler(Strict):
    kind: Literal["random"]


class Grid(Strict):
    """Every combination; int/float parameters need a step (float) or a small range (int)."""

    kind: Literal["grid"]


class CmaEs(Strict):
    kind: Literal["cmaes"]


class QMC(Strict):
    kind: Literal["qmc"]
    qmc_type: Literal["sobol", "halton"] = "sobol"


class NSGA2(Strict):
    kind: Literal["nsga2"]
    population_size: Annotated[int, Field(ge=2)] = 8


class GP(Strict):
    kind: Literal["gp"]


Sampler = Annotated[TPE | RandomSampler | Grid | CmaEs | QMC | NSGA2 | GP, Field(discriminator="kind")]


class MedianPruner(Strict):
    kind: Literal["median"]
    n_startup_trials: Annotated[int, Field(ge=0)] = 2
    n_warmup_steps: Annotated[int, Field(ge=0)] = 0


class SuccessiveHalving(Strict):
    kind: Literal["successive_halving"]
    min_resource: PositiveInt | Literal["auto"] = "auto"
    reduction_factor: Annotated[int, Field(ge=2)] = 3


class Hyperband(Strict):
    kind: Literal["hyperband"]
    min_resource: PositiveInt = 1
    reduction_factor: Annotated[int, Field(ge=2)] = 3


class NoPruner(Strict):
    kind: Literal["none"]


Pruner = Annotated[MedianPruner | SuccessiveHalving | Hyperband | NoPruner, Field(discriminator="kind")]


class Trials(Strict):
    n_trials: PositiveInt = Field(description="Trials in total, failed and retried ones included.")
    timeout_s: PositiveInt | None = None
    max_retries: Annotated[int, Field(ge=0)] = 1
    heartbeat_s: PositiveInt = Field(
        10, description="A RUNNING trial silent for 3x this long is failed and retried."
    )


class SweepSpec(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted.path: value for every trial")
    search: Annotated[dict[str, Distribution], Field(min_length=1)]
    constraints: list[Constraint] = Field(default_factory=list)
    objectives: Annotated[
        list[Objective], Field(min_length=1, default_factory=lambda: [Objective(metric="val/loss")])
    ]
    sampler: Sampler = TPE(kind="tpe")
    pruner: Pruner = MedianPruner(kind="median")
    seed: Seed = 0
    trials: Trials
    storage: str | None = Field(None, description="Optuna storage URL; null = sqlite:///optuna.db here.")

    @model_validator(mode="after")
    def _cross(self) -> SweepSpec:
        problems = []
        if len(self.objectives) > 1 and self.pruner.kind != "none":
            problems.append(("pruner", "Optuna cannot prune multi-objective studies: use {kind: none}"))
        if len(self.objectives) > 1 and self.sampler.kind not in ("nsga2", "random", "tpe", "qmc", "grid"):
            problems.append(
                ("sampler", f"{self.sampler.kind} is single-objective: use nsga2 for a Pareto front")
            )
        return check(problems) or self


@dataclass(frozen=True)
class LoadedSweep:
    sweep: SweepSpec
    path: str
    base_path: str  # the run spec the trials extend
    base: LoadedSpec  # base + fixed overrides, validated

    def fixed_overrides(self) -> list[str]:
        return [f"{k}={to_override_text(v)}" for k, v in self.sweep.overrides.items()]


def to_override_text(value: Any) -> str:
    """A value as `--set` text that parses back to the same value."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def load_sweep(
    path: str | Path,
    *,
    as_path: str | Path | None = None,
    text: str | None = None,
    roots: tuple[Path, ...] | None = None,
) -> LoadedSweep:
    """`as_path`, `text`, `roots`: as in load_spec (read `path` as if it lived at `as_path`; the
    content given as `text`; `extends` confined to `roots`). With `as_path`, `.path` stays `path`."""
    if as_path is not None and text is None:
        loaded = load_sweep(as_path, text=_read_text(Path(path)), roots=roots)
        return dataclasses.replace(loaded, path=str(path))
    path = Path(path)
    origins: dict = {}
    data = _read_yaml(path, origins, text) if text is not None or path.is_file() else None
    if data is None:
        raise SpecError(SpecIssue("", f"sweep file not found: {path}"))
    base_ref = data.pop("extends", None)
    issues = []
    if not isinstance(base_ref, str):
        issues.append(
            SpecIssue("extends", "a sweep needs `extends: <relative path of the base run spec>`", str(path))
        )
    try:
        sweep = SweepSpec.model_validate_json(json.dumps(data))
    except ValidationError as err:
        raise SpecError(
            issues + issues_from_validation(SweepSpec, err, lambda p: _origin_of(origins, p))
        ) from None
    issues += _check_paths(sweep, origins)
    if issues:
        raise SpecError(issues)
    base_path = path.parent / base_ref
    if roots is not None and not inside(base_path, roots):
        file, line = _origin_of(origins, ("extends",))
        msg = "must name a run spec inside the spec roots (no absolute paths or '..' leading out)"
        raise SpecError(SpecIssue("extends", msg, file, line))
    overrides = [f"{k}={to_override_text(v)}" for k, v in sweep.overrides.items()]
    base = load_spec(base_path, overrides, roots=roots)
    return LoadedSweep(sweep, str(path), str(base_path), base)


def _check_paths(sweep: SweepSpec, origins: dict) -> list[SpecIssue]:
    """Every searched, overridden or `when` path must exist in the run spec schema."""
    keyed = [(("search", k), k) for k in sweep.search] + [(("overrides", k), k) for k in sweep.overrides]
    keyed += [(("search", k, "when", w), w) for k, d in sweep.search.items() for w in (d.when or {})]
    issues = []
    for where, dotted_path in keyed:
        parts = tuple(dotted_path.split("."))
        if walk(Spec, parts)[1] is None:
            hint = did_you_mean(parts[-1], fields_at(Spec, parts[:-1]))
            file, line = _origin_of(origins, where)
            issues.append(SpecIssue(".".join(where), "not a path of the run spec", file, line, hint=hint))
    return issues
