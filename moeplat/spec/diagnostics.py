"""Turn Pydantic validation errors into SpecIssues: dotted path, file:line, value, did-you-mean.

Pydantic reports locations as tuples that include discriminator tags, e.g.
('model', 'moe', 'router', 'topk', 'normalise'). We walk the spec types alongside the tuple so
that tags are dropped from the user-facing path and unknown keys can be matched against the
fields that really exist at that place.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable

from pydantic import BaseModel, ValidationError

from moeplat.errors import SpecIssue

Origin = Callable[[tuple], tuple[str | None, int | None]]


def _strip(tp):
    """Peel Annotated / Optional down to a model class, or a tuple of members for a discriminated union."""
    discriminated = False
    while typing.get_origin(tp) is typing.Annotated:
        args = typing.get_args(tp)
        discriminated |= any(getattr(m, "discriminator", None) for m in args[1:])
        tp = args[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _strip(members[0])
        return tuple(_strip(m) for m in members)
    return (tp,) if discriminated else tp


def _field_type(field):
    """Pydantic moves `Annotated[..., Field(discriminator=...)]` into FieldInfo; put it back."""
    if field.discriminator and not isinstance(_strip(field.annotation), tuple):
        return (_strip(field.annotation),)
    return field.annotation


def _union_member(members: tuple, tag: str):
    for m in members:
        if isinstance(m, type) and issubclass(m, BaseModel):
            kind = m.model_fields.get("kind")
            if kind is not None and tag in typing.get_args(kind.annotation):
                return m
    return None


def _is_list(tp) -> bool:
    return typing.get_origin(tp) is list


def _is_member_tag(members: tuple, part: str) -> bool:
    """Pydantic names the member of a plain (not discriminated) union of scalars and lists in the
    location, e.g. ('top_k', 'constrained-int') or ('top_k', 'list[constrained-int]', 0)."""
    no_models = not any(isinstance(m, type) and issubclass(m, BaseModel) for m in members)
    scalar_tag = part.startswith(("constrained-", "literal[")) or part in {"int", "float", "str", "bool"}
    return no_models and (any(_is_list(m) for m in members) or scalar_tag)


def _off_member(root: type[BaseModel], e: dict) -> bool:
    """An error of the scalar-or-list union member that the input's shape did not choose (a list
    gets the list member's errors only, a scalar the scalar member's): Pydantic reports both."""
    loc = tuple(e["loc"])
    for i in range(1, len(loc)):
        part = loc[i]
        if (
            isinstance(part, str)
            and isinstance(tp := walk(root, loc[:i])[1], tuple)
            and _is_member_tag(tp, part)
        ):
            if part.startswith("literal["):  # `int | Literal["all"]` given a number: the number's errors
                return not isinstance(e["input"], str)
            if part.startswith("list["):  # the list member: off when the whole input is no list
                return len(loc) == i + 1 and not isinstance(e["input"], list)
            return isinstance(e["input"], list)  # the scalar member, given a list
    return False


def walk(root: type[BaseModel], loc: tuple) -> tuple[tuple, object]:
    """Return (user path without tags, the type found at the end of loc; None if unknown)."""
    path: list = []
    tp: object = root
    for part in loc:
        tp = _strip(tp)
        if isinstance(tp, tuple):  # a union
            member = _union_member(tp, part) if isinstance(part, str) else None
            if member is not None:  # Pydantic locations name the variant by its tag
                tp = member
                continue
            if isinstance(part, str) and _is_member_tag(tp, part):  # `int | list[int]` fields
                tp = next((m for m in tp if _is_list(m) == part.startswith("list[")), None)
                continue
            # user paths (--set, sweeps) name a field of one of the variants directly
            tp = next(
                (
                    m
                    for m in tp
                    if isinstance(m, type) and issubclass(m, BaseModel) and part in m.model_fields
                ),
                None,
            )
        if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
            field = tp.model_fields.get(part)
            tp = None if field is None else _field_type(field)
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (list, tuple) and isinstance(part, int):
            args = typing.get_args(tp)
            tp = (
                args[part]
                if typing.get_origin(tp) is tuple and part < len(args)
                else (args[0] if args else None)
            )
        else:
            tp = None
        path.append(part)
    return tuple(path), _strip(tp) if tp is not None and not isinstance(tp, tuple) else tp


def fields_at(root: type[BaseModel], path: tuple) -> list[str]:
    """Names a mapping at `path` may hold (for did-you-mean)."""
    _, tp = walk(root, path)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    if isinstance(tp, tuple):
        return sorted(
            {f for m in tp if isinstance(m, type) and issubclass(m, BaseModel) for f in m.model_fields}
        )
    return []


# Keys an older spec version had, with what replaced them: the hint an old spec gets.
REPLACED_KEYS = {
    "train.val_batches": "train.val_batches was replaced by data.val_tokens: validation is a fixed amount "
    "of text per source (a number of tokens, rounded down to whole sequences, or all), the same for every "
    "batch size and device count; delete train.val_batches and set data.val_tokens (e.g. 32768)",
}


def did_you_mean(word: str, choices: list[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def issues_from_validation(root: type[BaseModel], err: ValidationError, origin: Origin) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    for e in err.errors(include_url=False):
        if _off_member(root, e):
            continue
        path, _ = walk(root, tuple(e["loc"]))
        etype = e["type"]
        if etype == "cross_field":
            for rel, msg in e["ctx"]["problems"]:
                full = path + tuple(int(p) if p.isdigit() else p for p in rel.split("."))
                file, line = origin(full)
                issues.append(SpecIssue(dotted(full), msg, file, line))
            continue
        file, line = origin(path)
        value, has_value, hint = e.get("input"), True, None
        msg = e["msg"]
        if etype == "extra_forbidden":
            msg, has_value = "unknown key", False
            allowed = fields_at(root, tuple(e["loc"])[:-1])
            hint = (
                REPLACED_KEYS.get(dotted(path))
                or did_you_mean(str(path[-1]), allowed)
                or (f"allowed: {', '.join(allowed)}" if allowed else None)
            )
        elif etype == "missing":
            msg, has_value = "required key is missing", False
        elif etype == "union_tag_invalid":
            tags = e["ctx"]["expected_tags"]
            msg, value = f"unknown kind; expected one of {tags}", e["ctx"]["tag"]
            hint = did_you_mean(str(value), [t.strip(" '") for t in tags.split(",")])
            path = (*path, "kind")
            file, line = origin(path)
        elif etype == "union_tag_not_found":
            msg, has_value = "needs a 'kind' key choosing the variant", False
            hint = f"expected one of {_tags_at(root, tuple(e['loc']))}"
            if typo := _kind_typo(root, tuple(e["loc"]), e.get("input")):  # `{kidn: all}`
                path, msg = (*path, typo), "unknown key"
                hint = (
                    f"did you mean 'kind'? It chooses the variant, one of {_tags_at(root, tuple(e['loc']))}"
                )
                file, line = origin(path)
        elif isinstance(value, dict | list):
            has_value = False
        issues.append(SpecIssue(dotted(path), msg, file, line, value, has_value, hint))
    # In file order, so a user can fix them top to bottom; --set overrides last.
    return sorted(issues, key=lambda i: (i.line is None, i.file or "", i.line or 0))


def _kind_typo(root: type[BaseModel], loc: tuple, given) -> str | None:
    """The key the user most likely meant as `kind`: an unknown key close to it."""
    if not isinstance(given, dict):
        return None
    known = set(fields_at(root, loc))
    unknown = [k for k in given if isinstance(k, str) and k not in known]
    close = difflib.get_close_matches("kind", unknown, n=1, cutoff=0.6)
    return close[0] if close else None


def _tags_at(root: type[BaseModel], loc: tuple) -> str:
    _, tp = walk(root, loc)
    members = tp if isinstance(tp, tuple) else (tp,)
    tags = [
        t
        for m in members
        if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields
        for t in typing.get_args(m.model_fields["kind"].annotation)
    ]
    return ", ".join(repr(t) for t in tags) or "?"
