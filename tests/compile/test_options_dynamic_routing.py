"""Router kind top_p, router.null_experts / null_balance_weight and losses.dynamic: each option is
validated, changes what moeplat.compile builds, and the whole model trains a few steps with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeplat import nn as mnn
from moeplat.compile.model import build_model, build_moe_layer
from moeplat.errors import SpecError
from moeplat.nn.losses import null_balancing_loss
from moeplat.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
TOP_P = "model.moe.router={kind: top_p, p: 0.5}"
NULLS = "model.moe.router={kind: topk, null_experts: 2}"


def _spec(*overrides: str):
    return load_spec(TINY, list(overrides)).spec


def _layer(*overrides: str) -> mnn.MoELayer:
    spec = _spec(*overrides)
    torch.manual_seed(0)
    return build_moe_layer(spec.model.moe, spec.model.d_model, spec.model.vocab_size)


def _x(tokens: int = 64) -> torch.Tensor:
    return torch.randn(tokens, 32, generator=torch.Generator().manual_seed(2))


def test_top_p_builds_its_router_and_p_sets_the_experts_per_token():
    layer = _layer(TOP_P, "model.moe.top_k=4")
    assert isinstance(layer.router, mnn.TopPRouter)
    assert (layer.router.p, layer.router.top_k, layer.router.normalize) == (0.5, 4, False)
    counts = [
        _layer(f"model.moe.router={{kind: top_p, p: {p}}}", "model.moe.top_k=4")(_x()).stats.experts_per_token
        for p in (0.3, 0.6, 0.9)
    ]
    assert counts[0] < counts[1] < counts[2] <= 4
    capped = _layer("model.moe.router={kind: top_p, p: 0.9}", "model.moe.top_k=2")(_x())
    assert capped.stats.experts_per_token <= 2


def test_top_p_normalize_rescales_the_chosen_weights():
    raw = _layer(TOP_P, "model.moe.top_k=4").router(_x())
    norm = _layer("model.moe.router={kind: top_p, p: 0.5, normalize: true}", "model.moe.top_k=4").router(_x())
    torch.testing.assert_close(norm.topk_weight_TK.sum(-1), torch.ones(64))
    assert (raw.topk_weight_TK.sum(-1) < 0.999).any()
    torch.testing.assert_close(
        norm.topk_weight_TK, raw.topk_weight_TK / raw.topk_weight_TK.sum(-1, keepdim=True)
    )


def test_null_experts_widen_the_router_and_null_balance_weight_is_tau():
    layer = _layer(NULLS, "model.moe.losses={load_balancing: {coef: 1.0}}")
    assert isinstance(layer.router, mnn.TopKRouter) and layer.router.null_experts == 2
    assert layer.router.weight.shape == (4 + 2, 32) and layer.num_experts == 4
    assert layer.null_balance_weight == 0.75  # the spec's default (MoE++ 7B)
    other = _layer(
        "model.moe.router={kind: topk, null_experts: 2, null_balance_weight: 0.25}",
        "model.moe.losses={load_balancing: {coef: 1.0}}",
    )
    out, full = other(_x()), other.router(_x()).null
    assert out.losses["load_balancing"].item() == pytest.approx(
        null_balancing_loss(full.probs_TX, full.topk_idx_TK, 4, 0.25).item()
    )
    assert out.stats.null_frac is not None and 0 < out.stats.null_frac < 1


def test_losses_dynamic_coef_weights_the_router_entropy():
    off = _layer(TOP_P, "model.moe.losses={}")(_x())
    on = _layer(TOP_P, "model.moe.losses={dynamic: {coef: 0.5}}")(_x())
    assert off.aux_loss.item() == 0 and "dynamic" not in off.losses
    assert on.aux_loss.item() == pytest.approx(0.5 * on.losses["dynamic"].item())
    assert on.losses["dynamic"].item() == pytest.approx(on.stats.router_entropy.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (["model.moe.router={kind: top_p, p: 0}"], "model.moe.router.p"),
        (["model.moe.router={kind: top_p, p: 1.01}"], "model.moe.router.p"),
        (
            ["model.moe.router={kind: switch, null_experts: 2}", "model.moe.top_k=1"],
            "model.moe.router.null_experts",
        ),
        (["model.moe.router={kind: top_p, null_experts: 2}"], "model.moe.router.null_experts"),
        (["model.moe.router.null_experts=-1"], "model.moe.router.null_experts"),
        (["model.moe.router.null_balance_weight=0.5"], "model.moe.router.null_balance_weight"),
        ([NULLS, "model.moe.losses.load_balancing.scope=sequence"], "model.moe.losses.load_balancing.scope"),
        (
            [
                "model.moe.router={kind: topk, null_experts: 2, null_balance_weight: 0.5}",
                "model.moe.losses={}",
            ],
            "model.moe.router.null_balance_weight",
        ),
        (["model.moe.losses={dynamic: {coef: -1}}"], "model.moe.losses.dynamic.coef"),
    ],
)
def test_bad_values_name_their_field(overrides, path):
    with pytest.raises(SpecError) as info:
        _spec(*overrides)
    assert any(i.path == path for i in info.value.issues), info.value.format()


@pytest.mark.parametrize(
    ("overrides", "fewest"),
    [
        ([TOP_P, "model.moe.top_k=4", "model.moe.losses.dynamic={coef: 0.001}"], 1),  # top-p: >= 1
        ([NULLS], 0),  # null experts: a token may get none
        ([NULLS, "model.moe.capacity={kind: factor, train: 1.0}"], 0),
    ],
    ids=["top_p", "null_experts", "null_experts_capacity"],
)
def test_the_model_trains_a_few_steps(overrides, fewest):
    spec = _spec(*overrides)
    torch.manual_seed(0)
    model = build_model(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randint(0, spec.model.vocab_size, (2, 16), generator=g)
        out = model(idx[:, :-1], idx[:, 1:])
        loss = out.loss + out.aux_loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for o in out.moe.values():
        assert fewest <= o.stats.experts_per_token <= spec.model.moe.top_k
