"""losses.load_balancing.scope: micro_batch (today's numbers), sequence (hand value) and
global_batch (moeplat.nn.balance: the step's f, by a routing pre-pass or a reduce in the forward),
on one process. The multi-process equality with one process on the whole batch is in
tests/parallel/test_global_balance.py."""

from __future__ import annotations

import math

import pytest
import torch

from moeplat.nn import MoELayer, TransformerLM
from moeplat.nn.balance import StepLoad, count_step_load
from moeplat.nn.experts import DenseFFN
from moeplat.nn.routers import TopKRouter

LN3 = math.log(3.0)


def _hand_layer(scope: str) -> MoELayer:
    """D = E = 2, K = 1, router weight = identity: a token [ln 3, 0] has probs [.75, .25]."""
    layer = MoELayer(2, 2, 1, 4, balance_coef=1.0, balance_loss_scope=scope)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    return layer


def _hand_x() -> torch.Tensor:
    """Two sequences of two tokens: [e0, e0] and [e0, e1] (probs .75/.25 towards the chosen one)."""
    a, c = [LN3, 0.0], [0.0, LN3]
    return torch.tensor([[a, a], [a, c]])


def test_scopes_hand_values():
    """micro_batch: f = [3/4, 1/4], P = [.625, .375] -> 2 (.75 .625 + .25 .375) = 1.125.
    sequence: [e0, e0] f = [2, 0], P = [.75, .25] -> 1.5; [e0, e1] f = [1, 1], P = [.5, .5] -> 1;
    mean 1.25. global_batch with the step's f = [.5, .5] -> 2 (.5 .625 + .5 .375) = 1.0."""
    x = _hand_x()
    assert _hand_layer("micro_batch")(x).losses["load_balancing"].item() == pytest.approx(1.125)
    assert _hand_layer("sequence")(x).losses["load_balancing"].item() == pytest.approx(1.25)
    out = _hand_layer("global_batch")(x, step_load=torch.tensor([0.5, 0.5]))
    assert out.losses["load_balancing"].item() == pytest.approx(1.0)
    assert out.aux_loss.item() == pytest.approx(1.0)  # coef 1, the only loss on
    # without the step's f, this forward is the whole batch: the micro-batch value
    assert _hand_layer("global_batch")(x).losses["load_balancing"].item() == pytest.approx(1.125)
    torch.testing.assert_close(out.routed_E, torch.tensor([3.0, 1.0]))


def test_micro_batch_keeps_todays_numbers_exactly():
    """The default scope is the Switch loss of the forward's tokens, bit for bit the formula
    E * sum_i (count_i / (T K)) * mean_t probs[t, i] of moeplat before the scope existed."""
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, 16, balance_coef=0.01, z_loss_coef=0.001)
    assert layer.balance_loss_scope == "micro_batch"
    x = torch.randn(3, 5, 8)
    out = layer(x)
    route = layer.router(x.reshape(-1, 8))
    f_E = torch.bincount(route.topk_idx_TK.reshape(-1), minlength=4).float() / route.topk_idx_TK.numel()
    today = 4 * (f_E * route.probs_TE.float().mean(dim=0)).sum()
    assert torch.equal(out.losses["load_balancing"], today.detach())
    # and the step_load argument is ignored outside scope global_batch
    again = layer(x, step_load=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(again.aux_loss, out.aux_loss)


def test_unknown_scope_is_refused():
    with pytest.raises(ValueError, match="balance_loss_scope"):
        MoELayer(8, 4, 2, 16, balance_loss_scope="global")


def _lm(scope: str, *, dropout: float = 0.0, jitter: float = 0.0, ckpt: bool = False) -> TransformerLM:
    """Two MoE blocks around a dense one, float64 (the router's softmax stays float32)."""
    torch.manual_seed(7)
    D, E, K, V = 8, 4, 2, 13

    def moe(seed: int) -> MoELayer:
        torch.manual_seed(seed)
        router = TopKRouter(D, E, K, logits_precision="input", jitter_eps=jitter)
        return MoELayer(
            D, E, K, 12, router=router, balance_coef=0.1, z_loss_coef=0.01, balance_loss_scope=scope
        )

    ffns = [moe(1), DenseFFN(D, 12), moe(2)]
    model = TransformerLM(V, D, 2, 1, 16, ffns, dropout=dropout, activation_checkpointing=ckpt)
    return model.double()


def _batch(n: int = 4, S: int = 4, V: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (n, S), generator=g), torch.randint(0, V, (n, S), generator=g)


def _grads(model: TransformerLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _accumulated(model: TransformerLM, x: torch.Tensor, y: torch.Tensor, A: int, plan: StepLoad | None):
    """A micro-batches with the loss scaled by 1 / A (Lightning's accumulation); the mean loss."""
    total = 0.0
    for x_mb, y_mb in zip(x.chunk(A), y.chunk(A), strict=True):
        out = model(x_mb, y_mb, step_load=plan)
        loss = (out.loss + out.aux_loss) / A
        loss.backward()
        total += loss.detach()
    return total


@pytest.mark.parametrize("ckpt", [False, True])
def test_global_batch_accumulation_equals_the_whole_batch(ckpt):
    """2 accumulation micro-batches with the pre-pass's f: loss and every gradient equal one
    forward on the whole batch; with micro_batch scope they do not (the scope matters here)."""
    x, y = _batch()
    ref = _lm("global_batch")
    out = ref(x, y)
    (out.loss + out.aux_loss).backward()
    model = _lm("global_batch", ckpt=ckpt)
    plan = count_step_load(model, x.chunk(2))
    loss = _accumulated(model, x, y, 2, plan)
    torch.testing.assert_close(loss, (out.loss + out.aux_loss).detach(), rtol=1e-6, atol=0)
    got, want = _grads(model), _grads(ref)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)
    local = _lm("micro_batch", ckpt=ckpt)
    _accumulated(local, x, y, 2, None)
    router = "blocks.0.ffn.router.weight"
    assert not torch.allclose(_grads(local)[router], want[router], rtol=1e-6, atol=0)


def _doubling(calls: list):
    """A reduce as over 2 ranks with equal counts, recording its calls."""

    def reduce(counts_E: torch.Tensor) -> torch.Tensor:
        calls.append(counts_E.clone())
        return counts_E * 2

    return reduce


def test_checkpointing_counts_once_and_gives_the_same_gradients():
    """With a reduce in the forward (one micro-batch per step), a recomputed block reads the
    cached f: the reduce runs once per MoE layer, and checkpointing on and off agree."""
    x, y = _batch()
    results = []
    for ckpt in (False, True):
        calls = []
        model = _lm("global_batch", ckpt=ckpt)
        plan = StepLoad(reduce=_doubling(calls))
        out = model(x, y, step_load=plan)
        (out.loss + out.aux_loss).backward()
        assert len(calls) == 2, f"checkpointing={ckpt}: reduce ran {len(calls)} times for 2 MoE layers"
        results.append((out.aux_loss.detach(), _grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=0, atol=0, msg=name)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_pre_pass_replays_the_random_state(device):
    """With dropout and router jitter, the pre-pass routes each micro-batch exactly as its
    training forward then does (the RNG is restored after it), and leaves the state untouched."""
    x, y = (t.to(device) for t in _batch())
    model = _lm("global_batch", dropout=0.2, jitter=0.3).to(device)
    get_state = torch.get_rng_state if device == "cpu" else torch.cuda.get_rng_state
    torch.manual_seed(11)
    before = get_state()
    plan = count_step_load(model, x.chunk(2))
    assert torch.equal(get_state(), before)
    counts = {}
    for x_mb, y_mb in zip(x.chunk(2), y.chunk(2), strict=True):
        out = model(x_mb, y_mb, step_load=plan)
        (out.loss + out.aux_loss).backward()
        for layer, o in out.moe.items():
            counts[layer] = counts.get(layer, 0) + o.routed_E
    assert plan.layers.keys() == counts.keys() == {0, 2}
    for layer, c in counts.items():
        torch.testing.assert_close(plan.layers[layer], c / c.sum(), rtol=0, atol=0)
    # a different random state routes differently (the check above could fail)
    other = count_step_load(model, x.chunk(2))
    assert any(not torch.equal(other.layers[i], plan.layers[i]) for i in (0, 2))
