"""Load a spec: YAML -> `extends` chain -> `--set` overrides -> ${interpolation} -> Pydantic.

Every step keeps track of where each key came from (file and line, or the --set flag) so that a
validation error points at the exact line the user must edit. All problems found are reported
together in one SpecError.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.diagnostics import did_you_mean, dotted, fields_at, issues_from_validation, walk
from moeplat.spec.root import Spec
from moeplat.spec.safe_yaml import MAX_EXTENDS, check_interpolation_size, compose_checked, read_spec_bytes

Path_ = tuple  # a key path: ("model", "moe", "top_k")


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec together with everything needed to reproduce and explain it."""

    spec: Spec
    resolved: dict  # plain, fully resolved mapping (what was validated)
    files: list[str]  # the spec file and its bases, child first
    overrides: list[str] = field(default_factory=list)
    base_dir: str = "."  # relative data paths resolve against the directory of the file that set them

    @property
    def spec_hash(self) -> str:
        blob = json.dumps(self.resolved, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def load_spec(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    as_path: str | Path | None = None,
    text: str | None = None,
    roots: tuple[Path, ...] | None = None,
) -> LoadedSpec:
    """Load and validate the spec file `path`.

    `as_path`: read `path` but treat it as if it lived at `as_path` (relative `extends:` and data
    paths resolve from there, errors name it); `files[0]` stays `path`. Used to run a job's copy of
    a spec submitted to the server at its virtual place under a spec root.
    `text`: the spec's content; `path` then only names where it lives and is not read.
    `roots`: when given, every `extends:` must resolve (symlinks followed) inside one of these
    directories; it is an error on `extends` otherwise, and the file is never read.
    """
    if as_path is not None and text is None:
        text = _read_text(Path(path))
        loaded = load_spec(as_path, overrides, text=text, roots=roots)
        return dataclasses.replace(loaded, files=[str(path), *loaded.files[1:]])
    path = Path(path)
    origins: dict[Path_, tuple[str | None, int | None]] = {}
    data, files = _load_chain(path, origins, stack=(), text=text, roots=roots)
    issues = [i for ov in overrides for i in _apply_override(data, ov, origins)]
    check_interpolation_size(data, lambda p: _origin_of(origins, p))
    resolved, more = _resolve(data, origins)
    issues += more
    if issues:
        raise SpecError(issues)
    spec = validate(resolved, origins, roots=roots)
    return LoadedSpec(spec, resolved, files, list(overrides), _data_base_dir(origins, path))


def inside(path: Path, roots: tuple[Path, ...]) -> bool:
    """Whether `path`, symlinks resolved, lies inside one of `roots` (also resolved)."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):  # e.g. a NUL byte in the name
        return False
    return any(real.is_relative_to(os.path.realpath(r)) for r in roots)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name longer than the file system takes
        return False


def _data_base_dir(origins: dict, path: Path) -> str:
    """Directory against which data.source.paths resolve: that of the file that set them
    (a base spec in another folder keeps its own relative paths), the working directory for --set."""
    file, _ = _origin_of(origins, ("data", "source", "paths"))
    if file and file.startswith("--set"):
        return str(Path.cwd())
    return str(Path(file).resolve().parent if file else path.resolve().parent)


def _base_dir_of(origins: dict, key: tuple) -> str:
    """Directory of the file that set `key` (the working directory for --set or when unknown)."""
    file, _ = _origin_of(origins, key)
    return str(Path(file).resolve().parent) if file and not file.startswith("--set") else str(Path.cwd())


def validate(resolved: dict, origins: dict | None = None, roots: tuple[Path, ...] | None = None) -> Spec:
    """Validate a plain mapping; errors name file:line when `origins` is known. `roots`: files that
    validation reads (an hf tokenizer's) must lie inside them or in the Hugging Face cache."""
    origins = origins or {}
    try:
        context = {
            "tokenizer_base_dir": _base_dir_of(origins, ("data", "tokenizer", "path")),
            "init_base_dir": _base_dir_of(origins, ("train", "init", "path")),
            # a spec read back from a run (no origins) is not checked against this machine's files
            "eval_base_dir": _base_dir_of(origins, ("train", "eval", "include_path")) if origins else None,
            "roots": roots,
        }
        return Spec.model_validate_json(json.dumps(resolved, allow_nan=True), context=context)
    except ValidationError as err:
        raise SpecError(issues_from_validation(Spec, err, lambda p: _origin_of(origins, p))) from None


def _origin_of(origins: dict, path: tuple) -> tuple[str | None, int | None]:
    """The file/line that set `path`, or of its nearest ancestor that exists."""
    for n in range(len(path), -1, -1):
        if path[:n] in origins:
            return origins[path[:n]]
    return (None, None)


# --- YAML with line numbers -------------------------------------------------------------------


def _read_text(path: Path) -> str:
    return read_spec_bytes(path)  # bounded size, strict UTF-8 (moeplat.spec.safe_yaml)


def _read_yaml(path: Path, origins: dict, text: str | None = None) -> dict:
    """`text`: the file's content when it does not come from disk (a spec submitted to the server)."""
    display = str(path)
    if text is None:
        text = _read_text(path)
    try:
        node = compose_checked(text, display)  # every size limit, before any object is built
    except yaml.YAMLError as e:
        raise SpecError(_yaml_issue(e, display)) from None
    if node is None:
        origins[()] = (display, None)  # so "required key is missing" still names the (empty) file
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise SpecError(
            SpecIssue("", "a spec file must be a mapping of sections", display, node.start_mark.line + 1)
        )
    _record_lines(node, (), display, origins)
    try:
        cfg = OmegaConf.create(text)  # OmegaConf's YAML rules (e.g. 1e-3 is a float)
    except yaml.YAMLError as e:  # what OmegaConf's loader alone refuses
        raise SpecError(_yaml_issue(e, display)) from None
    except OmegaConfBaseException as e:  # e.g. a malformed ${...}
        where = (
            tuple(str(getattr(e, "full_key", "") or "").split(".")) if getattr(e, "full_key", None) else ()
        )
        file, line = _origin_of(origins, where)
        msg = str(e).splitlines()[0]
        raise SpecError(SpecIssue(dotted(where), f"invalid value: {msg}", file, line)) from None
    return OmegaConf.to_container(cfg, resolve=False)


def _yaml_issue(e: yaml.YAMLError, display: str) -> SpecIssue:
    """Syntax errors name the line where the parser gave up and, for an unclosed bracket or
    quote, the line where it was opened (usually the one to fix)."""
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    hint = None
    if context is not None and mark is not None and context.line != mark.line:
        hint = f"{getattr(e, 'context', 'it')} at line {context.line + 1}"
    line = mark.line + 1 if mark else None
    return SpecIssue("", f"YAML syntax error: {getattr(e, 'problem', e)}", display, line, hint=hint)


def _record_lines(node: yaml.Node, path: tuple, file: str, origins: dict) -> None:
    origins[path] = (file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            origins[(*path, key.value)] = (file, key.start_mark.line + 1)
            _record_lines(value, (*path, key.value), file, origins)
            origins[(*path, key.value)] = (file, key.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, (*path, i), file, origins)


# --- extends ----------------------------------------------------------------------------------


def _load_chain(
    path: Path,
    origins: dict,
    stack: tuple[Path, ...],
    via: tuple[str | None, int | None] = (None, None),
    text: str | None = None,
    roots: tuple[Path, ...] | None = None,
) -> tuple[dict, list[str]]:
    """`via` is the file and line of the `extends:` that named `path`: errors about it point there.
    `text`: the content of `path` (top level only); `roots`: where extends may lead (load_spec)."""
    try:
        real = path.resolve()
    except (OSError, ValueError):  # a NUL byte in an extends path
        raise SpecError(SpecIssue("extends", "not a usable file name", *via)) from None
    if len(stack) >= MAX_EXTENDS:
        raise SpecError(SpecIssue("extends", f"a chain of more than {MAX_EXTENDS} extended files", *via))
    if real in stack:
        cycle = " -> ".join(str(p) for p in (*stack, real))
        raise SpecError(SpecIssue("extends", f"extends cycle: {cycle}", *via))
    if stack and roots is not None and not inside(path, roots):
        msg = "must name a spec file inside the spec roots (no absolute paths or '..' leading out)"
        raise SpecError(SpecIssue("extends", msg, *via))
    if text is None and not _is_file(real):
        where = f"extended by {stack[-1]}" if stack else "given on the command line"
        raise SpecError(SpecIssue("extends" if stack else "", f"spec file not found: {path} ({where})", *via))
    own: dict = {}
    data = _read_yaml(path, own, text)
    base_ref = data.pop("extends", None)
    if base_ref is None:
        origins.update(own)
        return data, [str(path)]
    if not isinstance(base_ref, str):
        file, line = own[("extends",)]
        raise SpecError(
            SpecIssue("extends", "must be a relative path to a base spec", file, line, base_ref, True)
        )
    base_path = Path(os.path.normpath(path.parent / base_ref))
    base, files = _load_chain(base_path, origins, (*stack, real), own[("extends",)], roots=roots)
    _drop_replaced(base, data, (), origins)
    origins.update({k: v for k, v in own.items() if k != ("extends",)})
    return _merge(base, data), [str(path), *files]


def _merge(base: dict, child: dict) -> dict:
    """Deep merge; lists and scalars are replaced. A mapping whose `kind` changes is replaced
    whole: the base's options belong to the other variant and would only be unknown keys."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        old = out.get(key)
        if _same_variant(old, value):
            out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _same_variant(old, new) -> bool:
    return (
        isinstance(old, dict)
        and isinstance(new, dict)
        and old.get("kind", new.get("kind")) == new.get("kind", old.get("kind"))
    )


def _drop_replaced(base: dict, child: dict, path: tuple, origins: dict) -> None:
    """Forget base origins of subtrees the child replaces, so errors point at the child."""
    for key, value in child.items():
        old = base.get(key)
        sub = (*path, key)
        if _same_variant(old, value):
            _drop_replaced(old, value, sub, origins)
        else:
            for k in [k for k in origins if k[: len(sub)] == sub]:
                del origins[k]


# --- --set overrides --------------------------------------------------------------------------


def _apply_override(data: dict, text: str, origins: dict) -> list[SpecIssue]:
    where = f"--set {text}"
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        return [SpecIssue("", "an override must look like dotted.key=value", where)]
    parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node[part] if _has(node, part) else None
        if child is None:
            allowed = fields_at(Spec, parts[:depth])
            if isinstance(part, str) and allowed and part not in allowed:
                hint = did_you_mean(part, allowed)
                return [SpecIssue(dotted(parts[: depth + 1]), "unknown key", where, hint=hint)]
            child = {}
            node[part] = child  # type: ignore[index]
        if not isinstance(child, dict | list):
            return [SpecIssue(dotted(parts[: depth + 1]), "is a value, not a section", where)]
        node = child
    value = _typed_value(parts, raw)
    last = parts[-1]
    if isinstance(node, list) and (not isinstance(last, int) or last >= len(node)):
        return [SpecIssue(dotted(parts), f"list index out of range (length {len(node)})", where)]
    node[last] = value  # type: ignore[index]
    for k in [k for k in origins if k[: len(parts)] == parts]:
        del origins[k]
    origins[parts] = (where, None)
    return []


def _has(node, part) -> bool:
    if isinstance(node, list):
        return isinstance(part, int) and part < len(node)
    return part in node


def _typed_value(parts: tuple, raw: str):
    """Parse with YAML rules, except where the schema wants a string (so `name=123` stays '123');
    `null` still unsets an optional string (`tracking.uri=null`)."""
    _, tp = walk(Spec, parts)
    try:
        _check_override_value(parts, raw)
        value = OmegaConf.to_container(OmegaConf.create(f"v: {raw}"))["v"]
    except (yaml.YAMLError, OmegaConfBaseException):
        return raw
    if tp is str and not (value is None and _nullable(parts)):
        return raw
    return value


def _check_override_value(parts: tuple, raw: str) -> None:
    """A --set value goes through the same limits as a file (it may come from a job submission)."""
    try:
        compose_checked(f"v: {raw}", "")
    except SpecError as e:
        where = f"--set {dotted(parts)}=" + (raw if len(raw) <= 40 else raw[:37] + "...")
        raise SpecError([SpecIssue(dotted(parts), i.message, where, hint=i.hint) for i in e.issues]) from None


def _nullable(parts: tuple) -> bool:
    _, parent = walk(Spec, parts[:-1])
    fields = parent.model_fields if isinstance(parent, type) and issubclass(parent, BaseModel) else {}
    field = fields.get(parts[-1])
    return field is not None and type(None) in typing.get_args(field.annotation)


# --- interpolation ----------------------------------------------------------------------------


def _resolve(data: dict, origins: dict) -> tuple[dict, list[SpecIssue]]:
    try:
        cfg = OmegaConf.create(data)
    except OmegaConfBaseException as e:
        return data, [SpecIssue("", f"invalid spec structure: {e}")]
    try:
        return OmegaConf.to_container(cfg, resolve=True), []
    except OmegaConfBaseException:
        pass
    issues = []
    for path in _leaf_paths(data):
        try:
            OmegaConf.select(cfg, dotted(path), throw_on_missing=True)
        except OmegaConfBaseException as e:
            file, line = _origin_of(origins, path)
            msg = str(e).splitlines()[0]
            issues.append(SpecIssue(dotted(path), f"bad interpolation: {msg}", file, line))
    return data, issues or [SpecIssue("", "interpolation failed")]


def _leaf_paths(node, path: tuple = ()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaf_paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaf_paths(v, (*path, i))
    else:
        yield path
