"""Pyramid layouts, the residual-MoE coefficient and the DeepSeek-V2 device-level losses: each
spec option changes what moeplat.compile.model builds, and bad combinations name their field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeplat.compile.model import build_model
from moeplat.errors import SpecError
from moeplat.nn import MoELayer
from moeplat.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"
FOUR_LAYERS = "model.n_layers=4"


def _spec(*overrides: str):
    return load_spec(TINY, list(overrides)).spec


def _moe_layers(*overrides: str) -> list[MoELayer]:
    model = build_model(_spec(*overrides))
    return [b.ffn for b in model.blocks if isinstance(b.ffn, MoELayer)]


def _problems(*overrides: str) -> dict[str, str]:
    with pytest.raises(SpecError) as e:
        _spec(*overrides)
    return {i.path: i.message for i in e.value.issues}


# --- pyramid layouts ------------------------------------------------------------------------------


def test_pyramid_lists_give_each_moe_layer_its_experts_and_top_k():
    layers = _moe_layers(FOUR_LAYERS, "model.moe.num_experts=[2, 4, 4, 8]", "model.moe.top_k=[1, 1, 2, 2]")
    assert [(m.num_experts, m.top_k) for m in layers] == [(2, 1), (4, 1), (4, 2), (8, 2)]
    assert [m.router.weight.shape[0] for m in layers] == [2, 4, 4, 8]
    assert [m.experts.w_up.shape[0] for m in layers] == [2, 4, 4, 8]


def test_pyramid_lists_count_moe_layers_only_and_scale_with_granularity():
    layers = _moe_layers(
        FOUR_LAYERS,
        "model.moe.layers={kind: every, n: 2, offset: 1}",
        "model.dense_ffn={kind: swiglu, d_ff: 48}",
        "model.moe.num_experts=[2, 8]",
        "model.moe.granularity=2",
    )
    assert [(m.num_experts, m.top_k) for m in layers] == [(4, 4), (16, 4)]  # E*m, K*m per layer


def test_a_single_number_still_applies_to_every_layer():
    layers = _moe_layers(FOUR_LAYERS, "model.moe.top_k=[1, 2, 1, 2]")
    assert [(m.num_experts, m.top_k) for m in layers] == [(4, 1), (4, 2), (4, 1), (4, 2)]


def test_pyramid_mistakes_name_the_field():
    got = _problems(FOUR_LAYERS, "model.moe.num_experts=[4, 8]")
    assert "has 2 entries but moe.layers selects 4 MoE layers" in got["model.moe.num_experts"]
    got = _problems(FOUR_LAYERS, "model.moe.num_experts=[4, 4, 2, 8]", "model.moe.top_k=[2, 2, 4, 2]")
    assert got["model.moe.top_k"] == "top_k (4) must be <= num_experts (2)"
    got = _problems(FOUR_LAYERS, "model.moe.num_experts=[4, 4, 4]", "model.moe.top_k=[1, 1]")
    assert "has 2 entries, num_experts 3" in got["model.moe.top_k"]
    got = _problems("model.moe.router={kind: switch}", "model.moe.top_k=[1, 2]")
    assert "routes to 1 expert(s)" in got["model.moe.top_k"]
    got = _problems("model.moe.num_experts=[4, 1]")
    assert "greater than or equal to 2" in got["model.moe.num_experts.1"]


# --- residual MoE (PR-MoE) ------------------------------------------------------------------------


def test_residual_coefficient_builds_the_mixing_projection_and_changes_the_output():
    shared = "model.moe.shared_experts={count: 1, d_ff: 32"
    plain_layers = _moe_layers(shared + "}")
    mixed_layers = _moe_layers(shared + ", residual_coefficient: true}")
    assert plain_layers[0].residual_coef is None and mixed_layers[0].residual_coef is not None
    x = torch.randn(8, 32)
    plain, mixed = plain_layers[0], mixed_layers[0]
    mixed.load_state_dict(
        {
            **plain.state_dict(),
            **{f"residual_coef.{k}": v for k, v in mixed.residual_coef.state_dict().items()},
        }
    )
    with torch.no_grad():
        assert not torch.allclose(plain(x).y, mixed(x).y)


def test_residual_coefficient_mistakes_name_the_field():
    got = _problems("model.moe.shared_experts={count: 0, residual_coefficient: true}")
    assert "count is 0" in got["model.moe.shared_experts.residual_coefficient"]
    got = _problems("model.moe.shared_experts={count: 1, gate: true, residual_coefficient: true}")
    assert "choose one" in got["model.moe.shared_experts.residual_coefficient"]


# --- variance, device-level and communication balance losses --------------------------------------


def test_loss_coefficients_reach_the_layer_and_weight_the_aux_loss():
    (layer, _) = _moe_layers(
        "model.moe.losses={variance: {coef: 0.5}, device_balance: {coef: 0.25}, "
        "communication_balance: {coef: 0.125}, devices: 2, max_devices: 1}"
    )
    assert (layer.num_devices, layer.max_devices) == (2, 1)
    out = layer(torch.randn(2, 8, 32))
    want = 0.5 * out.losses["variance"] + 0.25 * out.losses["device_balance"]
    torch.testing.assert_close(out.aux_loss, want + 0.125 * out.losses["communication_balance"])


def test_devices_default_to_the_groups_of_a_group_limited_router():
    (layer, _) = _moe_layers(
        "model.moe.num_experts=8",
        "model.moe.router={kind: group_limited, n_groups: 4, topk_groups: 2}",
        "model.moe.losses={device_balance: {coef: 0.1}, communication_balance: {coef: 0.1}}",
    )
    assert (layer.num_devices, layer.max_devices) == (4, 2)
    (layer, _) = _moe_layers("model.moe.losses={device_balance: {coef: 0.1}, devices: 4}")
    assert (layer.num_devices, layer.max_devices) == (4, 2)  # M = min(top_k, D) without groups


def test_device_loss_mistakes_name_the_field():
    got = _problems("model.moe.losses={device_balance: {coef: 0.1}}")
    assert "need losses.devices" in got["model.moe.losses.devices"]
    got = _problems("model.moe.losses={communication_balance: {coef: 0.1}, devices: 3}")
    assert "do not split into 3 devices" in got["model.moe.losses.devices"]
    got = _problems("model.moe.losses={device_balance: {coef: 0.1}, devices: 2, max_devices: 4}")
    assert "max_devices (4) must be <= devices (2)" in got["model.moe.losses.max_devices"]
    got = _problems(
        FOUR_LAYERS,
        "model.moe.num_experts=[4, 4, 6, 6]",
        "model.moe.losses={device_balance: {coef: 0.1}, devices: 4}",
    )
    assert "the 6 routed experts do not split into 4 devices" in got["model.moe.losses.devices"]
