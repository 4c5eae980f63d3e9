"""Everything a run refuses, `validate` refuses first: the schema's numeric bounds, probed by a build.

The test walks every numeric field of the spec models (Pydantic metadata, the same bounds the JSON
Schema shows) and, for each bound, loads a spec with the value AT the bound and builds what
`moeplat run` builds before training: seeds, model, data and one batch, optimizer, scheduler and
one optimizer step, the update schedule, the plan, the Lightning trainer. A value just outside the
bound must be refused by validation. A field with no lower bound is probed at -1: it must be
refused or build (`train.seed: -7` validated, then failed in seed_everything; this test found it).

Each field is probed in the first spec that holds its model (tests/fixtures/tiny.yaml, then the
reference minis and quick-start variants), else in tiny with the variant put in place.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types as at
import pytest
from pydantic import BaseModel

from moeplat.errors import SpecError
from moeplat.spec import load_spec
from moeplat.spec.base import SEED_MAX
from moeplat.spec.root import Spec
from moeplat.spec.sweep import to_override_text

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
SMALL = [
    "train.max_steps=4",
    "train.schedule.warmup_steps=1",
    "train.batch_size=2",
    "data.source.max_bytes=60000",
]
BASES = [
    (TINY, []),
    *((p, SMALL) for p in sorted((REPO / "specs" / "reference").glob("*-mini.yaml"))),
    (REPO / "specs" / "quickstart-dense.yaml", SMALL),
]
# Models no probe can build here, and why (anything else unplaced fails the test).
UNPLACED = {
    "UpcycleInit": "needs a dense checkpoint to upcycle",
    "HfInit": "needs a transformers checkpoint directory (its numbers, noise and seed, are UpcycleInit's too)",
    "TextFilesSource": "needs text files (its only number, max_bytes, is PythonStdlibSource's too)",
    "HfDatasetSource": "needs dataset files (its only number, max_bytes, is PythonStdlibSource's too)",
    "SamplesSpec": "needs prompts (text); its bounds are probed in tests/train/test_samples.py",
    "EvalTasks": "needs task names (text); its bounds are probed in tests/spec/test_spec_eval_tasks.py",
}


@dataclass(frozen=True)
class Probe:
    path: str  # dotted spec path of the field
    value: int | float
    inside: bool  # within the declared bounds (must validate, then build) or outside (refused)
    base: Path
    overrides: tuple[str, ...]  # the base's, plus those putting the variant in place

    @property
    def id(self) -> str:
        return f"{self.path}={self.value}{'' if self.inside else ' (outside)'}"


def _numeric(tp) -> tuple[type, list] | None:
    """(int or float, bound metadata) of a field type such as Optional[Annotated[int, Gt(0)]]."""
    meta: list = []
    while typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        meta += extra
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            if (found := _numeric(member)) is not None:
                return found[0], meta + found[1]
        return None
    return (tp, meta) if tp in (int, float) else None


def _models(tp) -> list[type[BaseModel]]:
    if typing.get_origin(tp) is typing.Annotated:
        return _models(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _models(a)]
    return [tp] if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _locations(model=Spec, path: tuple = ()) -> list[tuple[type[BaseModel], tuple]]:
    """Every spec model and the dotted place it sits at (a mapping, not inside a list)."""
    out = [(model, path)]
    for name, f in model.model_fields.items():
        if typing.get_origin(f.annotation) is not list:
            out += [loc for sub in _models(f.annotation) for loc in _locations(sub, (*path, name))]
    return out


def _values(tp: type, meta: list) -> list[tuple[int | float, bool]]:
    """(value, inside) pairs: at each declared bound and just past it; -1 where there is no lower bound."""
    step = 1 if tp is int else 1e-6
    flat = [c for m in meta for c in (getattr(m, "metadata", None) or [m])]  # FieldInfo holds its own
    bounds = {type(c): c for c in flat}
    out = []
    for kind, attr, sign in ((at.Ge, "ge", 0), (at.Gt, "gt", 1), (at.Le, "le", 0), (at.Lt, "lt", -1)):
        if kind in bounds:
            edge = getattr(bounds[kind], attr)
            direction = 1 if kind in (at.Ge, at.Gt) else -1
            inside = edge + sign * step
            out += [(inside, True), (inside - direction * step, False)]
    if not {at.Ge, at.Gt} & set(bounds):
        out.append((-1 if tp is int else -1.0, True))  # refused, or it must build
    return out


def _fits(d, model: type[BaseModel]) -> bool:
    fields = model.model_fields
    if not isinstance(d, dict) or not set(d) <= set(fields):
        return False
    if "kind" in fields and d.get("kind") not in typing.get_args(fields["kind"].annotation):
        return False
    return all(k in d for k, f in fields.items() if f.is_required())


def _get(tree, path: tuple):
    for part in path:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


@functools.cache
def _dumped(base: Path, overrides: tuple[str, ...]) -> dict:
    """The validated spec with every default filled in (sections left out of the file included)."""
    return load_spec(base, list(overrides)).spec.model_dump(mode="json")


def _minimal(model: type[BaseModel], here: dict) -> dict | None:
    """An instance of `model` in the place of `here` (another variant, or {}): the values of the
    fields they share (e.g. d_ff), the kind tag, and the smallest allowed value of any other
    required number; None if a required field is not a number (a list of paths, a checkpoint)."""
    out = {k: v for k, v in here.items() if k in model.model_fields and k != "kind"}
    for name, f in model.model_fields.items():
        if name == "kind":
            out["kind"] = typing.get_args(f.annotation)[0]
        elif f.is_required() and name not in out:
            if (num := _numeric(f.annotation)) is None:
                return None
            out[name] = next(v for v, inside in _values(num[0], [*f.metadata, *num[1]]) if inside)
    return out


def _placement(model: type[BaseModel], path: tuple) -> tuple[Path, tuple[str, ...]] | None:
    """The first base holding `model` at `path`, else the first holding another variant there
    (replaced by this one), else tiny with the variant added. A variant is set whole, `kind`
    included, since the file itself may leave it to a default."""
    dumps = [(base, tuple(ov), _get(_dumped(base, tuple(ov)), path)) for base, ov in BASES]
    found = next(((b, ov, d) for b, ov, d in dumps if _fits(d, model)), None)
    if found is None:
        b, ov, d = next(((b, ov, d) for b, ov, d in dumps if isinstance(d, dict)), (TINY, (), {}))
        found = (b, ov, _minimal(model, d))
        if found[2] is None:
            return None
    base, overrides, variant = found
    if "kind" in model.model_fields or (base == TINY and not _get(_dumped(TINY, ()), path)):
        overrides = (*overrides, f"{'.'.join(path)}={to_override_text(variant)}")
    return base, overrides


def _probes() -> tuple[list[Probe], set[str]]:
    probes, unplaced, seen = [], set(), set()
    for model, path in _locations():
        fields = [
            (
                n,
                (num[0], [*f.metadata, *num[1]]),
            )  # Pydantic moves a field's own Annotated bounds to f.metadata
            for n, f in model.model_fields.items()
            if (num := _numeric(f.annotation))
        ]
        if not fields or (model, path) in seen:
            continue
        seen.add((model, path))
        place = _placement(model, path)
        if place is None:
            unplaced.add(model.__name__)
            continue
        for name, (tp, meta) in fields:
            for value, inside in _values(tp, meta):
                probes.append(Probe(".".join((*path, name)), value, inside, *place))
    return probes, unplaced


PROBES, UNPLACED_FOUND = _probes()
# Values at a field's own bound that another rule refuses (so they never reach a run), and the rule.
REFUSED_AT_A_BOUND: dict[str, str] = {
    "model.vocab_size=2": "the byte tokenizer needs 256",
    "model.d_model=1": "n_heads must divide d_model",
    "model.attention.head_dim=1": "rotary embeddings need an even head dim",
    "model.attention.qk_rope_head_dim=1": "rotary embeddings need an even head dim",
    "model.moe.layers.k=0": "first_dense with no dense layer leaves dense_ffn unused",
    "model.moe.router.n_groups=1": "topk_groups must be <= n_groups",
    "model.moe.losses.load.coef=0.0": "the load loss needs a noisy_topk router",
    "model.moe.router.null_balance_weight=1e-06": "weighs null experts: needs router.null_experts >= 1",
    "train.max_steps=1": "warmup must end before max_steps",
    "data.val_tokens=1": "validation needs at least one sequence (data.seq_len tokens)",
}
# Refused when the run reads its data, which validate (spec-only, no data) cannot: a SpecError
# naming the field and what to change, exit 2 like validate's.
REFUSED_BY_THE_DATA: dict[str, str] = {
    "data.source.max_bytes=1": "keeps no documents: the first one drawn is larger",
}


def test_every_model_with_numbers_is_probed():
    assert set(UNPLACED) == UNPLACED_FOUND


def test_seeds_take_numpys_range():
    for value in (0, SEED_MAX):
        assert load_spec(TINY, [f"train.seed={value}", f"data.split_seed={value}"]).spec.train.seed == value
    for value in (-7, SEED_MAX + 1):
        with pytest.raises(SpecError, match=r"train\.seed"):
            load_spec(TINY, [f"train.seed={value}"])


@pytest.mark.parametrize("probe", [p for p in PROBES if not p.inside], ids=lambda p: p.id)
def test_a_value_past_a_bound_is_refused_by_validate(probe):
    with pytest.raises(SpecError) as info:
        load_spec(probe.base, [*probe.overrides, f"{probe.path}={probe.value}"])
    assert any(i.path == probe.path for i in info.value.issues), info.value.format()


@pytest.mark.parametrize("probe", [p for p in PROBES if p.inside], ids=lambda p: p.id)
def test_a_value_validate_accepts_builds(probe, tmp_path):
    try:
        loaded = load_spec(probe.base, [*probe.overrides, f"{probe.path}={probe.value}"])
    except SpecError as e:  # refused up front: what the test asks for (REFUSED_AT_A_BOUND lists why)
        assert probe.id in REFUSED_AT_A_BOUND or probe.value in (-1, -1.0), e.format()
        return
    try:
        _build(loaded, tmp_path)
    except SpecError as e:
        assert probe.id in REFUSED_BY_THE_DATA and probe.path in e.format(), e.format()


def _build(loaded, tmp_path: Path) -> None:
    """What `moeplat run` builds before its first step (moeplat.train.run._run), one step taken."""
    import lightning as L
    import torch

    from moeplat.cli.launch import run_preflight
    from moeplat.compile.data import build_data
    from moeplat.compile.model import build_model
    from moeplat.compile.optim import build_optimizer, build_scheduler, build_update_schedule
    from moeplat.compile.trainer import checkpoint_callback, trainer_kwargs
    from moeplat.spec.plan import plan
    from moeplat.train.callbacks import Throughput

    spec, train = loaded.spec, loaded.spec.train
    run_preflight(spec)
    L.seed_everything(train.seed, workers=True, verbose=False)
    model = build_model(spec)
    datamodule, _ = build_data(spec, loaded.base_dir)
    datamodule.setup("fit")
    x_BS, y_BS = next(iter(datamodule.train_dataloader()))
    optimizer = build_optimizer(train, model)
    scheduler = build_scheduler(train, optimizer)
    build_update_schedule(train, model)
    out = model(x_BS, y_BS)
    (out.loss + out.aux_loss).backward()
    if train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    scheduler.step()
    counts = plan(spec)
    Throughput(
        counts.tokens_per_step,
        every=train.log_every,
        flops_per_token=counts.flops_per_token_train,
        peak_tflops=spec.tracking.peak_tflops,
        devices=spec.parallel.world_size,
    )
    if spec.parallel.strategy.kind != "expert_parallel":  # its strategy needs the process group
        L.Trainer(
            **trainer_kwargs(spec),
            logger=False,
            callbacks=[checkpoint_callback(spec, tmp_path)],
            enable_progress_bar=False,
            default_root_dir=tmp_path,
        )


def test_every_sweep_workers_sampler_seed_is_in_numpys_range():
    """Worker seeds are sweep.seed + 7919 * worker, the worker index defaulting to the process id
    (up to 4194304 on Linux): optuna's samplers refuse seeds past 2**32 - 1."""
    from moeplat.spec.sweep import load_sweep
    from moeplat.sweep.study import make_sampler

    loaded = load_sweep(REPO / "specs" / "sweeps" / "quickstart-k-capacity.yaml")
    sweep = loaded.sweep.model_copy(update={"seed": SEED_MAX})
    make_sampler(sweep, worker=4_194_304)  # raised ValueError: Seed must be between 0 and 2**32 - 1
