"""DeepSeek (group-limited, sigmoid + aux-loss-free bias), Sinkhorn, expert choice and REINFORCE routers."""

import itertools
import math

import pytest
import torch

from moeplat.nn import (
    DenseFFN,
    ExpertChoiceRouter,
    GroupLimitedRouter,
    MoELayer,
    ReinforceRouter,
    SigmoidBiasRouter,
    SinkhornRouter,
    TransformerLM,
    routing_stats,
)
from moeplat.nn.dispatch import DISPATCHERS
from moeplat.nn.routers import expert_choice_capacity, expert_choice_reference, group_limit, sampled_logprob
from moeplat.nn.routers.balanced import sinkhorn


def _set_logits(router, logits_TE: torch.Tensor) -> torch.Tensor:
    """An input x for which router(x) sees exactly logits_TE: x = the first T rows of the D x D
    identity and W[:, :T] = logits_TE^T (needs d_model >= T)."""
    T, D = logits_TE.shape[0], router.weight.shape[1]
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :T] = logits_TE.t()
    return torch.eye(T, D)


# --- group-limited routing ----------------------------------------------------------------------------

SCORES = torch.tensor([[0.9, 0.1, 0.5, 0.45, 0.6, 0.0]])  # 3 groups of 2: {0,1} {2,3} {4,5}


def test_group_limit_by_max_and_by_top2_sum_hand_values():
    # max per group [.9, .5, .6] -> groups 0, 2; top-2 sums [1.0, .95, .6] -> groups 0, 1
    by_max = group_limit(SCORES, n_groups=3, topk_groups=2, group_score="max")
    by_sum = group_limit(SCORES, n_groups=3, topk_groups=2, group_score="top2_sum")
    inf = float("-inf")
    torch.testing.assert_close(by_max[0], torch.tensor([0.9, 0.1, inf, inf, 0.6, 0.0]))
    torch.testing.assert_close(by_sum[0], torch.tensor([0.9, 0.1, 0.5, 0.45, inf, inf]))
    assert SCORES.topk(2).indices.tolist() == [[0, 4]]  # unlimited top-2
    assert by_max.topk(2).indices.tolist() == [[0, 4]]
    assert by_sum.topk(2).indices.tolist() == [[0, 2]]  # expert 4 (0.6) is in a dropped group


@pytest.mark.parametrize(("group_score", "chosen"), [("max", [0, 4]), ("top2_sum", [0, 2])])
@pytest.mark.parametrize("normalize", [False, True])
def test_group_limited_router_picks_within_the_kept_groups(group_score, chosen, normalize):
    router = GroupLimitedRouter(
        6, 6, 2, n_groups=3, topk_groups=2, group_score=group_score, normalize=normalize
    ).eval()
    scores = SCORES.clamp_min(1e-6)
    out = router(_set_logits(router, scores.log()))  # softmax(log s) = s / sum(s)
    probs = scores[0] / scores.sum()
    assert out.topk_idx_TK[0].tolist() == chosen
    w = probs[chosen]
    torch.testing.assert_close(out.topk_weight_TK[0], w / w.sum() if normalize else w)


def test_group_limited_rejects_bad_groups():
    with pytest.raises(ValueError, match="divide"):
        GroupLimitedRouter(4, 6, 2, n_groups=4, topk_groups=1)
    with pytest.raises(ValueError, match="top_k"):
        GroupLimitedRouter(4, 8, 3, n_groups=4, topk_groups=1)


# --- sigmoid scores + aux-loss-free bias (DeepSeek-V3) ----------------------------------------------


def test_sigmoid_bias_selects_with_the_bias_and_weights_without_it():
    router = SigmoidBiasRouter(4, 4, 2, gamma=0.1).eval()
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    x = _set_logits(router, logits)
    s = torch.sigmoid(logits[0])
    out = router(x)
    assert out.topk_idx_TK[0].tolist() == [0, 1]
    torch.testing.assert_close(out.topk_weight_TK[0], s[[0, 1]] / s[[0, 1]].sum())
    torch.testing.assert_close(out.probs_TE[0], s / s.sum())
    router.bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # s_3 + 1 = 1.27 beats all
    out = router(x)
    assert out.topk_idx_TK[0].tolist() == [3, 0]
    torch.testing.assert_close(out.topk_weight_TK[0], s[[3, 0]] / s[[3, 0]].sum())  # unbiased s
    assert out.bias_E.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_sigmoid_bias_update_is_gamma_times_the_sign_of_the_load_error():
    router = SigmoidBiasRouter(4, 4, 1, gamma=0.1)
    router.after_optimizer_step(torch.tensor([0.5, 0.3, 0.2, 0.0]))  # mean 0.25
    torch.testing.assert_close(router.bias_E, torch.tensor([-0.1, -0.1, 0.1, 0.1]))
    router.after_optimizer_step(torch.tensor([10.0, 10.0, 10.0, 10.0]))  # counts work; balanced: no change
    torch.testing.assert_close(router.bias_E, torch.tensor([-0.1, -0.1, 0.1, 0.1]))
    assert torch.equal(router.state_dict()["bias_E"], router.bias_E)  # a buffer: saved in checkpoints
    assert [n for n, _ in router.named_parameters()] == ["weight"]


def test_the_bias_update_balances_a_skewed_router_without_any_gradient():
    torch.manual_seed(0)
    router = SigmoidBiasRouter(16, 8, 2, gamma=0.02).train()
    with torch.no_grad():
        router.weight[0] += 0.5  # expert 0 dominates
    x = torch.randn(512, 16) + 1.0

    def stats():
        route = router(x)
        return routing_stats(route.probs_TE, route.topk_idx_TK, torch.ones(512, 2, dtype=torch.bool), 8)

    before = stats().maxvio.item()
    for _ in range(200):
        router.after_optimizer_step(stats().load_E)
    after = stats().maxvio.item()
    assert before > 1.5 and after < 0.3, (before, after)
    assert router.weight.grad is None


def test_sigmoid_bias_with_groups_limits_to_the_best_groups_by_top2_sum():
    router = SigmoidBiasRouter(6, 6, 2, n_groups=3, topk_groups=2).eval()
    x = _set_logits(router, torch.logit(SCORES.clamp(1e-4, 1 - 1e-4)))
    assert router(x).topk_idx_TK[0].tolist() == [0, 2]  # as group_limit(top2_sum) above


# --- Sinkhorn (S-BASE) ---------------------------------------------------------------------------------


def test_sinkhorn_balances_rows_and_columns():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * 3
    q = sinkhorn(logits, 200).exp()
    torch.testing.assert_close(q.sum(1), torch.full((16,), 1 / 16))
    torch.testing.assert_close(q.sum(0), torch.full((4,), 1 / 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(sinkhorn(logits, 0), logits)


def test_sinkhorn_router_spreads_a_one_sided_batch_in_training_only():
    # Every token prefers expert 0, by margins 3, 2, 1, 0.5. Balanced (2 tokens per expert), the
    # assignment scales expert 1's column by r with sum_t r / (e^l_t + r) = 2, r ~ 5: the tokens
    # with e^l_t < r, i.e. the two weakest preferences, move to expert 1.
    router = SinkhornRouter(4, 2, 1, iterations=50, normalize=False)
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    x = _set_logits(router, logits)
    out = router.train()(x)
    assert out.topk_idx_TK[:, 0].tolist() == [0, 0, 1, 1]
    probs = logits.softmax(-1)
    torch.testing.assert_close(out.topk_weight_TK[:, 0], probs[torch.arange(4), out.topk_idx_TK[:, 0]])
    assert router.eval()(x).topk_idx_TK[:, 0].tolist() == [0, 0, 0, 0]
    router.iterations = 0
    assert router.train()(x).topk_idx_TK[:, 0].tolist() == [0, 0, 0, 0]  # no balancing: plain top-k


# --- expert choice ---------------------------------------------------------------------------------------


def test_expert_choice_capacity():
    assert expert_choice_capacity(64, 8, 2, 1.0) == 16
    assert expert_choice_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert expert_choice_capacity(4, 2, 2, 8.0) == 4  # at most every token


def test_expert_choice_each_expert_picks_its_top_tokens():
    # T=3, E=3, k=1, capacity_factor 1 -> C = 1 token per expert. Probabilities:
    # t0 [.468, .468, .063], t1 [.107, .107, .787], t2 [1/3, 1/3, 1/3]: experts 0 and 1 both pick
    # t0, expert 2 picks t1, nobody picks t2.
    router = ExpertChoiceRouter(4, 3, 1).eval()
    logits = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    out = router(_set_logits(router, logits))
    assert out.valid_TK.tolist() == [[True, True, False], [False, False, True], [False, False, False]]
    assert out.topk_idx_TK.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(out.topk_weight_TK, logits.softmax(-1))


# expert choice sets capacity itself (dropless layer); the capacity dispatcher needs a capacity
# factor, so the spec never pairs them (model.moe.dispatch / model.moe.capacity errors)
@pytest.mark.parametrize("dispatch", sorted(set(DISPATCHERS) - {"capacity"}))
def test_expert_choice_layer_equals_the_loop_reference_forward_and_backward(dispatch):
    torch.manual_seed(0)
    E, T, D = 4, 24, 8
    router = ExpertChoiceRouter(D, E, 2, capacity_factor=0.5)  # C = 6 of 24 tokens per expert
    layer = MoELayer(D, E, 2, 12, router=router, dispatch=dispatch).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    probs = layer.router(x_ref).probs_TE.double()
    y_ref = expert_choice_reference(layer.experts, x_ref, probs, expert_choice_capacity(T, E, 2, 0.5))
    torch.testing.assert_close(out.y, y_ref)
    out.y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    experts_per_token = out.stats.tokens_per_expert_E.sum().item()
    n_per_token = layer.router(x.detach()).valid_TK.sum(1)
    assert n_per_token.min() == 0 and n_per_token.max() >= 2  # 0..E experts per token
    assert (out.y[n_per_token == 0] == 0).all()  # unpicked tokens: residual only
    assert experts_per_token == E * 6 and out.stats.maxvio.item() == 0.0  # C = 6 each, balanced
    assert out.stats.unrouted_frac.item() == pytest.approx((n_per_token == 0).float().mean().item())


# --- REINFORCE -------------------------------------------------------------------------------------------


def test_sampled_logprob_is_the_plackett_luce_probability():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    lp = sampled_logprob(probs, torch.tensor([[1, 0]]))
    assert lp.item() == pytest.approx(math.log(0.3) + math.log(0.5 / 0.7))
    total = sum(
        sampled_logprob(probs, torch.tensor([list(p)])).exp().item()
        for p in itertools.permutations(range(3), 2)
    )
    assert total == pytest.approx(1.0)  # a distribution over the ordered pairs
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(probs.expand(100_000, 3), 2, replacement=False, generator=g)
    freq = ((draws[:, 0] == 1) & (draws[:, 1] == 0)).float().mean().item()
    assert freq == pytest.approx(lp.exp().item(), abs=0.005)  # what torch.multinomial samples


def test_reinforce_policy_loss_and_baseline_hand_values():
    router = ReinforceRouter(2, 3, 1, baseline_decay=0.9)
    logprob = torch.tensor([-0.5, -2.0], requires_grad=True)
    loss = router.policy_loss(logprob, torch.tensor([-1.0, -3.0]))  # baseline starts at the mean, -2
    assert loss.item() == pytest.approx(-(1.0 * -0.5 + -1.0 * -2.0) / 2)
    loss.backward()
    torch.testing.assert_close(logprob.grad, torch.tensor([-0.5, 0.5]))  # -(r - b) / T
    assert router.baseline.item() == pytest.approx(-2.0)
    router.policy_loss(torch.zeros(2), torch.tensor([-4.0, -4.0]))
    assert router.baseline.item() == pytest.approx(0.9 * -2.0 + 0.1 * -4.0)
    assert "baseline" in router.state_dict()


def test_reinforce_samples_in_training_and_is_greedy_in_evaluation():
    router = ReinforceRouter(3, 3, 1)
    logits = torch.tensor([[0.0, math.log(3), 0.0]])  # probs [.2, .6, .2]
    x = _set_logits(router, logits).repeat(20_000, 1)
    torch.manual_seed(0)
    out = router.train()(x)
    freq = torch.bincount(out.topk_idx_TK[:, 0], minlength=3).float() / 20_000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.6, 0.2]), atol=0.01, rtol=0)
    torch.testing.assert_close(out.logprob_T, out.probs_TE.gather(1, out.topk_idx_TK)[:, 0].log())
    ev = router.eval()(x)
    assert (ev.topk_idx_TK == 1).all() and ev.logprob_T is None


def test_reinforce_loss_reaches_the_router_through_the_lm_and_rewards_low_loss_choices():
    torch.manual_seed(0)
    V, D = 32, 16
    layer = MoELayer(D, 4, 1, 16, router=ReinforceRouter(D, 4, 1, coef=0.5))
    model = TransformerLM(V, D, 2, 2, 8, [DenseFFN(D, 16), layer]).train()
    idx = torch.randint(0, V, (2, 8))
    torch.manual_seed(1)
    out = model(idx, targets_BS=idx)
    pg = out.moe[1].losses["reinforce"]
    torch.testing.assert_close(out.aux_loss, 0.5 * pg)  # no balancing / z-loss switched on
    # The same loss by hand: reward = -token CE, baseline = the batch mean on the first step.
    torch.manual_seed(1)
    x_in = {}

    def grab(module, args, kwargs):
        x_in["x"] = args[0]

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    model.blocks[1].ffn.router.baseline.fill_(float("nan"))
    model(idx)
    handle.remove()
    assert torch.isnan(model.blocks[1].ffn.router.baseline)  # no targets: no reward, no update
    ce = torch.nn.functional.cross_entropy(out.logits_BSV.flatten(0, 1), idx.flatten(), reduction="none")
    torch.manual_seed(1)
    route = layer.router(x_in["x"].reshape(-1, D))
    expected = -((-ce + ce.mean()) * route.logprob_T).mean()
    torch.testing.assert_close(pg, expected.detach())
    model.zero_grad()
    out.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.experts.w_up.grad is None
    assert "reinforce" not in model.eval()(idx, targets_BS=idx).moe[1].losses  # nothing sampled
