"""Our Lightning callbacks, on their own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moeplat.train.callbacks import FiniteLoss, NonFiniteLossError


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
