"""The bounded YAML reader at its limits: exactly at a limit is read, one past it is refused."""

from __future__ import annotations

import pytest

from moeplat.errors import SpecError
from moeplat.spec.safe_yaml import MAX_DEPTH, MAX_INT_DIGITS, MAX_NODES, MAX_SPEC_BYTES, compose_checked


def _refused(text: str) -> str:
    with pytest.raises(SpecError) as info:
        compose_checked(text, "f.yaml")
    (issue,) = info.value.issues
    return issue.format()


def _nested(levels: int) -> str:
    """A mapping holding `levels - 1` nested lists: `levels` levels of nesting in all."""
    return "x: " + "[" * (levels - 1) + "1" + "]" * (levels - 1) + "\n"


def test_nesting_up_to_the_limit_is_read():
    compose_checked(_nested(MAX_DEPTH), "f.yaml")
    assert _refused(_nested(MAX_DEPTH + 1)) == f"f.yaml:1: nested deeper than {MAX_DEPTH} levels"


def test_nesting_through_aliases_counts_expanded():
    inner = "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2)  # with its mapping: MAX_DEPTH - 1 levels
    compose_checked(f"a: &a {inner}\nb: [*a]\n", "f.yaml")  # MAX_DEPTH levels under b
    assert "once aliases are expanded" in _refused(f"a: &a {inner}\nb: [[*a]]\n")


def _items(n: int) -> str:
    return "x: [" + ", ".join(["1"] * n) + "]\n"  # the mapping, its key, the list and n items


def test_nodes_up_to_the_limit_are_read():
    compose_checked(_items(MAX_NODES - 3), "f.yaml")
    assert f"more than {MAX_NODES} YAML nodes" in _refused(_items(MAX_NODES - 2))


def _shared(m: int) -> str:
    """a: 100 nodes; b: a list of m aliases to it: 104 + 100 m nodes expanded, ~3 m + 300 bytes."""
    return "a: &a [" + ", ".join(["1"] * 99) + "]\nb: [" + ", ".join(["*a"] * m) + "]\n"


def test_aliases_count_as_often_as_they_are_used():
    assert 104 + 100 * 498 <= MAX_NODES < 104 + 100 * 499
    compose_checked(_shared(498), "f.yaml")
    assert _refused(_shared(499)) == (  # the smallest part past the limit: here the whole document
        f"f.yaml:1: more than {MAX_NODES} YAML nodes once aliases are expanded; a real spec has a few hundred"
    )


def test_integers_up_to_the_limit_are_read():
    compose_checked(f"x: {'9' * MAX_INT_DIGITS}\n", "f.yaml")
    assert (
        _refused(f"x: {'9' * (MAX_INT_DIGITS + 1)}\n")
        == f"f.yaml:1: a number with more than {MAX_INT_DIGITS} digits"
    )
    compose_checked(f"x: '{'9' * (MAX_INT_DIGITS + 1)}'\n", "f.yaml")  # a string of digits is no number


def test_text_up_to_the_limit_is_read():
    compose_checked("x: 1\n#" + "." * (MAX_SPEC_BYTES - 7) + "\n", "f.yaml")
    assert "larger than the limit" in _refused("x: 1\n#" + "." * (MAX_SPEC_BYTES - 6) + "\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "f.yaml:1: recursive alias *a"),
        ("a: &a {b: [1, {c: *a}]}\n", "f.yaml:1: recursive alias *a"),
        ("a: 1\nb: 2\na: 3\n", "f.yaml:3: duplicate key 'a' (first at line 1)"),
        ("? [a]\n: 1\n", "f.yaml:1: a key must be a plain name"),
    ],
)
def test_shapes_no_spec_has(text, message):
    assert _refused(text).startswith(message)


def test_merge_keys_may_repeat_what_they_merge():
    compose_checked("base: &b {x: 1}\nchild:\n  <<: *b\n  x: 2\n", "f.yaml")
