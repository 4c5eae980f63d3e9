"""The spec's dispatch kinds (capacity, auto) and `train.compile` change what is built, and a
compiled model computes what the eager one does (CPU, inductor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeplat.compile.model import build_model, compile_model
from moeplat.errors import SpecError
from moeplat.nn import MoELayer
from moeplat.spec import load_spec
from moeplat.spec.plan import plan
from moeplat.spec.plan_text import format_plan
from moeplat.train.run import run_tags

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
FACTOR = "model.moe.capacity={kind: factor, train: 1.0, eval: 1.5}"


def _loaded(*overrides: str):
    return load_spec(TINY, list(overrides))


def _moe_layers(model) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def test_capacity_dispatch_without_capacity_factor_names_the_field():
    with pytest.raises(SpecError) as e:
        _loaded("model.moe.dispatch={kind: capacity}")
    assert "model.moe.dispatch" in e.value.format() and "factor" in e.value.format()


@pytest.mark.parametrize(
    ("overrides", "built"),
    [
        (["model.moe.dispatch={kind: capacity}", FACTOR], "capacity"),
        (["model.moe.dispatch={kind: auto}"], "sorted"),  # dropless
        (["model.moe.dispatch={kind: auto}", FACTOR], "sorted"),  # eager: no padding FLOPs
        (["model.moe.dispatch={kind: auto}", FACTOR, "train.compile=true"], "capacity"),
        (["model.moe.dispatch={kind: auto}", "train.compile=true"], "sorted"),  # dropless
    ],
)
def test_dispatch_kind_reaches_the_layers_plan_and_run_tags(overrides, built):
    loaded = _loaded(*overrides)
    layers = _moe_layers(build_model(loaded.spec))
    assert layers and {layer.dispatch for layer in layers} == {built}
    assert run_tags(loaded)["moeplat.dispatch"] == built
    text = format_plan(loaded.spec, plan(loaded.spec))
    kind = loaded.spec.model.moe.dispatch.kind
    assert f"dispatch={kind} -> {built}" in text if kind == "auto" else f"dispatch={built}" in text


def test_compile_option_compiles_in_place_keeping_parameter_names():
    eager = build_model(_loaded().spec)
    assert compile_model(_loaded().spec, eager)._compiled_call_impl is None
    spec = _loaded("train.compile=true").spec
    model = compile_model(spec, build_model(spec))
    assert model._compiled_call_impl is not None
    assert list(model.state_dict()) == list(eager.state_dict())


def _fwd_bwd(model, idx, targets):
    model.zero_grad(set_to_none=True)
    out = model(idx, targets)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["sorted", "capacity"])
def test_compiled_model_matches_eager_on_cpu(dispatch):
    """Loss and every gradient of one training forward/backward, compiled vs eager."""
    spec = _loaded(f"model.moe.dispatch={{kind: {dispatch}}}", FACTOR, "train.compile=true").spec
    eager, compiled = build_model(spec), build_model(spec)
    compile_model(spec, compiled)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (2, 16), generator=g)
    targets = torch.randint(0, 256, (2, 16), generator=g)
    loss_ref, grads_ref = _fwd_bwd(eager, idx, targets)
    loss, grads = _fwd_bwd(compiled, idx, targets)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_capacity_layer_compiles_to_one_graph():
    """Static shapes: fullgraph=True would raise on any graph break (nonzero, .tolist(), .item())."""
    torch.manual_seed(0)
    layer = MoELayer(16, 4, 2, 32, dispatch="capacity", capacity_factor_train=1.0, capacity_factor_eval=1.0)
    x = torch.randn(2, 8, 16)
    ref = layer(x)
    out = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.dropped_frac, ref.dropped_frac)
