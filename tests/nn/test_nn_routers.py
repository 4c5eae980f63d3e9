"""Token-choice routers and the shared router options, against hand-computed values and references.

Randomness contract (every router): random draws come from torch's global RNG and only in training
mode, so re-seeding reproduces a training forward and evaluation is deterministic.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moeplat.nn import (
    ExpertChoiceRouter,
    GroupLimitedRouter,
    GShardRouter,
    HashRouter,
    MoELayer,
    NoisyTopKRouter,
    RandomRouter,
    ReinforceRouter,
    SigmoidBiasRouter,
    SinkhornRouter,
    SwitchRouter,
    TopKRouter,
)

W_32 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])  # E=3, D=2: token [1, 0] -> logits [1, 2, 0]


def _with_weight(router, weight=W_32):
    with torch.no_grad():
        router.weight.copy_(weight)
    return router


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


LEARNED = {
    "topk": lambda D, E: TopKRouter(D, E, 2),
    "switch": lambda D, E: SwitchRouter(D, E),
    "noisy_topk": lambda D, E: NoisyTopKRouter(D, E, 2),
    "gshard": lambda D, E: GShardRouter(D, E),
    "sigmoid_bias": lambda D, E: SigmoidBiasRouter(D, E, 2, n_groups=2, topk_groups=1),
    "group_limited": lambda D, E: GroupLimitedRouter(D, E, 2, n_groups=4, topk_groups=2),
    "sinkhorn": lambda D, E: SinkhornRouter(D, E, 2),
    "expert_choice": lambda D, E: ExpertChoiceRouter(D, E, 2),
    "reinforce": lambda D, E: ReinforceRouter(D, E, 2),
}
ALL = {**LEARNED, "hash": lambda D, E: HashRouter(E, 64), "random": lambda D, E: RandomRouter(E, 2)}


@pytest.mark.parametrize("kind", sorted(ALL))
def test_eval_is_deterministic_and_draws_nothing_from_the_global_rng(kind):
    torch.manual_seed(0)
    router = ALL[kind](16, 8).eval()
    x, ids = torch.randn(32, 16), torch.randint(0, 64, (32,))
    state = torch.get_rng_state()
    a, b = router(x, ids), router(x, ids)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.topk_idx_TK, b.topk_idx_TK) and torch.equal(a.topk_weight_TK, b.topk_weight_TK)
    assert a.logprob_T is None and a.load_prob_TE is None
    torch.testing.assert_close(a.probs_TE.sum(-1), torch.ones(32))


@pytest.mark.parametrize("kind", sorted(ALL))
def test_training_randomness_comes_from_the_global_rng(kind):
    torch.manual_seed(0)
    router = ALL[kind](16, 8).train()
    router.dropout = 0.2  # every learned router: input dropout is random too
    x, ids = torch.randn(32, 16), torch.randint(0, 64, (32,))
    torch.manual_seed(5)
    a = router(x, ids)
    torch.manual_seed(5)
    b = router(x, ids)
    assert torch.equal(a.topk_idx_TK, b.topk_idx_TK) and torch.equal(a.topk_weight_TK, b.topk_weight_TK)


@pytest.mark.parametrize("kind", sorted(LEARNED))
def test_learned_router_logits_are_float32_under_bf16(kind):
    torch.manual_seed(0)
    router = LEARNED[kind](16, 8).eval().to(torch.bfloat16)
    x = torch.randn(32, 16, dtype=torch.bfloat16)
    out = router(x)
    assert out.logits_TE.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
    torch.testing.assert_close(out.logits_TE, x.float() @ router.weight.float().t(), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router(x.float()).topk_weight_TK.dtype == torch.float32


# --- shared options: jitter, softcap, dropout ----------------------------------------------------


def test_jitter_multiplies_the_input_by_uniform_noise_in_training_only():
    router = _with_weight(TopKRouter(2, 3, 1, jitter_eps=0.1))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    torch.manual_seed(3)
    noise = torch.empty_like(x).uniform_(0.9, 1.1)
    torch.manual_seed(3)
    torch.testing.assert_close(router.train()(x).logits_TE, (x * noise) @ W_32.t())
    assert not torch.allclose(noise, torch.ones_like(noise)) and ((noise - 1).abs() <= 0.1).all()
    torch.testing.assert_close(router.eval()(x).logits_TE, x @ W_32.t(), rtol=0, atol=0)


def test_logit_softcap_is_c_tanh_logits_over_c():
    router = _with_weight(TopKRouter(2, 3, 2, logit_softcap=1.5)).eval()
    out = router(torch.tensor([[1.0, 0.0]]))
    expected = torch.tensor([1.5 * math.tanh(1 / 1.5), 1.5 * math.tanh(2 / 1.5), 0.0])
    torch.testing.assert_close(out.logits_TE[0], expected)
    torch.testing.assert_close(out.probs_TE[0], expected.softmax(-1))


def test_router_dropout_drops_the_input_in_training_only():
    router = _with_weight(TopKRouter(2, 3, 1, dropout=0.5))
    x = torch.randn(64, 2)
    torch.manual_seed(4)
    dropped = F.dropout(x, 0.5, training=True)
    torch.manual_seed(4)
    torch.testing.assert_close(router.train()(x).logits_TE, dropped @ W_32.t())
    assert (dropped == 0).any()
    torch.testing.assert_close(router.eval()(x).logits_TE, x @ W_32.t(), rtol=0, atol=0)


# --- switch ------------------------------------------------------------------------------------------


def test_switch_is_top1_weighted_by_the_raw_probability():
    router = _with_weight(SwitchRouter(2, 3)).eval()
    assert router.top_k == 1 and router.jitter_eps == 0.01
    out = router(torch.tensor([[1.0, 0.0]]))
    z = math.e + math.e**2 + 1
    assert out.topk_idx_TK.tolist() == [[1]]
    assert out.topk_weight_TK.item() == pytest.approx(math.e**2 / z)


# --- noisy top-k (Shazeer et al. 2017) ------------------------------------------------------------


def test_noisy_topk_logits_are_clean_plus_softplus_scaled_gaussian_noise():
    router = _with_weight(NoisyTopKRouter(2, 3, 2))
    noise_w = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 2.0]])
    with torch.no_grad():
        router.noise_weight.copy_(noise_w)
    x = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
    torch.manual_seed(7)
    eps = torch.randn(2, 3)
    torch.manual_seed(7)
    out = router.train()(x)
    noisy = x @ W_32.t() + eps * F.softplus(x @ noise_w.t())  # eq. 4
    torch.testing.assert_close(out.logits_TE, noisy)
    kept, idx = noisy.topk(2, dim=-1)
    assert torch.equal(out.topk_idx_TK, idx)
    torch.testing.assert_close(out.topk_weight_TK, kept.softmax(-1))  # eq. 3 and 5
    torch.testing.assert_close(out.probs_TE, noisy.softmax(-1))
    clean = router.eval()(x)
    torch.testing.assert_close(clean.logits_TE, x @ W_32.t())
    assert clean.load_prob_TE is None and out.load_prob_TE is not None


def test_noisy_topk_noise_weights_start_at_zero_std_ln2():
    router = NoisyTopKRouter(4, 3, 1)
    router.init_weights(0.02)
    assert torch.equal(router.noise_weight, torch.zeros(3, 4))
    assert F.softplus(torch.zeros(())).item() == pytest.approx(math.log(2))
    assert sum(p.numel() for p in router.parameters()) == 2 * 3 * 4


def test_noisy_topk_load_probability_hand_values():
    # k=1. Noisy [1.2, 0.9, -0.3]: expert 0 is in, its threshold is the 2nd largest (0.9); the
    # others' threshold is the largest (1.2). P = Phi((clean - threshold) / std), eq. 9.
    router = NoisyTopKRouter(2, 3, 1)
    clean, noisy = torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[1.2, 0.9, -0.3]])
    std = torch.tensor([[1.0, 2.0, 0.5]])
    p = router.load_probability(clean, noisy, std)
    expected = [_phi((1.0 - 0.9) / 1.0), _phi((0.5 - 1.2) / 2.0), _phi((0.0 - 1.2) / 0.5)]
    torch.testing.assert_close(p[0], torch.tensor(expected))


def test_noisy_topk_load_probability_is_the_chance_of_staying_in_the_top_k():
    """Monte Carlo: redraw only expert 1's noise; it lands in the top 2 with probability P(x, 1)."""
    router = NoisyTopKRouter(2, 4, 2)
    clean = torch.tensor([[0.3, 0.2, -0.1, 0.5]])
    std = torch.tensor([[0.7, 0.9, 0.4, 0.6]])
    noisy = torch.tensor([[0.8, 0.1, -0.4, 0.35]])
    p = router.load_probability(clean, noisy, std)[0, 1].item()
    g = torch.Generator().manual_seed(0)
    trials = noisy.repeat(200_000, 1)
    trials[:, 1] = clean[0, 1] + std[0, 1] * torch.randn(200_000, generator=g)
    in_top = (trials.topk(2, dim=-1).indices == 1).any(dim=-1).float().mean().item()
    assert in_top == pytest.approx(p, abs=0.005)


# --- GShard top-2 ------------------------------------------------------------------------------------


def test_gshard_second_expert_is_dispatched_with_probability_twice_its_gate():
    router = _with_weight(GShardRouter(2, 3))
    # logits [ln 4, 0, -inf-ish]: g = [.8, .2] renormalised over the top 2 (third expert ~ 0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[math.log(4), 0.0], [0.0, 0.0], [-30.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]]).repeat(40_000, 1)
    torch.manual_seed(1)
    rnd = torch.rand(40_000)
    torch.manual_seed(1)
    out = router.train()(x)
    torch.testing.assert_close(out.topk_weight_TK[0], torch.tensor([0.8, 0.2]), rtol=1e-5, atol=1e-6)
    assert out.valid_TK[:, 0].all()
    assert torch.equal(out.valid_TK[:, 1], 2 * out.topk_weight_TK[:, 1] > rnd)
    assert out.valid_TK[:, 1].float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert router.eval()(x).valid_TK.all()


def test_gshard_skipped_second_slot_is_not_computed():
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, 16, router=GShardRouter(8, 4), dispatch="loop").double().train()
    x = torch.randn(64, 8, dtype=torch.float64)
    torch.manual_seed(2)
    out = layer(x)
    torch.manual_seed(2)
    route = layer.router(x)
    skipped = ~route.valid_TK[:, 1]
    assert skipped.any() and not skipped.all()
    e1, g1 = route.topk_idx_TK[:, 0], route.topk_weight_TK[:, 0].double()
    first_only = torch.stack([layer.experts(x[t : t + 1], int(e1[t]))[0] for t in range(64)]) * g1[:, None]
    torch.testing.assert_close(out.y[skipped], first_only[skipped])
    assert out.tokens_per_expert_E.sum().item() == 64 + (~skipped).sum().item()
    assert out.dropped_frac.item() == 0.0  # a skipped slot was never routed, so it is not "dropped"


# --- hash and random ---------------------------------------------------------------------------------


def test_hash_router_is_a_fixed_balanced_table_of_token_ids():
    router = HashRouter(num_experts=3, vocab_size=10, seed=0)
    counts = torch.bincount(router.table_V, minlength=3).tolist()
    assert sorted(counts) == [3, 3, 4]  # floor/ceil of 10/3: balanced over the vocabulary
    assert torch.equal(router.table_V, HashRouter(3, 10, seed=0).table_V)
    assert not torch.equal(router.table_V, HashRouter(3, 10, seed=1).table_V)
    assert "table_V" in router.state_dict() and list(router.parameters()) == []
    ids = torch.tensor([0, 7, 7, 3])
    out = router.train()(torch.randn(4, 5), ids)
    assert out.topk_idx_TK[:, 0].tolist() == router.table_V[ids].tolist()
    assert out.topk_weight_TK.tolist() == [[1.0]] * 4 and out.logits_TE is None
    torch.testing.assert_close(out.probs_TE, F.one_hot(router.table_V[ids], 3).float())
    with pytest.raises(ValueError, match="token ids"):
        router(torch.randn(4, 5))


def test_random_router_draws_uniform_distinct_experts_in_training():
    router = RandomRouter(num_experts=4, top_k=2).train()
    torch.manual_seed(0)
    out = router(torch.randn(20_000, 3))
    idx = out.topk_idx_TK
    assert (idx[:, 0] != idx[:, 1]).all()
    freq = torch.bincount(idx.reshape(-1), minlength=4).float() / idx.numel()
    torch.testing.assert_close(freq, torch.full((4,), 0.25), atol=0.01, rtol=0)
    assert (out.topk_weight_TK == 0.5).all()
    torch.testing.assert_close(out.probs_TE, torch.full((20_000, 4), 0.25))


def test_random_router_evaluates_the_expected_output_the_mean_of_all_experts():
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, 16, router=RandomRouter(4, 2)).double().eval()
    x = torch.randn(10, 8, dtype=torch.float64)
    mean = sum(layer.experts(x, e) for e in range(4)) / 4
    torch.testing.assert_close(layer(x).y, mean)
