"""The benchmark tables: times, ratios and peak memory, one line per candidate; plan vs measured memory."""

from __future__ import annotations

import math

from moeplat.bench.layer import Row

MiB = 2**20


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def format_rows(rows: list[Row]) -> str:
    head = f"{'candidate':<24} {'median ms':>10} {'/dense':>8} {'hf/this':>8} {'peak MiB':>9}  note"
    lines: list[str] = []
    group = None
    for r in rows:
        if (r.point, r.dtype) != group:
            group = (r.point, r.dtype)
            lines += ["", f"== {r.point}  {r.dtype}", head]
        ms = "skipped" if math.isnan(r.median_ms) else f"{r.median_ms:.2f}"
        mem = f"{r.peak_mib:.1f}" if r.peak_mib is not None else "-"
        lines.append(
            f"{r.candidate:<24} {ms:>10} {_x(r.vs_dense):>8} {_x(r.hf_over_this):>8} {mem:>9}  {r.note}"
        )
    return "\n".join(lines)


def format_overhead(o: dict[str, float]) -> str:
    return "\n".join(
        [
            "",
            "== whole training step (same model and batches)",
            f"plain PyTorch loop     {o['plain_s_per_step'] * 1e3:8.1f} ms/step",
            f"Lightning (LMSystem)   {o['lightning_s_per_step'] * 1e3:8.1f} ms/step  "
            f"overhead {o['lightning_overhead']:+.1%} vs plain (target <= 5%)",
            f"Lightning + MLflow     {o['tracked_s_per_step'] * 1e3:8.1f} ms/step  "
            f"tracking {o['tracking_overhead']:+.1%} vs Lightning (target <= 2%)",
        ]
    )


def format_memory(rows: list) -> str:
    """Plan vs measured memory (moeplat.bench.memory.MemoryRow), one line per spec."""
    head = f"{'spec':<26} {'plan MiB':>9} {'measured MiB':>13} {'plan/meas':>10}  plan: act / weights+grads+opt MiB"
    lines = [
        "",
        "== plan vs measured memory, one training step (target: plan/meas within 0.75x..1.25x)",
        head,
    ]
    for r in rows:
        e = r.estimate
        state = (e["weights"] + e["grads"] + e["optimizer"]) / MiB
        lines.append(
            f"{r.spec:<26} {r.estimate_bytes / MiB:>9.1f} {r.measured_bytes / MiB:>13.1f} {r.ratio:>9.2f}x"
            f"  {e['activations'] / MiB:.1f} / {state:.1f}"
        )
    return "\n".join(lines)
