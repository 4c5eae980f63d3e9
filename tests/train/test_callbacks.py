"""Our Lightning callbacks, on their own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moeplat.train.callbacks import FiniteLoss, NonFiniteLossError, Throughput, peak_tflops_for


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_stops_with_a_reason(bad):
    trainer = SimpleNamespace(global_step=7)
    with pytest.raises(NonFiniteLossError, match=r"at step 7.*train\.optimizer\.lr"):
        FiniteLoss().on_train_batch_end(trainer, None, {"loss": torch.tensor(bad)}, None, 0)


def test_finite_loss_passes():
    FiniteLoss().on_train_batch_end(
        SimpleNamespace(global_step=1), None, {"loss": torch.tensor(2.5)}, None, 0
    )
    FiniteLoss().on_train_batch_end(SimpleNamespace(global_step=1), None, torch.tensor(2.5), None, 0)


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A10G", 70.0),
        ("Some Future GPU", None),
        ("cpu", None),
    ],
)
def test_peak_tflops_by_gpu_name(name, tflops):
    assert peak_tflops_for(name) == tflops


class _Module:
    def __init__(self):
        self.logged: dict[str, float] = {}

    def log_dict(self, metrics):
        self.logged.update(metrics)


def _trainer(step: int):
    opt = SimpleNamespace(param_groups=[{"lr": 1e-3}])
    return SimpleNamespace(
        global_step=step, optimizers=[opt], strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )


@pytest.mark.parametrize("peak", [None, 50.0])
def test_throughput_logs_flops_tokens_seen_and_mfu_only_with_a_peak(peak):
    cb = Throughput(tokens_per_step=1000, every=2, flops_per_token=6_000, peak_tflops=peak, devices=2)
    module = _Module()
    cb.on_train_start(_trainer(10), module)  # a resumed run: 10 steps already seen
    assert cb.device_name == "cpu" and cb.peak_tflops == peak  # no lookup on CPU
    cb.on_train_batch_end(_trainer(12), module, None, None, 0)
    m = module.logged
    assert m["perf/tokens_seen"] == 12_000
    assert m["perf/flops_per_s"] == pytest.approx(m["perf/tokens_per_s"] * 6_000)
    if peak is None:
        assert "perf/mfu" not in m
    else:
        assert m["perf/mfu"] == pytest.approx(m["perf/flops_per_s"] / (2 * 50e12))
