"""Search space -> define-by-run sampling: conditions, mapping choices, grid, export round trip."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from moeplat.errors import SpecError
from moeplat.spec import load_spec
from moeplat.spec.sweep import load_sweep
from moeplat.sweep.space import grid_space, ordered_params, overrides_from_params, suggest

REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def k_capacity():
    return load_sweep(REPO / "specs" / "sweeps" / "quickstart-k-capacity.yaml")


def _sample(loaded, n=40, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((suggest(trial, loaded), trial.params))
        study.tell(trial, 0.0)
    return out


def test_conditional_parameter_only_when_its_condition_holds(k_capacity):
    seen_factor = seen_dropless = False
    for overrides, params in _sample(k_capacity):
        spec = load_spec(k_capacity.base_path, overrides).spec  # every sample is a valid run spec
        capacity = spec.model.moe.capacity
        if capacity.kind == "factor":
            seen_factor = True
            assert "model.moe.capacity.train" in params
            assert capacity.train == params["model.moe.capacity.train"]  # applied after the mapping
        else:
            seen_dropless = True
            assert "model.moe.capacity.train" not in params
        assert spec.model.moe.top_k == params["model.moe.top_k"]
        assert spec.train.max_steps == 150  # fixed overrides come with every trial
    assert seen_factor and seen_dropless


def test_dependent_parameters_come_after_what_they_read(k_capacity):
    order = ordered_params(k_capacity.sweep)
    assert order.index("model.moe.capacity") < order.index("model.moe.capacity.train")


def test_when_cycle_is_an_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"extends: {REPO / 'tests/fixtures/tiny.yaml'}\nname: s\ntrials: {{n_trials: 1}}\nsearch:\n"
        "  model.moe.top_k: {kind: int, low: 1, high: 2, when: {train.seed: 1}}\n"
        "  train.seed: {kind: int, low: 0, high: 1, when: {model.moe.top_k: 1}}\n"
    )
    with pytest.raises(SpecError, match="cycle"):
        ordered_params(load_sweep(path).sweep)


def test_exported_overrides_reproduce_the_sampled_configuration(k_capacity):
    for overrides, params in _sample(k_capacity, n=10, seed=1):
        assert overrides_from_params(k_capacity, params) == overrides


def test_grid_space_enumerates_steps_and_choices(k_capacity):
    space = grid_space(
        k_capacity.sweep.model_copy(
            update={
                "search": {
                    k: v
                    for k, v in k_capacity.sweep.search.items()
                    if k != "model.moe.losses.load_balancing.coef"
                }
            }
        )
    )
    assert space["model.moe.top_k"] == [1, 2, 3, 4]
    assert space["model.moe.capacity.train"] == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert len(space["model.moe.capacity"]) == 2
    with pytest.raises(SpecError, match="step"):
        grid_space(k_capacity.sweep)  # a log-float has no grid


def test_parallel_workers_get_different_sampler_seeds(k_capacity):
    """Two workers seeded alike would propose the very same configurations side by side."""
    from moeplat.sweep.study import make_sampler

    def first(worker):
        study = optuna.create_study(sampler=make_sampler(k_capacity.sweep, worker))
        return suggest(study.ask(), k_capacity)

    assert first(0) == first(0)  # reproducible per worker
    assert first(0) != first(1)
