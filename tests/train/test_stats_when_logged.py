"""Routing statistics are computed only on the training forwards whose MoE telemetry is logged
(issue 20): the logged values, the trained weights and the aux-loss-free bias are exactly those of
computing them on every forward (the former behaviour, forced here as the reference)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader

import moeplat.nn.moe as moe_module
from moeplat.nn import MoELayer, SigmoidBiasRouter, TransformerLM
from moeplat.train.system import LMSystem

E, K, D, STEPS, LOG_EVERY = 4, 2, 16, 6, 2


class _Recorder(Logger):
    """Keeps what LMSystem sends the logger: {step: metrics}."""

    def __init__(self):
        super().__init__()
        self.logged: dict[int, dict[str, float]] = {}

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.logged.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _model(checkpointing: bool) -> TransformerLM:
    torch.manual_seed(0)
    ffns = [
        MoELayer(D, E, K, 32, router=SigmoidBiasRouter(D, E, K, gamma=1e-2), balance_coef=0.01)
        for _ in range(2)
    ]
    return TransformerLM(64, D, 2, 1, 16, ffns, activation_checkpointing=checkpointing)


def _train(accumulate: int, checkpointing: bool, compiled: bool = False) -> tuple[dict, dict, TransformerLM]:
    model = _model(checkpointing)
    if compiled:
        model.compile(backend="eager")
    g = torch.Generator().manual_seed(1)
    data = [tuple(torch.randint(0, 64, (2, 2, 16), generator=g)) for _ in range(STEPS * accumulate)]
    system = LMSystem(model, _adamw, log_every=LOG_EVERY)
    logger = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=LOG_EVERY,
    )
    trainer.fit(system, train_dataloaders=DataLoader(data, batch_size=None))
    moe = {step: {k: v for k, v in m.items() if k.startswith("moe/")} for step, m in logger.logged.items()}
    return (
        {s: m for s, m in moe.items() if m},
        {n: p.detach().clone() for n, p in model.state_dict().items()},
        model,
    )


def _adamw(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _stats_every_forward(monkeypatch):
    """The reference: every MoE forward computes its statistics, whatever it is asked."""
    forward = MoELayer.forward
    monkeypatch.setattr(
        MoELayer, "forward", lambda self, *a, **kw: forward(self, *a, **{**kw, "stats": True})
    )


def _count_routing_stats(monkeypatch) -> list[int]:
    calls = []
    real = moe_module.routing_stats

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_module, "routing_stats", counted)
    return calls


@pytest.mark.parametrize(("accumulate", "checkpointing"), [(1, False), (2, False), (2, True)])
def test_logged_telemetry_weights_and_bias_equal_stats_on_every_forward(
    monkeypatch, accumulate, checkpointing
):
    calls = _count_routing_stats(monkeypatch)
    logged, weights, model = _train(accumulate, checkpointing)
    if not checkpointing:  # a checkpointed block recomputes its forward (and its statistics) in backward
        # steps 0, 2, 4 log, at their first micro-batch only: one call per MoE layer each
        assert len(calls) == 2 * len(range(0, STEPS, LOG_EVERY))
    assert sorted(logged) == list(range(0, STEPS, LOG_EVERY))
    with monkeypatch.context() as m:
        _stats_every_forward(m)
        logged_ref, weights_ref, model_ref = _train(accumulate, checkpointing)
    assert logged == logged_ref  # exactly: the same statistics of the same forwards
    assert weights.keys() == weights_ref.keys()
    for name, w in weights_ref.items():
        assert torch.equal(weights[name], w), name
    biases = [b.ffn.router.bias_E for b in model.blocks]
    assert all(bool(b.abs().sum() > 0) for b in biases)  # the bias router did update, every step
    for b, b_ref in zip(biases, [b.ffn.router.bias_E for b in model_ref.blocks], strict=True):
        assert torch.equal(b, b_ref)


def test_a_forward_without_statistics_keeps_losses_routed_counts_and_load():
    """The switched-on losses (the aux loss's), routed counts and load; the zero-coefficient
    losses are telemetry and wait for a logging step."""
    torch.manual_seed(0)
    layer = MoELayer(D, E, K, 32, balance_coef=0.01, z_loss_coef=1e-3).train()
    x = torch.randn(2, 8, D)
    full, lean = layer(x), layer(x, stats=False)
    assert lean.stats is None and full.stats is not None
    assert torch.equal(lean.aux_loss, full.aux_loss) and set(lean.losses) == {"load_balancing", "z_loss"}
    assert all(torch.equal(v, full.losses[k]) for k, v in lean.losses.items())
    assert torch.equal(lean.routed_E, full.routed_E)
    assert torch.equal(lean.load_E, full.load_E)  # the bias update's input, without the statistics


def test_compiled_training_loop_breaks_no_graph():
    """train.compile under Lightning, accumulating: logging and other steps are one graph each (the
    stats flag is a guarded constant), no graph break. Dynamo's eager backend: the trace, not inductor."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    logged, _, model = _train(2, False, compiled=True)
    assert model._compiled_call_impl is not None
    assert sorted(logged) == list(range(0, STEPS, LOG_EVERY))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2
