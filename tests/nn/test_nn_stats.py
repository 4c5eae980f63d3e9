"""Routing statistics (moeplat.nn.stats) against hand-computed values, and the logged metric names."""

import math

import pytest
import torch

from moeplat.nn import MoELayer, SigmoidBiasRouter, moe_metrics, routing_stats


def _stats(**kw):
    # E=4, T=4, K=2: slots to experts 0,0,0,0,1,1,2,2 -> load [.5, .25, .25, 0]
    idx = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]])
    probs = torch.tensor([[0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0]])
    keep = kw.pop("keep", torch.ones(4, 2, dtype=torch.bool))
    return routing_stats(probs, idx, keep, num_experts=4, **kw)


def test_load_statistics_hand_values():
    s = _stats()
    torch.testing.assert_close(s.load_E, torch.tensor([0.5, 0.25, 0.25, 0.0]))
    # mean 1/4; population std sqrt((.25^2 + 0 + 0 + .25^2) / 4) = sqrt(2) / 8 -> CV = sqrt(2) / 2
    assert s.load_cv.item() == pytest.approx(math.sqrt(2) / 2)
    assert s.maxvio.item() == pytest.approx(0.5 / 0.25 - 1)
    assert s.dead_frac.item() == 0.25  # expert 3 got nothing
    # entropies: ln 2, 0, ln 4, ln 2 -> mean (4 ln 2) / 4 = ln 2
    assert s.router_entropy.item() == pytest.approx(math.log(2))
    assert s.dropped_frac.item() == 0.0 and s.unrouted_frac.item() == 0.0 and s.bias_E is None
    assert s.tokens_per_expert_E.tolist() == [4, 2, 2, 0]


def test_perfect_balance_has_zero_cv_and_maxvio():
    idx = torch.tensor([[0, 1], [2, 3]])
    s = routing_stats(torch.full((2, 4), 0.25), idx, torch.ones(2, 2, dtype=torch.bool), 4)
    assert s.load_cv.item() == 0.0 and s.maxvio.item() == 0.0 and s.dead_frac.item() == 0.0
    assert s.router_entropy.item() == pytest.approx(math.log(4))


def test_dropped_and_unrouted_fractions_with_valid_and_keep_masks():
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, True]])  # 7 routed slots
    keep = torch.tensor([[True, True], [False, False], [True, False], [True, True]])
    s = _stats(keep=keep, valid_TK=valid)
    assert s.dropped_frac.item() == pytest.approx(2 / 7)  # t1's and t2's routed slots over capacity
    assert s.unrouted_frac.item() == 0.25  # t1 reaches no expert
    torch.testing.assert_close(s.load_E, torch.tensor([4, 1, 2, 0]) / 7)  # before capacity, valid only
    assert s.tokens_per_expert_E.tolist() == [3, 1, 1, 0]


def test_moe_metrics_names_per_layer_and_means_over_layers():
    torch.manual_seed(0)
    plain = MoELayer(8, 4, 2, 8, balance_coef=0.01)
    biased = MoELayer(8, 4, 2, 8, router=SigmoidBiasRouter(8, 4, 2, gamma=0.5))
    biased.after_optimizer_step(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    x = torch.randn(16, 8)
    outs = {0: plain(x), 3: biased(x)}
    m = moe_metrics(outs)
    for name in ("maxvio", "load_cv", "router_entropy", "dead_frac", "dropped_frac", "unrouted_frac"):
        a, b = float(getattr(outs[0].stats, name)), float(getattr(outs[3].stats, name))
        assert m[f"moe/layer00/{name}"] == a and m[f"moe/layer03/{name}"] == b
        assert m[f"moe/all/{name}"] == pytest.approx((a + b) / 2)
    assert m["moe/all/z_loss"] == pytest.approx((m["moe/layer00/z_loss"] + m["moe/layer03/z_loss"]) / 2)
    assert [m[f"moe/layer03/bias/e{e:02d}"] for e in range(4)] == [-0.5, 0.5, 0.5, 0.5]
    assert not any(k.startswith("moe/layer00/bias") for k in m)
    assert sum(m[f"moe/layer00/load/e{e:02d}"] for e in range(4)) == pytest.approx(1.0)
    assert moe_metrics({}) == {}


def test_world_stats_are_the_whole_batch_statistics_not_a_mean_of_the_ranks():
    """Two data-parallel ranks with half the batch each: world_stats gives what one process with
    the whole batch computes (maxvio, cv and dead experts from the pooled load, not averaged)."""
    from types import SimpleNamespace

    from moeplat.nn.stats import world_stats

    g = torch.Generator().manual_seed(0)
    T, E, K = 16, 8, 2
    probs = torch.rand(T, E, generator=g).softmax(-1)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[: T // 2] %= 4  # rank 0 routes to experts 0-3 only: its own maxvio and dead_frac are far off
    keep = torch.ones(T, K, dtype=torch.bool)
    keep[3, 1] = False  # one dropped slot, on rank 0

    def output(rows):
        stats = routing_stats(probs[rows], idx[rows], keep[rows], E)
        return {0: SimpleNamespace(stats=stats, losses={"z_loss": probs[rows].max(-1).values.mean()})}

    ranks = [output(slice(0, T // 2)), output(slice(T // 2, T))]
    packed = []
    for out in ranks:
        world_stats(out, lambda t: packed.append(t) or t)
    pooled = world_stats(ranks[0], lambda t: torch.stack(packed).mean(0))[0]
    whole = output(slice(0, T))[0]
    for name in (
        "load_E",
        "maxvio",
        "load_cv",
        "dead_frac",
        "router_entropy",
        "dropped_frac",
        "unrouted_frac",
    ):
        torch.testing.assert_close(getattr(pooled.stats, name), getattr(whole.stats, name).float(), msg=name)
    torch.testing.assert_close(pooled.losses["z_loss"], whole.losses["z_loss"])
    assert ranks[0][0].stats.dead_frac.item() == 0.5 and pooled.stats.dead_frac.item() < 0.5
    assert set(moe_metrics({0: pooled})) == set(moe_metrics({0: whole}))
