"""User-facing errors.

`SpecError` carries every problem found in a spec (or in CLI usage) at once, each pinned to a
file, a line and a dotted path, so that a user fixes all of them in one edit. Our own invariants
are plain asserts: a failing assert is our bug, not the user's.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: where it is, what is wrong, what to do."""

    path: str  # dotted path, e.g. "model.moe.top_k"; "" for the whole file
    message: str
    file: str | None = None
    line: int | None = None
    value: object = field(default=None, compare=False)
    has_value: bool = False
    hint: str | None = None  # e.g. "did you mean 'top_k'?"

    def format(self) -> str:
        where = self.file or ""
        if self.file and self.line is not None:
            where = f"{where}:{self.line}"
        text = ": ".join(part for part in (where, self.path, self.message) if part)
        if self.has_value:
            text += f" (got {_short_repr(self.value)})"
        if self.hint:
            text += f"; {self.hint}"
        return text


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SpecError(Exception):
    """Invalid spec, override or usage. The CLI prints every issue and exits with code 2."""

    exit_code = 2

    def __init__(self, issues: list[SpecIssue] | SpecIssue | str):
        if isinstance(issues, str):
            issues = [SpecIssue(path="", message=issues)]
        elif isinstance(issues, SpecIssue):
            issues = [issues]
        assert issues, "SpecError needs at least one issue"
        self.issues: list[SpecIssue] = list(issues)
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.issues)
        head = f"{n} problem{'s' if n != 1 else ''} in spec:"
        return "\n".join([head, *("  " + issue.format() for issue in self.issues)])
