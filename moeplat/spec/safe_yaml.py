"""The one bounded YAML reader every spec, base spec, sweep file and `--set` value goes through.

A spec may come from someone else (a file shared on a cluster, text submitted to the job server),
so reading it must take bounded time and memory and fail with a SpecIssue naming the line, never
a traceback. Every limit is checked on yaml.compose's node graph BEFORE any Python object is built:
the composer shares the node of an anchor between its aliases, so a "billion laughs" document is a
small graph whose expanded size is counted here with memoisation, in milliseconds, while building
it (what OmegaConf and PyYAML's constructor do) would take minutes and gigabytes.

The limits are the constants below, and nowhere else: the CLI, the job server, its workers and the
web UI (a client of the server) all read specs through `read_spec_bytes` and `compose_checked`.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from moeplat.errors import SpecError, SpecIssue

MAX_SPEC_BYTES = 256 * 1024  # one spec or sweep file; the largest reference spec is ~3 KiB
MAX_DEPTH = 40  # nesting of mappings and lists, aliases expanded; a real spec needs about 6
MAX_NODES = 50_000  # YAML nodes once aliases are expanded; a real spec has a few hundred
MAX_INT_DIGITS = 1000  # Python refuses to convert ints of more than 4300 digits with a ValueError
MAX_EXTENDS = 16  # files in one `extends:` chain
MAX_RESOLVED = 200_000  # interpolated characters + nodes after ${...} (string "laughs": ${a}${a}...)

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _issue(display: str, message: str, mark=None, hint: str | None = None) -> SpecError:
    line = mark.line + 1 if mark is not None else None
    return SpecError(SpecIssue("", message, display, line, hint=hint))


def read_spec_bytes(path: Path, display: str | None = None) -> str:
    """The text of a spec file: at most MAX_SPEC_BYTES, strict UTF-8; SpecError naming the line."""
    display = display or str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # never more than the limit in memory
    except OSError as e:
        raise SpecError(SpecIssue("", f"cannot read spec file: {e.strerror}", display)) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(
            SpecIssue("", f"larger than the limit of {MAX_SPEC_BYTES} bytes for a spec file", display)
        )
    return decode(raw, display)


def decode(raw: bytes, display: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        msg = f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {col}"
        raise SpecError(
            SpecIssue("", msg, display, line, hint="save the file as UTF-8 (or remove that byte)")
        ) from None


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses, as it reads, deep nesting, too many nodes and an alias
    to an anchor that is still open (a recursive structure: `a: &x [*x]`)."""

    def __init__(self, stream: str, display: str):
        super().__init__(stream)
        self.display, self.depth, self.count, self.open_anchors = display, 0, 0, set()

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                msg = f"recursive alias *{event.anchor}: it refers to a mapping or list that contains it"
                raise _issue(
                    self.display, msg, event.start_mark, hint="aliases may only repeat finished values"
                )
            return super().compose_node(parent, index)
        self.count += 1
        if self.count > MAX_NODES:
            raise _issue(self.display, f"more than {MAX_NODES} YAML nodes", event.start_mark)
        nests = isinstance(event, yaml.CollectionStartEvent)
        self.depth += nests
        if self.depth > MAX_DEPTH:
            raise _issue(self.display, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= nests
            self.open_anchors.discard(event.anchor)


def compose_checked(text: str, display: str) -> yaml.Node | None:
    """Compose `text` and check every limit on the node graph; None for an empty document.
    YAML syntax errors are left to yaml.YAMLError (the loader words them with their line)."""
    if len(text) > MAX_SPEC_BYTES:  # text that did not come from a file (server, tests)
        raise SpecError(SpecIssue("", f"larger than the limit of {MAX_SPEC_BYTES} bytes", display))
    loader = _GuardedLoader(text, display)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    if node is not None:
        _Expanded(display).visit(node, 1)
    return node


class _Expanded:
    """Size and depth of the node graph with aliases expanded, memoised per node so that shared
    subtrees are counted once; duplicate and non-scalar keys, over-long integers."""

    def __init__(self, display: str):
        self.display = display
        self.memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded height)

    def visit(self, node: yaml.Node, depth: int) -> int:
        """Expanded node count under `node`, which sits at nesting `depth`; raises past a limit.
        Document order visits an anchor before its aliases (YAML allows no forward reference), so
        an alias is found memoised; the recursion is bounded by MAX_DEPTH whatever the graph."""
        too_deep = f"nested deeper than {MAX_DEPTH} levels once aliases are expanded"
        if depth > MAX_DEPTH and not isinstance(node, yaml.ScalarNode):
            raise _issue(self.display, too_deep, node.start_mark)
        if id(node) in self.memo:
            size, height = self.memo[id(node)]
        else:
            size, height = self._measure(node, depth)
            self.memo[id(node)] = (size, height)
        if depth + height - 1 > MAX_DEPTH:  # the deepest mapping or list under this node
            raise _issue(self.display, too_deep, node.start_mark)
        if size > MAX_NODES:
            msg = f"more than {MAX_NODES} YAML nodes once aliases are expanded"
            raise _issue(self.display, msg, node.start_mark, hint="a real spec has a few hundred")
        return size

    def _measure(self, node: yaml.Node, depth: int) -> tuple[int, int]:
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _INT_TAG and len(node.value) > MAX_INT_DIGITS:
                raise _issue(
                    self.display, f"a number with more than {MAX_INT_DIGITS} digits", node.start_mark
                )
            return 1, 0
        children = node.value if isinstance(node, yaml.SequenceNode) else [c for kv in node.value for c in kv]
        if isinstance(node, yaml.MappingNode):
            self._check_keys(node)
        size, height = 1, 0
        for child in children:
            size += self.visit(child, depth + 1)
            height = max(height, self.memo[id(child)][1])
            if size > MAX_NODES:
                break  # visit(node) reports it at this node's line
        return size, height + (not isinstance(node, yaml.ScalarNode))

    def _check_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[str, int] = {}
        for key, _ in node.value:
            if key.tag == _MERGE_TAG:  # `<<: *base`: its keys may be overridden, as YAML says
                continue
            if not isinstance(key, yaml.ScalarNode):
                raise _issue(
                    self.display, "a key must be a plain name, not a mapping or list", key.start_mark
                )
            if key.value in seen:
                msg = f"duplicate key '{key.value}' (first at line {seen[key.value]})"
                raise _issue(self.display, msg, key.start_mark, hint="keep one of them")
            seen[key.value] = key.start_mark.line + 1


_REF = re.compile(r"\$\{([^${}]*)\}")


def check_interpolation_size(data: dict, where) -> None:
    """Refuse a spec whose ${...} interpolations would expand past MAX_RESOLVED (characters of
    interpolated strings plus nodes), before OmegaConf expands them: `x1: "${x0}${x0}"` repeated is
    a billion laughs in strings, `b: [${a}, ${a}]` one in nodes. `where(path)` gives a key path's
    (file, line). Memoised per string, so it is linear in the spec; references it cannot follow
    (resolvers, relative paths) count as their own text."""
    memo: dict[tuple, int] = {}

    def lookup(path: tuple):
        node = data
        for part in path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def cost(value, path: tuple, hops: int) -> int:
        if isinstance(value, dict):
            return 1 + sum(cost(v, (*path, str(k)), hops) for k, v in value.items())
        if isinstance(value, list):
            return 1 + sum(cost(v, (*path, str(i)), hops) for i, v in enumerate(value))
        if not isinstance(value, str) or "${" not in value:
            return 1
        if hops > MAX_DEPTH:  # OmegaConf resolves a chain recursively: keep it far from the stack limit
            file, line = where(path)
            msg = f"a chain of more than {MAX_DEPTH} ${{...}} references"
            raise SpecError(SpecIssue(".".join(path), msg, file, line))
        if path not in memo:
            memo[path] = 1  # a cycle counts once; OmegaConf reports "recursive interpolation"
            total = len(_REF.sub("", value))
            for ref in _REF.findall(value):
                target = tuple(ref.strip().split(".")) if ":" not in ref else ()
                found = lookup(target) if target and target[0] else None
                total += len(ref) if found is None else cost(found, target, hops + 1)
            memo[path] = total
        return memo[path]

    if cost(data, (), 0) > MAX_RESOLVED:
        path = max(memo, key=memo.__getitem__)  # the value that expands the most
        file, line = where(path)
        msg = f"expands to more than {MAX_RESOLVED} characters or nodes once ${{...}} are resolved"
        raise SpecError(SpecIssue(".".join(path), msg, file, line, hint="interpolate less, or write it out"))
