"""Validate and plan spec text submitted over HTTP, confined to the configured spec roots.

A submitted text is loaded as if it were the file `filename` in the first spec root, so
`extends: quickstart.yaml` works as it does for a file there. Before the loader sees it, the text
is checked for its size (the API answers 413) and for OmegaConf resolvers such as
`${oc.env:MOEPLAT_TOKEN}` (they read the server's environment). The YAML limits (nesting, alias
expansion, recursive aliases, duplicate keys...) are the loader's own, the same as the CLI's
(moeplat.spec.safe_yaml), so a file that `moeplat validate` refuses is refused here. After loading, every path the spec
names (extends chain, data.source.paths, prepared corpora, train.init.checkpoint) must resolve, symlinks followed,
inside the spec roots. Errors are SpecIssues, reported with file names relative to their root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from pathlib import Path

from moeplat.errors import SpecError, SpecIssue
from moeplat.server.settings import ServerSettings
from moeplat.spec.loader import LoadedSpec, inside, load_spec
from moeplat.spec.safe_yaml import decode
from moeplat.spec.sweep import LoadedSweep, load_sweep

RESOLVER = re.compile(r"\$\{\s*[A-Za-z_][\w.\-]*\s*:")  # ${name:args}; ${a.b} interpolation has no colon
CONFINED = ("data", "data.source", "train", "train.init")  # sections that hold the paths below


class SpecTooLarge(Exception):
    """The spec text exceeds settings.max_spec_bytes (the API answers 413)."""


def issue_dict(issue: SpecIssue) -> dict:
    return {
        "path": issue.path,
        "message": issue.message,
        "line": issue.line,
        "file": issue.file,
        "hint": issue.hint,
        "text": issue.format(),
    }


def virtual_path(filename: str, settings: ServerSettings, root_index: int = 0) -> Path:
    """Where a submitted text "lives": `filename` under a spec root (the first by default)."""
    root = settings.spec_roots[root_index]
    path = Path(os.path.normpath(root / filename))
    if not filename or "\x00" in filename or Path(filename).is_absolute() or not path.is_relative_to(root):
        raise SpecError(
            SpecIssue(
                "filename", "must be a relative path inside the spec root", has_value=True, value=filename
            )
        )
    if path.suffix not in (".yaml", ".yml"):
        raise SpecError(SpecIssue("filename", "must end in .yaml or .yml", has_value=True, value=filename))
    return path


def spec_file(path: str, settings: ServerSettings) -> tuple[int, str, str]:
    """A spec file named relative to a spec root (POST /api/jobs `path`): (root index, its name
    relative to that root, its text). Symlinks are followed only where they stay inside the root."""
    candidate = Path(path)
    for i, root in enumerate(settings.spec_roots):
        file = root / candidate
        if not path or candidate.is_absolute() or not inside(file, (root,)):
            continue
        with contextlib.suppress(OSError, ValueError):  # too long a name, a NUL byte: no such file
            if not file.is_file():
                continue
            if file.stat().st_size > settings.max_spec_bytes:
                raise SpecTooLarge(f"spec file is larger than the limit of {settings.max_spec_bytes} bytes")
            name = os.path.normpath(candidate)
            return i, name, decode(file.read_bytes(), name)  # non-UTF-8: an error with its line
    raise SpecError(SpecIssue("path", "no such spec file inside the spec roots", has_value=True, value=path))


def precheck(text: str, overrides: list[str], filename: str, settings: ServerSettings) -> list[SpecIssue]:
    """Encoding, size and resolvers; [] when the loader may have it (it checks the YAML itself)."""
    for what, value in (("text", text), ("filename", filename), *(("overrides", ov) for ov in overrides)):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can carry lone surrogates ("\udfff"); files cannot
            return [SpecIssue(what, f"not encodable as UTF-8 (a lone surrogate at character {e.start})")]
    if len(text.encode()) > settings.max_spec_bytes:
        raise SpecTooLarge(f"spec text is larger than the limit of {settings.max_spec_bytes} bytes")
    issues = [
        SpecIssue("", "OmegaConf resolvers (${name:...}) are not allowed in submitted specs", filename, n)
        for n, line in enumerate(text.splitlines(), 1)
        if RESOLVER.search(line)
    ]
    issues += [
        SpecIssue("", "OmegaConf resolvers (${name:...}) are not allowed", f"--set {ov}")
        for ov in overrides
        if RESOLVER.search(ov)
    ]
    return issues


def _display(issue: SpecIssue, vpath: Path, filename: str, roots: tuple[Path, ...]) -> SpecIssue:
    """File names as the user knows them: the submitted filename, or relative to their spec root."""
    file, message = issue.file, issue.message
    if file == str(vpath):
        file = filename
    for root in roots:
        prefix = str(root) + os.sep
        if file and file.startswith(prefix):
            file = file.removeprefix(prefix)
        message = message.replace(prefix, "")
    return SpecIssue(issue.path, message, file, issue.line, issue.value, issue.has_value, issue.hint)


def load_text(
    kind: str, text: str, overrides: list[str], filename: str, settings: ServerSettings, root_index: int = 0
) -> LoadedSpec | LoadedSweep:
    """Load `text` as the file `filename` in a spec root; SpecError with display names."""
    roots = settings.spec_roots
    issues = precheck(text, overrides, filename, settings)
    vpath = virtual_path(filename, settings, root_index)
    try:
        if issues:
            raise SpecError(issues)
        if kind == "sweep":
            loaded = load_sweep(vpath, text=text, roots=roots)
            if overrides:
                raise SpecError(
                    SpecIssue("overrides", "a sweep takes no --set overrides: edit its `overrides`")
                )
        else:
            loaded = load_spec(vpath, overrides, text=text, roots=roots)
        if problems := confinement_problems(loaded, roots):
            raise SpecError(problems)
    except SpecError as e:
        raise SpecError([_display(i, vpath, filename, roots) for i in e.issues]) from None
    return loaded


def confinement_problems(loaded: LoadedSpec | LoadedSweep, roots: tuple[Path, ...]) -> list[SpecIssue]:
    """Paths a run would read must stay inside the spec roots (the loader already checked extends)."""
    issues = []
    if isinstance(loaded, LoadedSweep):
        for key in [*loaded.sweep.search, *loaded.sweep.overrides]:
            if key in CONFINED or key.startswith(("data.source.", "train.init.")):
                where = ("search" if key in loaded.sweep.search else "overrides", key)
                msg = "paths are checked before a job runs: set them in the base spec, not in a sweep"
                issues.append(SpecIssue(".".join(where), msg, loaded.path))
        loaded = loaded.base
    issues += _source_problems(loaded.spec.data.source, "data.source", loaded, roots)
    p = loaded.spec.data.prepared_dir  # token shards the worker writes
    if p is not None and not _local_inside(loaded, p, roots):
        msg = "must stay inside the spec roots (or be an s3:// URL)"
        issues.append(SpecIssue("data.prepared_dir", msg, loaded.files[0], has_value=True, value=p))
    init = loaded.spec.train.init
    if init.kind == "upcycle":
        ckpt = Path(init.checkpoint)
        if not inside(ckpt, roots) if ckpt.is_absolute() else os.path.normpath(ckpt).startswith(".."):
            msg = "must be a path inside the worker's runs directory (relative, no '..') or the spec roots"
            issues.append(SpecIssue("train.init.checkpoint", msg, loaded.files[0]))
    return issues


def _local_inside(loaded: LoadedSpec, p: str, roots: tuple[Path, ...]) -> bool:
    """A local path (relative to the spec file) inside the roots; URLs are the object store's business."""
    return "://" in p or inside(Path(loaded.base_dir) / p, roots)


def _source_problems(src, key: str, loaded: LoadedSpec, roots: tuple[Path, ...]) -> list[SpecIssue]:
    """Every local file or folder a data source reads, a mixture's sources included."""
    if src.kind == "mixture":
        return [
            issue
            for i, c in enumerate(src.sources)
            for issue in _source_problems(c.source, f"{key}.sources.{i}.source", loaded, roots)
        ]
    named = []  # (field, path) pairs the worker would read
    if src.kind == "text_files":
        named = [(f"{key}.paths.{i}", p) for i, p in enumerate(src.paths)]
    elif src.kind == "prepared":
        named = [(f"{key}.path", src.path)]
    elif src.kind == "hf_dataset":
        named = [(f"{key}.data_files.{i}", p) for i, p in enumerate(src.data_files or ())]
        local = Path(loaded.base_dir) / src.path  # a dataset folder (a Hub name is no local path)
        if os.path.isabs(src.path) or src.path.startswith(".") or local.is_dir():
            named.append((f"{key}.path", src.path))
    msg = "must stay inside the spec roots" + ("" if src.kind == "text_files" else " (or be an s3:// URL)")
    return [
        SpecIssue(field, msg, loaded.files[0], has_value=True, value=p)
        for field, p in named
        if not _local_inside(loaded, p, roots)
    ]


def validate_text(
    kind: str, text: str, overrides: list[str], filename: str, settings: ServerSettings
) -> dict:
    try:
        loaded = load_text(kind, text, overrides, filename, settings)
    except SpecError as e:
        return {"ok": False, "name": None, "hash": None, "errors": [issue_dict(i) for i in e.issues]}
    if isinstance(loaded, LoadedSweep):
        return {"ok": True, "name": loaded.sweep.name, "hash": loaded.base.spec_hash, "errors": []}
    return {"ok": True, "name": loaded.spec.name, "hash": loaded.spec_hash, "errors": []}


def plan_text(kind: str, text: str, overrides: list[str], filename: str, settings: ServerSettings) -> dict:
    """Plan and preflight (no device memory check: the server does not know the worker's GPU)."""
    from moeplat.spec.plan import plan
    from moeplat.spec.plan_text import format_plan, format_preflight
    from moeplat.spec.preflight import preflight

    try:
        loaded = load_text(kind, text, overrides, filename, settings)
    except SpecError as e:
        return {"ok": False, "errors": [issue_dict(i) for i in e.issues], "plan": None, "text": None}
    spec = loaded.base.spec if isinstance(loaded, LoadedSweep) else loaded.spec
    p = plan(spec)
    pf = preflight(spec, p, None)
    out = {
        "ok": True,
        "errors": [],
        "plan": {**p.to_dict(), "preflight": pf.to_dict()},
        "text": format_plan(spec, p) + "\n" + format_preflight(spec, pf),
    }
    if isinstance(loaded, LoadedSweep):  # as `moeplat plan SWEEP`: the range over the search space
        from moeplat.spec.plan_text import format_sweep
        from moeplat.spec.sweep_plan import plan_range

        r = plan_range(loaded)
        out["plan"]["sweep_range"] = r.to_dict()
        base = os.path.normpath(loaded.base_path)
        for root in settings.spec_roots:  # never show where the spec roots are on the server
            base = base.removeprefix(str(root) + os.sep)
        shown = dataclasses.replace(loaded, base_path=base)
        head = format_sweep(shown, None, r) + "\n\nbase spec (fixed overrides applied)\n"
        out["text"] = head + out["text"]
    return out
