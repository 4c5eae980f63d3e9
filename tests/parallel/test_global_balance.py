"""Global-batch load balancing (losses.load_balancing.scope: global_batch, moeplat.nn.balance)
under data parallelism: 2 gloo ranks x 2 accumulation micro-batches give the loss and every
gradient of one process on the whole batch (float64), with activation checkpointing on and off,
also under expert parallelism; the micro_batch scope does not. Cases: balance_helpers.py."""

from __future__ import annotations

import balance_helpers
import ep_helpers as h
import pytest

pytestmark = pytest.mark.slow


def test_two_ranks_times_two_micro_batches_equal_one_process_on_the_whole_batch():
    cases = [
        ("case_ddp", (2, False)),
        ("case_ddp", (2, True)),  # checkpointing: the recomputed forward must not count again
        ("case_ddp", (1, True)),  # one micro-batch: f reduced inside the forward, once
        ("case_micro_batch_differs", (2,)),
        ("case_expert_parallel", (2, False)),
        ("case_expert_parallel", (2, True)),
    ]
    h.spawn(balance_helpers.run_cases, 2, cases)
