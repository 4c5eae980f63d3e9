"""Every `model.moe.router` kind and option changes what `moeplat.compile.model` builds (one test per option).

Same style as test_options_model.py: load tests/fixtures/tiny.yaml (d_model 32, 4 experts, top-2)
with `--set`-style overrides, build through moeplat.compile, and check an effect that would break
if the option were ignored or wired to the wrong place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeplat import nn as mnn
from moeplat.compile.model import build_model, build_moe_layer
from moeplat.nn.routers import expert_choice_capacity
from moeplat.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny.yaml"
NO_LOSSES = "model.moe.losses={}"  # routers without weights reject router losses


def _spec(*overrides: str):
    return load_spec(TINY, list(overrides)).spec


def _layer(router: str, *overrides: str, seed: int = 0) -> mnn.MoELayer:
    spec = _spec(f"model.moe.router={router}", *overrides)
    torch.manual_seed(seed)
    return build_moe_layer(spec.model.moe, spec.model.d_model, spec.model.vocab_size)


def _x(tokens: int = 64, seed: int = 2, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed)) + shift


def _twice_in_train_mode(layer, x, ids=None):
    layer.train()
    with torch.no_grad():
        return layer(x, token_ids=ids), layer(x, token_ids=ids)


def _groups_used(topk_idx_TK: torch.Tensor, per_group: int) -> int:
    """The largest number of distinct expert groups any one token was routed to."""
    return max(len(set((row // per_group).tolist())) for row in topk_idx_TK)


# --- kind -> nn router -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("router", "overrides", "cls", "attrs"),
    [
        ("{kind: topk, normalize: false}", [], mnn.TopKRouter, {"normalize": False, "top_k": 2}),
        ("{kind: switch}", ["model.moe.top_k=1"], mnn.SwitchRouter, {"top_k": 1, "jitter_eps": 0.01}),
        ("{kind: noisy_topk}", [], mnn.NoisyTopKRouter, {"top_k": 2}),
        ("{kind: gshard}", [], mnn.GShardRouter, {"top_k": 2}),
        (
            "{kind: hash, seed: 3}",
            ["model.moe.top_k=1", NO_LOSSES],
            mnn.HashRouter,
            {"seed": 3, "vocab_size": 256},
        ),
        ("{kind: random}", [NO_LOSSES], mnn.RandomRouter, {"top_k": 2}),
        (
            "{kind: sigmoid_bias, gamma: 0.01, n_groups: 2, topk_groups: 1}",
            [],
            mnn.SigmoidBiasRouter,
            {"gamma": 0.01, "n_groups": 2, "topk_groups": 1},
        ),
        (
            "{kind: group_limited, n_groups: 2, topk_groups: 1, group_score: top2_sum, normalize: true}",
            [],
            mnn.GroupLimitedRouter,
            {"n_groups": 2, "topk_groups": 1, "group_score": "top2_sum", "normalize": True},
        ),
        ("{kind: sinkhorn, iterations: 3, normalize: false}", [], mnn.SinkhornRouter, {"iterations": 3}),
        ("{kind: expert_choice, capacity_factor: 0.5}", [], mnn.ExpertChoiceRouter, {"capacity_factor": 0.5}),
        (
            "{kind: reinforce, coef: 0.3, baseline_decay: 0.5, normalize: false}",
            [],
            mnn.ReinforceRouter,
            {"coef": 0.3, "baseline_decay": 0.5, "normalize": False},
        ),
    ],
)
def test_router_kind_builds_its_router_and_the_layer_runs(router, overrides, cls, attrs):
    layer = _layer(router, *overrides)
    assert type(layer.router) is cls and layer.router.num_experts == 4
    for name, value in attrs.items():
        assert getattr(layer.router, name) == value, name
    ids = torch.randint(0, 256, (64,))
    for training in (True, False):
        with torch.no_grad():
            out = layer.train(training)(_x(), token_ids=ids)
        assert out.y.shape == (64, 32) and out.load_E.sum().item() == pytest.approx(1.0)


# --- options shared by learned routers -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "noisy_topk", "gshard", "sinkhorn", "sigmoid_bias", "reinforce"])
def test_jitter_eps_randomises_training_only(kind):
    x = _x()
    layer = _layer(f"{{kind: {kind}, jitter_eps: 0.2}}")
    torch.manual_seed(0)
    with torch.no_grad():
        a = layer.train().router.router_input(x)
    assert not torch.equal(a, x) and ((a / x - 1).abs() <= 0.2 + 1e-6).all()
    assert torch.equal(layer.eval().router.router_input(x), x)
    plain = _layer(f"{{kind: {kind}}}").train()
    assert torch.equal(plain.router.router_input(x), x)


def test_switch_has_input_jitter_by_default_and_it_changes_the_output():
    layer = _layer("{kind: switch}", "model.moe.top_k=1")
    a, b = _twice_in_train_mode(layer, _x())
    assert not torch.equal(a.y, b.y)
    off = _layer("{kind: switch, jitter_eps: 0.0}", "model.moe.top_k=1")
    a, b = _twice_in_train_mode(off, _x())
    assert torch.equal(a.y, b.y)


def test_logit_softcap_bounds_the_logits():
    capped, free = _layer("{kind: topk, logit_softcap: 0.5}"), _layer("{kind: topk}")
    x = _x() * 50  # large logits
    with torch.no_grad():
        free_logits, capped_logits = free.router(x).logits_TE, capped.router(x).logits_TE
    assert free_logits.abs().max() > 1.0
    assert capped_logits.abs().max() <= 0.5  # tanh saturates to exactly c in float32
    torch.testing.assert_close(capped_logits, 0.5 * torch.tanh(free_logits / 0.5))


def test_router_dropout_randomises_training_only():
    layer = _layer("{kind: topk, dropout: 0.5}")
    a, b = _twice_in_train_mode(layer, _x())
    assert not torch.equal(a.y, b.y)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(_x()).y, layer(_x()).y)
    no_drop = _layer("{kind: topk, dropout: 0.0}")
    a, b = _twice_in_train_mode(no_drop, _x())
    assert torch.equal(a.y, b.y)


@pytest.mark.parametrize(
    "router", ["{kind: group_limited, n_groups: 2, topk_groups: 2}", "{kind: sinkhorn}", "{kind: reinforce}"]
)
def test_normalize_rescales_the_chosen_weights(router):
    norm = _layer(router[:-1] + ", normalize: true}").eval()
    raw = _layer(router[:-1] + ", normalize: false}").eval()
    with torch.no_grad():
        w_norm, w_raw = norm.router(_x()).topk_weight_TK, raw.router(_x()).topk_weight_TK
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(64))
    assert (w_raw.sum(-1) < 1 - 1e-3).all()
    torch.testing.assert_close(w_norm, w_raw / w_raw.sum(-1, keepdim=True))


# --- per-kind options --------------------------------------------------------------------------------


def test_noisy_topk_adds_noise_weights_and_noise_in_training_only():
    noisy, plain = _layer("{kind: noisy_topk}"), _layer("{kind: topk}")
    n = sum(p.numel() for p in noisy.parameters()) - sum(p.numel() for p in plain.parameters())
    assert n == 4 * 32 and noisy.router.noise_weight.shape == (4, 32)
    a, b = _twice_in_train_mode(noisy, _x())
    assert not torch.equal(a.y, b.y)
    noisy.eval()
    with torch.no_grad():
        assert torch.equal(noisy(_x()).y, noisy(_x()).y)


def test_gshard_skips_some_second_experts_in_training_only():
    layer = _layer("{kind: gshard}")
    a, _ = _twice_in_train_mode(layer, _x())
    assert 64 < int(a.tokens_per_expert_E.sum()) < 128
    layer.eval()
    with torch.no_grad():
        assert int(layer(_x()).tokens_per_expert_E.sum()) == 128


def test_hash_seed_picks_the_table_and_routing_follows_the_token_ids():
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0))
    loads = []
    for seed in (0, 1):
        layer = _layer(f"{{kind: hash, seed: {seed}}}", "model.moe.top_k=1", NO_LOSSES).eval()
        with torch.no_grad():
            out = layer(_x(), token_ids=ids)
        expected = torch.bincount(layer.router.table_V[ids], minlength=4).float() / 64
        torch.testing.assert_close(out.load_E, expected)
        loads.append(out.load_E)
    assert not torch.equal(loads[0], loads[1])


def test_random_router_is_random_in_training_and_the_expert_mean_in_evaluation():
    layer = _layer("{kind: random}", NO_LOSSES).double()
    x = _x().double()
    a, b = _twice_in_train_mode(layer, x)
    assert not torch.equal(a.y, b.y)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).y, sum(layer.experts(x, e) for e in range(4)) / 4)


def test_sigmoid_bias_gamma_is_the_step_of_the_bias_update():
    for gamma in (0.01, 0.1):
        model = build_model(_spec(f"model.moe.router={{kind: sigmoid_bias, gamma: {gamma}}}"))
        model.after_optimizer_step({0: torch.tensor([0.4, 0.3, 0.2, 0.1])})
        torch.testing.assert_close(
            model.blocks[0].ffn.router.bias_E, torch.tensor([-1.0, -1.0, 1.0, 1.0]) * gamma
        )
        assert model.blocks[1].ffn.router.bias_E.abs().sum() == 0


@pytest.mark.parametrize(
    ("router", "per_group"),
    [
        ("{kind: sigmoid_bias, n_groups: 2, topk_groups: 1}", 2),
        ("{kind: group_limited, n_groups: 2, topk_groups: 1}", 2),
        ("{kind: group_limited, n_groups: 2, topk_groups: 1, group_score: top2_sum}", 2),
    ],
)
def test_n_groups_and_topk_groups_limit_each_token_to_its_best_groups(router, per_group):
    x = _x(256)
    limited = _layer(router).eval()
    unlimited = _layer(router.replace("topk_groups: 1", "topk_groups: 2")).eval()
    with torch.no_grad():
        assert _groups_used(limited.router(x).topk_idx_TK, per_group) == 1
        assert _groups_used(unlimited.router(x).topk_idx_TK, per_group) == 2


def test_group_score_max_and_top2_sum_choose_different_groups():
    x = _x(256)
    by_max = _layer("{kind: group_limited, n_groups: 2, topk_groups: 1, group_score: max}").eval()
    by_sum = _layer("{kind: group_limited, n_groups: 2, topk_groups: 1, group_score: top2_sum}").eval()
    with torch.no_grad():
        assert not torch.equal(by_max.router(x).topk_idx_TK, by_sum.router(x).topk_idx_TK)


def test_sinkhorn_iterations_balance_the_training_assignment():
    maxvio = {}
    for iterations in (0, 30):
        layer = _layer(f"{{kind: sinkhorn, iterations: {iterations}}}")
        with torch.no_grad():
            layer.router.weight[0] += 0.3  # skew towards expert 0
            maxvio[iterations] = layer.train()(_x(256, shift=1.0)).stats.maxvio.item()
    assert maxvio[0] > 0.5 and maxvio[30] < 0.25, maxvio


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_expert_choice_capacity_factor_sets_tokens_per_expert(capacity_factor):
    layer = _layer(f"{{kind: expert_choice, capacity_factor: {capacity_factor}}}")
    with torch.no_grad():
        out = layer(_x())
    C = expert_choice_capacity(64, 4, 2, capacity_factor)
    assert int(32 * capacity_factor) == C
    assert out.tokens_per_expert_E.tolist() == [C] * 4


def test_reinforce_coef_and_baseline_decay():
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for coef, decay in ((0.3, 0.5), (1.0, 0.9)):
        model = build_model(
            _spec(f"model.moe.router={{kind: reinforce, coef: {coef}, baseline_decay: {decay}}}")
        )
        model.train()
        torch.manual_seed(0)
        out = model(idx, targets_BS=idx)
        rewards = []
        for i, o in out.moe.items():
            assert "reinforce" in o.losses
            rewards.append(model.blocks[i].ffn.router.baseline.item())  # first step: the mean reward
        expected = sum(
            coef * o.losses["reinforce"] + 0.01 * o.losses["load_balancing"] + 0.001 * o.losses["z_loss"]
            for o in out.moe.values()
        )
        torch.testing.assert_close(out.aux_loss, expected)
        ce = model(idx, targets_BS=idx).loss.item()
        assert model.blocks[0].ffn.router.baseline.item() == pytest.approx(
            decay * rewards[0] + (1 - decay) * -ce, rel=1e-5
        )


# --- the after-step hook in a real Lightning run -----------------------------------------------------


@pytest.mark.slow
def test_sigmoid_bias_is_updated_after_each_step_checkpointed_and_logged(workdir):
    from mlflow import MlflowClient

    from moeplat.train.run import run

    steps = ["train.max_steps=3", "train.val_every=3", "train.schedule.warmup_steps=1", "data.val_tokens=128"]
    loaded = load_spec(
        TINY, [*steps, "model.moe.router={kind: sigmoid_bias, gamma: 0.125}", "train.log_every=1"]
    )
    result = run(loaded, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}", progress=False)
    state = torch.load(Path(result.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    bias = state["model.blocks.0.ffn.router.bias_E"]
    steps_taken = bias / 0.125  # each step moves each bias by exactly -1, 0 or +1 gamma
    torch.testing.assert_close(steps_taken, steps_taken.round())
    assert bias.abs().max() > 0 and bias.abs().max() <= 3 * 0.125
    metrics = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    for key in ("moe/layer00/bias/e03", "moe/all/maxvio", "moe/all/router_entropy", "moe/layer01/dead_frac"):
        assert key in metrics, key


# --- options for parity with other implementations (moeplat.interop.hf) -------------------------------


@pytest.mark.parametrize("kind", ["topk", "sigmoid_bias", "sinkhorn"])
def test_logits_precision_input_computes_x_w_in_the_activations_dtype(kind):
    ours = _layer(f"{{kind: {kind}, logits_precision: float32}}").double().eval()
    theirs = _layer(f"{{kind: {kind}, logits_precision: input}}").double().eval()
    x, w = _x().double(), ours.router.weight
    with torch.no_grad():
        f32, inp = ours.router(x).logits_TE, theirs.router(x).logits_TE
        assert f32.dtype == inp.dtype == torch.float32
        assert torch.equal(f32, torch.nn.functional.linear(x.float(), w.float()))
        assert torch.equal(inp, torch.nn.functional.linear(x, w).float())  # rounded once, at the end
        assert not torch.equal(f32, inp) and not torch.equal(ours(x).y, theirs(x).y)
        bf16 = theirs.router(x.bfloat16()).logits_TE  # the projection itself runs in bf16
        assert torch.equal(bf16, torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float())
        assert not torch.equal(bf16, ours.router(x.bfloat16()).logits_TE)


def test_sigmoid_bias_scaling_factor_and_normalize_shape_the_weights():
    base = _layer("{kind: sigmoid_bias}").eval()
    scaled = _layer("{kind: sigmoid_bias, scaling_factor: 2.5}").eval()
    raw = _layer("{kind: sigmoid_bias, normalize: false}").eval()
    x = _x()
    with torch.no_grad():
        w, w_scaled, w_raw = (m.router(x).topk_weight_TK for m in (base, scaled, raw))
        torch.testing.assert_close(w.sum(-1), torch.ones(64))
        torch.testing.assert_close(w_scaled, 2.5 * w)
        scores = torch.sigmoid(raw.router.logits(x)).gather(1, raw.router(x).topk_idx_TK)
        torch.testing.assert_close(w_raw, scores)
        assert not torch.equal(base(x).y, scaled(x).y) and not torch.equal(base(x).y, raw(x).y)
