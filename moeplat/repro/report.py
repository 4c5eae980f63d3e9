"""The results page: per finding, each variant's mean ± standard deviation over seeds with the run
ids, and a mechanical verdict that states the numbers whether the finding reproduces or not."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from moeplat.repro.findings import LR_GRID, Finding, lr_variant
from moeplat.repro.runner import Record


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _values(records: dict, variant: str, seeds: Iterable[int], key: str) -> list[float]:
    return [records[variant, s].figures[key] for s in seeds if key in records[variant, s].figures]


def verdict(f: Finding, records: dict, seeds: list[int]) -> tuple[str, str]:
    """(short verdict, sentence with the numbers) for finding `f` over `seeds`."""
    base, other = f.variants
    a, b = _values(records, base, seeds, f.figure), _values(records, other, seeds, f.figure)
    if len(a) < len(seeds) or len(b) < len(seeds):
        return "not measured", f"{f.figure} was not logged by every run of {base} and {other}"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    better = [(y < x) if f.lower_is_better else (y > x) for x, y in zip(a, b)]
    spread = max(sa, sb)
    holds = (mb < ma) if f.lower_is_better else (mb > ma)
    text = f"{other} {mb:.4f} vs {base} {ma:.4f} on {f.figure} (difference {mb - ma:+.4f}, seeds' spread {spread:.4f})"
    guard_ok, guard_text = _guard(f, records, seeds)
    text += guard_text
    if not holds or not guard_ok:
        return "does not reproduce at this scale", text
    if all(better):
        return f"reproduces on every seed ({len(better)}/{len(better)})", text
    return f"reproduces on the mean, on {sum(better)} of {len(better)} seeds", text


def _guard(f: Finding, records: dict, seeds: list[int]) -> tuple[bool, str]:
    if f.guard is None:
        return True, ""
    base, other = f.variants
    (ma, sa), (mb, _) = (mean_std(_values(records, v, seeds, "val/loss")) for v in (base, other))
    # the tolerance is the baseline's seed spread: a variant whose own seeds scatter (one diverging)
    # must not widen what counts as comparable to it
    spread = max(sa, 1e-4)
    ok = mb <= ma + spread if f.guard == "equal or better" else abs(mb - ma) <= spread
    return ok, (
        f"; val/loss {mb:.4f} vs {ma:.4f} ({f.guard} required, within {base}'s seed spread "
        f"{spread:.4f}: {'yes' if ok else 'no'})"
    )


def _val_loss(record: Record) -> str:
    value = record.figures.get("val/loss")
    return "n/a" if value is None else f"{value:.4f}"


def finding_section(f: Finding, records: dict, seeds: list[int]) -> str:
    short, text = verdict(f, records, seeds)
    cols = ["val/loss"] + ([f.figure] if f.figure != "val/loss" else [])
    lines = [
        f"### {f.key}: {f.claim}",
        "",
        f"Source: {f.source}. Verdict: **{short}**: {text}.",
        "",
        "| variant | " + " | ".join(cols) + " | runs (seed: val/loss, run id) |",
        "|---|" + "---|" * len(cols) + "---|",
    ]
    for v in f.variants:
        cells = []
        for key in cols:
            vals = _values(records, v, seeds, key)
            cells.append(f"{mean_std(vals)[0]:.4f} ± {mean_std(vals)[1]:.4f}" if vals else "n/a")
        runs = ", ".join(f"{s}: {_val_loss(records[v, s])} `{records[v, s].run_id}`" for s in seeds)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {runs} |")
    if f.lr_sweep:
        lines += ["", *lr_sweep_table(f.lr_sweep, records, seeds[0])]
    return "\n".join(lines) + "\n"


def lr_sweep_table(variants: tuple[str, ...], records: dict, seed: int) -> list[str]:
    """Each variant's learning-rate sweep on `seed`: val/loss per rate, the spec file's own rate in
    bold (its run is the variant's run on that seed), and whether that rate is the sweep's best."""
    lines = [
        f"Tuning, the same for each: one learning-rate sweep on seed {seed}; each spec file holds the "
        "rate in bold. val/loss:",
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in LR_GRID) + " | the spec's rate is the best |",
        "|---|" + "---|" * len(LR_GRID) + "---|",
    ]
    for v in variants:
        points = [records[lr_variant(v, lr), seed] for lr in LR_GRID]
        own = records[v, seed].run_id
        cells = [
            f"**{r.figures['val/loss']:.4f}**" if r.run_id == own else f"{r.figures['val/loss']:.4f}"
            for r in points
        ]
        best = min(points, key=lambda r: r.figures["val/loss"])
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {'yes' if best.run_id == own else 'no'} |")
    runs = ", ".join(
        f"{r.variant}: `{r.run_id}`"
        for v in variants
        for lr in LR_GRID
        for r in [records[lr_variant(v, lr), seed]]
    )
    return [*lines, "", f"Sweep runs: {runs}."]


def results_page(
    findings: list[Finding], records: dict[tuple[str, int], Record], seeds: list[int], header: str
) -> str:
    summary = ["| finding | verdict |", "|---|---|"]
    summary += [f"| {f.key} | {verdict(f, records, seeds)[0]} |" for f in findings]
    sections = [finding_section(f, records, seeds) for f in findings]
    return "\n".join([header, "", *summary, "", *sections])
