"""The variance, device-level and communication balance losses against hand-computed values
(DeepSeek-V2 sec. 2.2.3 eq. 26-30), and the residual-MoE mixing (DeepSpeed-MoE sec. 4.1.1)."""

import pytest
import torch

from moeplat.nn import MoELayer
from moeplat.nn.losses import (
    communication_balance_loss,
    device_balance_loss,
    load_balancing_loss,
    probability_variance_loss,
)


def test_variance_loss_hand_values():
    assert float(probability_variance_loss(torch.tensor([[0.75, 0.25]]))) == pytest.approx(0.25)
    assert float(probability_variance_loss(torch.full((5, 4), 0.25))) == pytest.approx(0.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(3, 1)
    assert float(probability_variance_loss(collapsed)) == pytest.approx(3.0)  # E - 1


def test_device_balance_hand_value():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    idx = torch.tensor([[0]])
    # f = [4, 0, 0, 0] -> f' = [2, 0]; P' = [.7, .3] -> 1.4
    assert float(device_balance_loss(probs, idx, 2)) == pytest.approx(1.4)


def test_device_balance_with_one_expert_per_device_is_the_expert_level_loss():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(32, 8, generator=g), -1)
    idx = probs.topk(2, dim=-1).indices
    torch.testing.assert_close(device_balance_loss(probs, idx, 8), load_balancing_loss(probs, idx, 8))


def test_communication_balance_counts_a_token_once_per_device():
    probs = torch.full((2, 4), 0.25)
    both_on_device0 = torch.tensor([[0, 1], [0, 1]])
    # tokens per device [2, 0], M=1 -> f'' = 2/(1*2) * [2, 0] = [2, 0]; P'' = [.5, .5] -> 1.0
    assert float(communication_balance_loss(probs, both_on_device0, 2, 1)) == pytest.approx(1.0)
    # the device loss counts slots instead: f = 4/(2*2) * [2, 2, 0, 0] -> f' = [2, 0] -> also 1.0
    spread = torch.tensor([[0, 2], [1, 3]])  # every token on both devices: f'' = 2/(2*2) * [2, 2]
    assert float(communication_balance_loss(probs, spread, 2, 2)) == pytest.approx(1.0)
    skew = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    # P'' = [.8, .2], all tokens to device 0 with M=1 -> f'' = [2, 0] -> 1.6
    assert float(communication_balance_loss(skew, both_on_device0, 2, 1)) == pytest.approx(1.6)


def test_device_losses_respect_the_valid_mask():
    probs = torch.full((2, 4), 0.25)
    idx = torch.tensor([[0, 2], [1, 3]])
    valid = torch.tensor([[True, False], [True, False]])  # only device-0 slots count
    assert float(communication_balance_loss(probs, idx, 2, 1, valid)) == pytest.approx(1.0)
    assert float(device_balance_loss(probs, idx, 2, valid)) == pytest.approx(1.0)  # f' = [2, 0]


def test_device_losses_differentiate_through_the_probabilities_only():
    logits = torch.randn(16, 4, requires_grad=True)
    probs = torch.softmax(logits, -1)
    idx = probs.topk(1, dim=-1).indices
    (device_balance_loss(probs, idx, 2) + communication_balance_loss(probs, idx, 2, 1)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_moe_layer_reports_and_weights_the_device_losses():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    off = MoELayer(16, 4, 2, 32, num_devices=2, max_devices=2)
    on = MoELayer(
        16,
        4,
        2,
        32,
        num_devices=2,
        max_devices=2,
        device_balance_coef=0.5,
        communication_balance_coef=0.25,
        variance_coef=2.0,
    )
    on.load_state_dict(off.state_dict())
    out_off, out_on = off(x), on(x)
    assert float(out_off.aux_loss) == 0.0
    want = 0.5 * out_on.losses["device_balance"] + 0.25 * out_on.losses["communication_balance"]
    want = want + 2.0 * out_on.losses["variance"]
    torch.testing.assert_close(out_on.aux_loss, want)
    assert "device_balance" not in MoELayer(16, 4, 2, 32)(x).losses  # no devices, nothing to report


def test_moe_layer_rejects_device_losses_without_devices():
    with pytest.raises(ValueError, match="num_devices"):
        MoELayer(16, 4, 2, 32, device_balance_coef=0.1)
    with pytest.raises(ValueError, match="divide"):
        MoELayer(16, 6, 2, 32, num_devices=4)


def test_residual_coefficient_mixes_routed_and_shared_output_by_a_softmax():
    torch.manual_seed(0)
    x = torch.randn(10, 16, dtype=torch.float64)
    plain = MoELayer(16, 4, 1, 32, n_shared_experts=1).double()
    mixed = MoELayer(16, 4, 1, 32, n_shared_experts=1, residual_coef=True).double()
    mixed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        routed = plain(x).y - plain.shared(x)
        c = torch.softmax(x @ mixed.residual_coef.weight.T + mixed.residual_coef.bias, -1)
        want = routed * c[:, :1] + plain.shared(x) * c[:, 1:]
        torch.testing.assert_close(mixed(x).y, want)
    assert mixed.residual_coef.weight.shape == (2, 16) and mixed.residual_coef.bias.shape == (2,)
    with pytest.raises(ValueError, match="n_shared_experts"):
        MoELayer(16, 4, 1, 32, residual_coef=True)
