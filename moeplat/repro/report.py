"""The results page: per finding, each variant's mean ± standard deviation over seeds with the run
ids, and a mechanical verdict that states the numbers whether the finding reproduces or not."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from moeplat.repro.findings import Finding
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
    (ma, sa), (mb, sb) = (mean_std(_values(records, v, seeds, "val/loss")) for v in (base, other))
    spread = max(sa, sb, 1e-4)
    ok = mb <= ma + spread if f.guard == "equal or better" else abs(mb - ma) <= spread
    return ok, (
        f"; val/loss {mb:.4f} vs {ma:.4f} ({f.guard} required, within the spread {spread:.4f}: "
        f"{'yes' if ok else 'no'})"
    )


def finding_section(f: Finding, records: dict, seeds: list[int]) -> str:
    short, text = verdict(f, records, seeds)
    cols = ["val/loss"] + ([f.figure] if f.figure != "val/loss" else [])
    lines = [
        f"### {f.key}: {f.claim}",
        "",
        f"Source: {f.source}. Verdict: **{short}**: {text}.",
        "",
        "| variant | " + " | ".join(cols) + " | runs (seed: run id) |",
        "|---|" + "---|" * len(cols) + "---|",
    ]
    for v in f.variants:
        cells = []
        for key in cols:
            vals = _values(records, v, seeds, key)
            cells.append(f"{mean_std(vals)[0]:.4f} ± {mean_std(vals)[1]:.4f}" if vals else "n/a")
        runs = ", ".join(f"{s}: `{records[v, s].run_id}`" for s in seeds)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(lines) + "\n"


def results_page(
    findings: list[Finding], records: dict[tuple[str, int], Record], seeds: list[int], header: str
) -> str:
    summary = ["| finding | verdict |", "|---|---|"]
    summary += [f"| {f.key} | {verdict(f, records, seeds)[0]} |" for f in findings]
    sections = [finding_section(f, records, seeds) for f in findings]
    return "\n".join([header, "", *summary, "", *sections])
