"""Named torch.profiler ranges around the phases of a training step, so a profile of the step can
be read per phase (`moeplat bench`'s end-to-end section, moeplat.bench.e2e_phases).

A range costs about 2-10 us of Python whether or not a profiler runs; the quick-start step opens
~30 of them (0.2% of a ~120 ms step), and the bench times the step with them switched off too
(`ranges_off`) so the cost stays measured rather than assumed. Under torch.compile dynamo treats
record_function as a no-op context (torch._dynamo ProfilerContextVariable): no graph break.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.profiler import record_function

# Range names, innermost wins when they nest (dispatch holds experts and combine).
ATTENTION = "moeplat.attention"
ROUTER = "moeplat.moe.router"  # router forward, top-k, capacity keep mask
DISPATCH = "moeplat.moe.dispatch"  # sort by expert, gather the tokens (the whole dispatcher if not split)
EXPERTS = "moeplat.moe.experts"  # the expert MLPs (grouped GEMMs and activation)
COMBINE = "moeplat.moe.combine"  # weight and scatter-add the expert outputs back to their tokens
AUX_LOSSES = "moeplat.moe.aux_losses"  # balancing / z losses of the routing decision
STATS = "moeplat.moe.stats"  # detached routing statistics (telemetry)
OPTIMIZER = "moeplat.optimizer"  # opened by the training loop that steps the optimizer

_enabled = True


def phase(name: str) -> contextlib.AbstractContextManager:
    """record_function(name), or a no-op context while ranges are switched off."""
    return record_function(name) if _enabled else contextlib.nullcontext()


@contextlib.contextmanager
def ranges_off() -> Iterator[None]:
    """Switch every phase range off inside the block (to time what the ranges themselves cost)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
