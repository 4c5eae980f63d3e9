"""Dynamic routing: top-p (Huang et al. 2024) and null experts (MoE++, Jin et al. 2024), checked
against hand-computed tables and plain references."""

from __future__ import annotations

import math

import pytest
import torch

from moeplat.nn import MoELayer, TopKRouter
from moeplat.nn.losses import dynamic_loss, load_balancing_loss, null_balancing_loss
from moeplat.nn.routers import TopPRouter, top_p_choice, top_p_reference


def _chosen(idx, weight, valid):
    """Per token: sorted [(expert, weight)] of the valid slots."""
    return [
        sorted((e, round(w, 6)) for e, w, v in zip(i, ws, vs, strict=True) if v)
        for i, ws, vs in zip(idx.tolist(), weight.tolist(), valid.tolist(), strict=True)
    ]


def _fixed_probs_router(router, probs_TX):
    """Make router.logits(x) = log(probs) for x = log(probs): d_model = X, W = identity."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(probs_TX.shape[1]))
    return probs_TX.log()


def test_top_p_choice_hand_table():
    probs = torch.tensor(
        [
            [0.5, 0.25, 0.125, 0.125],  # before = [0, .5, .75, .875]: .5 < .6 -> two experts
            [0.1, 0.7, 0.1, 0.1],  # top-1 (.7) already exceeds p: one expert
            [0.125, 0.5, 0.25, 0.125],  # reaching p exactly stops: before of the 2nd is .5, p .5 -> one
        ]
    )
    idx, w, valid = top_p_choice(probs[:2], 0.6, 4)
    assert _chosen(idx, w, valid) == [[(0, 0.5), (1, 0.25)], [(1, 0.7)]]
    assert valid.sum(1).tolist() == [2, 1] and w[~valid].abs().sum() == 0
    idx, w, valid = top_p_choice(probs[2:], 0.5, 4)
    assert _chosen(idx, w, valid) == [[(1, 0.5)]]
    idx, w, valid = top_p_choice(probs[2:], 0.51, 4)  # now .5 < .51: the 2nd (expert 2) crosses p
    assert _chosen(idx, w, valid) == [[(1, 0.5), (2, 0.25)]]


def test_top_p_ties_cap_and_p_one():
    uniform = torch.full((1, 4), 0.25)
    idx, w, valid = top_p_choice(uniform, 0.6, 4)  # before [0, .25, .5, .75]: three of the tied four
    assert valid.sum().item() == 3 and len(set(idx[valid].tolist())) == 3
    assert w[valid].tolist() == [0.25] * 3
    _, _, valid = top_p_choice(uniform, 0.6, 2)  # top_k caps the count
    assert valid.tolist() == [[True, True]]
    # p = 1 takes every slot, even when a float32 cumulative sum reaches 1 before the last expert
    probs = torch.tensor([[1 - 3e-8, 1e-8, 1e-8, 1e-8]])
    _, _, valid = top_p_choice(probs, 1.0, 4)
    assert valid.all()


@pytest.mark.parametrize("p,max_k", [(0.3, 8), (0.5, 8), (0.8, 3), (0.95, 8), (1.0, 5)])
def test_top_p_choice_equals_the_plain_reference(p, max_k):
    g = torch.Generator().manual_seed(1)
    probs = (torch.randn(64, 8, generator=g) * 2).softmax(-1)
    idx, w, valid = top_p_choice(probs, p, max_k)
    ref = [sorted((e, round(pr, 6)) for e, pr in row) for row in top_p_reference(probs, p, max_k)]
    assert _chosen(idx, w, valid) == ref


@pytest.mark.parametrize("normalize", [False, True])
def test_top_p_router_weights(normalize):
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.7, 0.1, 0.1]])
    router = TopPRouter(4, 4, 4, p=0.6, normalize=normalize)
    out = router(_fixed_probs_router(router, probs))
    torch.testing.assert_close(out.probs_TE, probs)
    expected = [[(0, 2 / 3), (1, 1 / 3)], [(1, 1.0)]] if normalize else [[(0, 0.5), (1, 0.25)], [(1, 0.7)]]
    got = _chosen(out.topk_idx_TK, out.topk_weight_TK, out.valid_TK)
    assert [[(e, pytest.approx(w, abs=1e-6)) for e, w in row] for row in expected] == got
    with pytest.raises(ValueError, match="p must be in"):
        TopPRouter(4, 4, 2, p=0.0)


def _recording_hidden(experts):
    """Count the rows each call of experts.hidden sees (every dispatcher computes through it)."""
    rows = []
    original = experts.hidden

    def hidden(gate, up):
        rows.append(up.shape[:-1].numel())
        return original(gate, up)

    experts.hidden = hidden
    return rows


def test_top_p_layer_computes_only_the_chosen_slots():
    """An unchosen slot never reaches an expert: the rows the experts compute are the chosen
    slots, with the sorted and the loop dispatcher, and the output is the plain sum."""
    torch.manual_seed(0)
    E, D = 6, 8
    x = torch.randn(32, D)
    outputs = {}
    for dispatch in ("loop", "sorted", "capacity"):
        torch.manual_seed(1)
        cap = {"capacity_factor_train": 8.0, "capacity_factor_eval": 8.0} if dispatch == "capacity" else {}
        layer = MoELayer(D, E, E, 16, router=TopPRouter(D, E, E, p=0.5), dispatch=dispatch, **cap)
        rows = _recording_hidden(layer.experts)
        out = layer(x)
        route = layer.router(x)
        chosen = int(route.valid_TK.sum())
        assert 32 <= chosen < 32 * E // 2  # a varying number: some tokens more than one expert
        if dispatch != "capacity":  # the capacity dispatcher computes its padded buffers by design
            assert sum(rows) == chosen
        assert out.stats.tokens_per_expert_E.sum().item() == chosen
        assert out.stats.experts_per_token.item() == pytest.approx(chosen / 32)
        outputs[dispatch] = out.y
        ref = torch.zeros_like(x)
        for t in range(32):
            for k in range(E):
                if route.valid_TK[t, k]:
                    e = int(route.topk_idx_TK[t, k])
                    ref[t] += route.topk_weight_TK[t, k] * layer.experts(x[t : t + 1], e)[0]
        torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["sorted"], outputs["loop"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["capacity"], outputs["loop"], rtol=1e-5, atol=1e-6)


def test_dynamic_loss_hand_value_and_layer_coefficient():
    assert dynamic_loss(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).item() == pytest.approx(math.log(2) / 2)
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    off = MoELayer(8, 4, 4, 8, router=TopPRouter(8, 4, 4, p=0.7))
    on = MoELayer(8, 4, 4, 8, router=TopPRouter(8, 4, 4, p=0.7), dynamic_coef=0.5)
    on.load_state_dict(off.state_dict())
    a, b = off(x), on(x)
    assert "dynamic" not in a.losses and a.aux_loss.item() == 0.0
    entropy = dynamic_loss(on.router(x).probs_TE)
    assert b.losses["dynamic"].item() == pytest.approx(entropy.item())
    assert b.aux_loss.item() == pytest.approx(0.5 * entropy.item())
    b.aux_loss.backward()  # differentiable: the router gets a gradient
    assert on.router.weight.grad.abs().sum() > 0


def test_top_p_balancing_loss_counts_the_chosen_slots_only():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.1, 0.7, 0.1, 0.1]])
    layer = MoELayer(4, 4, 4, 8, router=TopPRouter(4, 4, 4, p=0.6), balance_coef=1.0)
    out = layer(_fixed_probs_router(layer.router, probs))
    # 3 chosen slots: experts 0, 1 (token 0) and 1 (token 1) -> f = [1/3, 2/3, 0, 0]
    P = probs.mean(0)
    assert out.losses["load_balancing"].item() == pytest.approx(4 * (P[0] / 3 + 2 * P[1] / 3).item())
    assert out.stats.load_E.tolist() == pytest.approx([1 / 3, 2 / 3, 0, 0])


# --- null experts -------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_null_router_hand_table(normalize):
    """E=2 real + N=1 null, top-2: the router's choice over 3, null slots invalid with weight 0."""
    probs = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.2, 0.1, 0.7]])
    router = TopKRouter(3, 2, 2, normalize=normalize, null_experts=1)
    assert router.num_experts == 2 and router.weight.shape == (3, 3)
    out = router(_fixed_probs_router(router, probs))
    assert out.null.topk_idx_TK.tolist() == [[0, 2], [1, 2], [2, 0]]
    assert out.valid_TK.tolist() == [[True, False], [True, False], [False, True]]
    w = [[0.5, 0.0], [0.6, 0.0], [0.0, 0.2]]
    if normalize:  # renormalised over the K chosen, the null one included (its output is 0)
        w = [[0.5 / 0.8, 0.0], [0.6 / 0.9, 0.0], [0.0, 0.2 / 0.9]]
    torch.testing.assert_close(out.topk_weight_TK, torch.tensor(w))
    torch.testing.assert_close(out.probs_TE, probs[:, :2] / probs[:, :2].sum(1, keepdim=True))
    torch.testing.assert_close(out.null.probs_TX, probs)
    assert out.null_slots(2).tolist() == [[False, True], [False, True], [True, False]]


def test_null_layer_equals_plain_top_k_over_all_experts_with_null_slots_removed():
    """The layer's output is the plain top-k layer over E+N experts where the null experts add
    nothing: computed here independently, slot by slot, from a plain TopKRouter with the same weight."""
    torch.manual_seed(0)
    E, N, K, D = 4, 4, 2, 8
    x = torch.randn(64, D)
    layer = MoELayer(D, E, K, 16, router=TopKRouter(D, E, K, null_experts=N), dispatch="sorted")
    plain = TopKRouter(D, E + N, K)
    plain.load_state_dict(layer.router.state_dict())
    rows = _recording_hidden(layer.experts)
    out = layer(x)
    computed = sum(rows)
    route = plain(x)
    real_TK = route.topk_idx_TK < E
    assert 0 < int((~real_TK).sum()) < 64 * K  # some slots go to null experts, some do not
    ref = torch.zeros_like(x)
    for t in range(64):
        for k in range(K):
            e = int(route.topk_idx_TK[t, k])
            if e < E:
                ref[t] += route.topk_weight_TK[t, k] * layer.experts(x[t : t + 1], e)[0]
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-6)
    assert computed == int(real_TK.sum())  # null slots never reach the experts
    assert out.stats.null_frac.item() == pytest.approx((~real_TK).float().mean().item())
    assert out.stats.experts_per_token.item() == pytest.approx(real_TK.sum().item() / 64)
    assert out.stats.tokens_per_expert_E.sum().item() == int(real_TK.sum())


def test_null_balancing_loss_hand_values():
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    idx = torch.tensor([[0], [1]])  # E=1 real (id 0), N=1 null (id 1)
    # f = [.5, .5], P = [.5, .5]: 2 * (1 * .25 + .5 * .25)
    assert null_balancing_loss(probs, idx, 1, 0.5).item() == pytest.approx(0.75)
    # tau = 1 is the Switch loss over all X experts
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(16, 6, generator=g).softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    assert null_balancing_loss(probs, idx, 4, 1.0).item() == pytest.approx(
        load_balancing_loss(probs, idx, 6).item()
    )


def test_null_layer_uses_the_heterogeneous_balancing_loss():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    layer = MoELayer(8, 4, 2, 8, router=TopKRouter(8, 4, 2, null_experts=2), balance_coef=1.0)
    layer.null_balance_weight = 0.25
    out = layer(x)
    full = layer.router(x).null
    expected = null_balancing_loss(full.probs_TX, full.topk_idx_TK, 4, 0.25)
    assert out.losses["load_balancing"].item() == pytest.approx(expected.item())
    assert out.losses["load_balancing"].item() != pytest.approx(
        null_balancing_loss(full.probs_TX, full.topk_idx_TK, 4, 1.0).item()
    )
    with pytest.raises(ValueError, match="micro_batch"):
        MoELayer(8, 4, 2, 8, router=TopKRouter(8, 4, 2, null_experts=2), balance_loss_scope="sequence")


def test_telemetry_names_and_world_statistics_of_dynamic_routers():
    """experts_per_token for every layer, null_frac only where a router has null experts; over
    two data-parallel ranks both are the whole batch's (world_stats), not one rank's, and so is
    the load although the ranks route different numbers of slots."""
    from types import SimpleNamespace

    from moeplat.nn import moe_metrics
    from moeplat.nn.stats import world_stats

    torch.manual_seed(0)
    x = torch.randn(32, 8)
    top_p = MoELayer(8, 4, 4, 8, router=TopPRouter(8, 4, 4, p=0.6))
    nulls = MoELayer(8, 4, 2, 8, router=TopKRouter(8, 4, 2, null_experts=4))
    outs = {0: top_p(x), 1: nulls(x)}
    m = moe_metrics(outs)
    assert m["moe/layer00/experts_per_token"] == pytest.approx(float(outs[0].stats.experts_per_token))
    assert m["moe/layer01/null_frac"] == pytest.approx(float(outs[1].stats.null_frac))
    assert "moe/layer00/null_frac" not in m and m["moe/all/null_frac"] == m["moe/layer01/null_frac"]
    assert m["moe/all/experts_per_token"] == pytest.approx(
        (m["moe/layer00/experts_per_token"] + m["moe/layer01/experts_per_token"]) / 2
    )
    halves = [{i: nulls(x[s]) for i in (0,)} for s in (slice(0, 16), slice(16, 32))]
    packed = []
    for out in halves:
        world_stats(
            {0: SimpleNamespace(stats=out[0].stats, losses=out[0].losses)}, lambda t: packed.append(t) or t
        )
    pooled = world_stats(halves[0], lambda t: torch.stack(packed).mean(0))[0].stats
    whole = nulls(x).stats
    torch.testing.assert_close(pooled.null_frac, whole.null_frac)
    torch.testing.assert_close(pooled.experts_per_token, whole.experts_per_token)
    torch.testing.assert_close(pooled.load_E, whole.load_E)  # weighted by each rank's routed slots
