"""Where a training step's time goes: torch.profiler (CPU) events attributed to phases.

How an event is attributed: forward ops by the innermost moeplat.nn.profiling range around them
(attention, MoE router, dispatch, experts, combine, aux losses, stats; the optimizer range opened
by the step); backward ops, which run outside any range, by their autograd node's sequence number,
which is the sequence number of the forward op that recorded it: a backward op goes to the phase
of its forward op. Each event counts its self CPU time (its own time, children excluded), so no
microsecond counts twice; a range's own self time is the Python that ran inside it. `other` is the
rest of the profiled steps' wall time: embedding, norms, LM head and cross-entropy, gradient
accumulation, and the Python between ops outside every range.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from moeplat.nn import profiling

# (phase name in the table, the ranges it holds)
PHASES = (
    ("attention", (profiling.ATTENTION,)),
    ("MoE routing (router, top-k)", (profiling.ROUTER,)),
    ("dispatch (sort, gather)", (profiling.DISPATCH,)),
    ("expert GEMMs", (profiling.EXPERTS,)),
    ("combine (weight, scatter-add)", (profiling.COMBINE,)),
    ("aux losses (balance, z)", (profiling.AUX_LOSSES,)),
    ("telemetry (routing stats)", (profiling.STATS,)),
    ("optimizer (AdamW, zero_grad)", (profiling.OPTIMIZER,)),
)
OTHER = "other (embedding, norms, head, loss, ...)"
_BACKWARD_ROOT = "autograd::engine::evaluate_function: "
_RANGE_TO_PHASE = {r: name for name, ranges in PHASES for r in ranges}


def _innermost_range(event) -> str | None:
    """The innermost phase range around an event (itself included), or None."""
    while event is not None:
        if event.name in _RANGE_TO_PHASE:
            return _RANGE_TO_PHASE[event.name]
        event = event.cpu_parent
    return None


def _backward_root(event):
    """The autograd node evaluation an event runs in, or None for forward / optimizer events."""
    while event is not None:
        if event.name.startswith(_BACKWARD_ROOT):
            return event
        event = event.cpu_parent
    return None


def attribute(events) -> dict[str, float]:
    """Self CPU microseconds per phase (PHASES' names) of a profile's events; unattributed left out."""
    seq_phase: dict[int, str] = {}
    roots = {}
    for e in events:
        root = _backward_root(e)
        roots[id(e)] = root
        if root is None and e.sequence_nr >= 0:
            found = _innermost_range(e)
            if found is not None:
                seq_phase.setdefault(e.sequence_nr, found)
    totals = {name: 0.0 for name, _ in PHASES}
    for e in events:
        root = roots[id(e)]
        found = _innermost_range(e) if root is None else seq_phase.get(root.sequence_nr)
        if found is not None:
            totals[found] += e.self_cpu_time_total
    return totals


def profile_phases(step: Callable[[], None], steps: int = 3) -> dict:
    """Run `step` `steps` times under torch.profiler (CPU); ms per step of each phase, `other`
    (the rest of the wall time) and the profiled step's wall time (the profiler slows it a little)."""
    from torch.profiler import ProfilerActivity, profile

    from moeplat.bench.layer import _stderr_fd_silenced

    with _stderr_fd_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.events()
    totals = attribute(events)
    ms = {name: us / 1e3 / steps for name, us in totals.items()}
    ms[OTHER] = max(wall_ms - sum(ms.values()), 0.0)
    rows = [{"phase": name, "ms": v, "share": v / wall_ms if wall_ms else 0.0} for name, v in ms.items()]
    ranges = sum(e.name in _RANGE_TO_PHASE for e in events) / steps
    return {
        "profiled_steps": steps,
        "step_ms": wall_ms,
        "phases": rows,
        "ranges_per_step": ranges,
        "range_us": range_cost_us(),
    }


def range_cost_us(n: int = 2000) -> float:
    """Microseconds one phase range costs with no profiler running (the median of 5 runs of n):
    times ranges_per_step, what the ranges add to a step, steadier than timing steps with and
    without them on a shared machine."""
    import statistics

    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            with profiling.phase(profiling.ROUTER):
                pass
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)
