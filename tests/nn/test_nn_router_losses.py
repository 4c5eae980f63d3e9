"""Router and auxiliary losses against hand-computed values."""

import math

import pytest
import torch

from moeplat.nn import TopKRouter, expert_load, load_balancing_loss, router_z_loss


def _router(normalize):
    r = TopKRouter(d_model=2, num_experts=3, top_k=2, normalize=normalize)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]))
    return r


@pytest.mark.parametrize("normalize", [True, False])
def test_router_against_hand_computation(normalize):
    out = _router(normalize)(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # token 0: logits [1, 2, 0]; token 1: logits [0, 0, 0] (a 3-way tie)
    z = math.e + math.e**2 + 1
    torch.testing.assert_close(out.logits_TE[0], torch.tensor([1.0, 2.0, 0.0]))
    torch.testing.assert_close(out.probs_TE[0], torch.tensor([math.e / z, math.e**2 / z, 1 / z]))
    assert out.topk_idx_TK[0].tolist() == [1, 0]
    assert out.topk_idx_TK.dtype == torch.int64 and out.topk_weight_TK.dtype == torch.float32
    if normalize:  # Mixtral: renormalised over the chosen two
        expected = torch.tensor([math.e**2, math.e]) / (math.e**2 + math.e)
        torch.testing.assert_close(out.topk_weight_TK[1], torch.tensor([0.5, 0.5]))
    else:  # Switch / Qwen: the raw softmax probabilities
        expected = torch.tensor([math.e**2, math.e]) / z
        torch.testing.assert_close(out.topk_weight_TK[1], torch.tensor([1 / 3, 1 / 3]))
    torch.testing.assert_close(out.topk_weight_TK[0], expected)


def test_router_logits_are_float32_for_bfloat16_inputs():
    torch.manual_seed(0)
    r = TopKRouter(64, 8, 2, normalize=True).to(torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    out = r(x)
    assert out.logits_TE.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
    # Exactly the float32 product of the (bf16-representable) values, not a bf16-rounded one.
    torch.testing.assert_close(out.logits_TE, x.float() @ r.weight.float().t(), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert r(x.float()).logits_TE.dtype == torch.float32


def test_router_rejects_top_k_above_num_experts():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(4, num_experts=2, top_k=3, normalize=True)


def test_load_balancing_is_one_at_perfect_balance():
    T, E = 8, 4  # K = 2
    topk_idx_TK = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])  # every expert: 4 slots
    uniform = torch.full((T, E), 1 / E)
    assert load_balancing_loss(uniform, topk_idx_TK, E).item() == pytest.approx(1.0)
    # With balanced counts f_i = 1/E, the loss is sum_i P_i = 1 for any probabilities.
    probs = torch.rand(T, E).softmax(-1)
    assert load_balancing_loss(probs, topk_idx_TK, E).item() == pytest.approx(1.0)


def test_load_balancing_skewed_hand_value_and_gradient():
    # T=4, E=2, K=1: f = [3/4, 1/4]; P = [(.9+.8+.6+.3)/4, (.1+.2+.4+.7)/4] = [.65, .35]
    # loss = 2 * (.75 * .65 + .25 * .35) = 1.15
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], requires_grad=True)
    idx = torch.tensor([[0], [0], [0], [1]])
    loss = load_balancing_loss(probs, idx, 2)
    assert loss.item() == pytest.approx(1.15)
    loss.backward()
    # d loss / d probs[t, i] = E * f_i / T: f acts as a constant (counts are not differentiable).
    torch.testing.assert_close(probs.grad, torch.tensor([[0.375, 0.125]]).expand(4, 2))


def test_expert_load_fractions():
    load = expert_load(torch.tensor([[0, 1], [0, 2], [0, 1]]), num_experts=4)
    torch.testing.assert_close(load, torch.tensor([3 / 6, 2 / 6, 1 / 6, 0.0]))


def test_z_loss_hand_value():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)
    assert router_z_loss(logits.bfloat16()).dtype == torch.float32


# --- Shazeer et al. 2017 importance / load, DeepSeek-V3 sequence-wise balance ---------------------


def test_cv_squared_hand_value():
    from moeplat.nn.losses import cv_squared

    assert cv_squared(torch.tensor([3.0, 1.0])).item() == pytest.approx(0.25)
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0


def test_importance_loss_hand_value_and_gradient():
    from moeplat.nn.losses import importance_loss

    # E=3: gates t0 -> e0 .6, e1 .4; t1 -> e0 .9, e2 .1 => importance [1.5, .4, .1]
    # mean .6666, variance ((.8333)^2 + (.2666)^2 + (.5666)^2) / 3 = .3622 -> CV^2 = .815
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1]], requires_grad=True)
    idx = torch.tensor([[0, 1], [0, 2]])
    imp = torch.tensor([1.5, 0.4, 0.1])
    expected = ((imp - imp.mean()) ** 2).mean() / imp.mean() ** 2
    loss = importance_loss(w, idx, 3)
    assert loss.item() == pytest.approx(expected.item()) and loss.item() == pytest.approx(0.815, abs=1e-3)
    loss.backward()
    assert w.grad[0, 0] > 0 > w.grad[0, 1]  # more gate to the busiest expert raises the loss
    # A slot that is not routed contributes no gate: masking t1's second slot leaves [1.5, .4, 0].
    masked = importance_loss(w, idx, 3, torch.tensor([[True, True], [True, False]]))
    imp = torch.tensor([1.5, 0.4, 0.0])
    assert masked.item() == pytest.approx((((imp - imp.mean()) ** 2).mean() / imp.mean() ** 2).item())


def test_load_loss_is_cv_squared_of_the_summed_load_probabilities():
    from moeplat.nn.losses import load_loss

    p = torch.tensor([[0.9, 0.2], [0.6, 0.3]], requires_grad=True)  # Load = [1.5, 0.5]: CV^2 = .25
    loss = load_loss(p)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert (p.grad[:, 0] > 0).all() and (p.grad[:, 1] < 0).all()


def test_sequence_balance_loss_hand_values():
    from moeplat.nn.losses import sequence_balance_loss

    # Sequence 0: both tokens to expert 0, probs [[.75, .25], [.25, .75]] -> f [2, 0], P [.5, .5] -> 1.0
    # Sequence 1: both tokens to expert 0, probs [[.9, .1], [.9, .1]] -> f [2, 0], P [.9, .1] -> 1.8
    probs = torch.tensor([[[0.75, 0.25], [0.25, 0.75]], [[0.9, 0.1], [0.9, 0.1]]], requires_grad=True)
    idx = torch.tensor([[[0], [0]], [[0], [0]]])
    loss = sequence_balance_loss(probs, idx, 2)
    assert loss.item() == pytest.approx((1.0 + 1.8) / 2)
    loss.backward()
    # d/dP of mean_b sum_i f_i P_i with P = mean over S: f_i / (B * S) = [2, 0] / 4
    torch.testing.assert_close(probs.grad, torch.tensor([0.5, 0.0]).expand(2, 2, 2))
    balanced = sequence_balance_loss(probs.detach(), torch.tensor([[[0], [1]], [[1], [0]]]), 2)
    assert balanced.item() == pytest.approx(1.0)


def test_sequence_balance_differs_from_the_batch_wide_loss():
    """Each sequence routes all its tokens to one expert, but the batch as a whole is balanced."""
    from moeplat.nn.losses import sequence_balance_loss

    probs_BSE = torch.tensor([[[0.9, 0.1]] * 4, [[0.1, 0.9]] * 4])
    idx_BSK = torch.tensor([[[0]] * 4, [[1]] * 4])
    batch = load_balancing_loss(probs_BSE.reshape(8, 2), idx_BSK.reshape(8, 1), 2)
    per_seq = sequence_balance_loss(probs_BSE, idx_BSK, 2)
    assert batch.item() == pytest.approx(1.0)
    assert per_seq.item() == pytest.approx(2 * 0.9)  # f = [2, 0], P = [.9, .1] in each sequence
