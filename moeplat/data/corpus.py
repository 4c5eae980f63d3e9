"""Real text corpora as lists of named documents, and a leak-free train/val split.

A corpus is a list of `Document`s: whole files, never faked, never downloaded at run time. The
built-in corpus is the source of the running Python's standard library, which is on every machine
that can run this package, so a spec can train on real text with no setup. Names are stable
relative paths rather than absolute ones because the train/val split and the size cap hash the
names: the same files must split the same way on every machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import operator
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Directory names that hold the stdlib's own test suites (test/, tests/, idlelib/idle_test,
# lib2to3/tests, ctypes/test, tkinter/test, ...). Matched on any path component, so every
# package's test folder goes, not only the ones that exist in today's Python.
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_STDLIB_ALWAYS_SKIPPED = frozenset({"site-packages", "__pycache__"})
_by_name = operator.attrgetter("name")


class CapTooSmall(ValueError):
    """max_bytes is smaller than the first document it would keep."""


@dataclass(frozen=True)
class Document:
    """One file of a corpus: `name` is a stable relative path, `data` its raw bytes."""

    name: str
    data: bytes


def python_stdlib_documents(*, include_tests: bool = False, max_bytes: int | None = None) -> list[Document]:
    """The `.py` files of the running Python's standard library, sorted by name.

    Third-party packages (site-packages) are excluded so the corpus depends only on the Python
    version and build, not on what happens to be installed. `max_bytes` caps the total size; see
    `_cap_bytes` for why the cap picks documents by hash rather than by name.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = _STDLIB_ALWAYS_SKIPPED if include_tests else _STDLIB_ALWAYS_SKIPPED | _STDLIB_TEST_DIRS
    paths: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending at all (site-packages can be huge).
        dirnames[:] = [d for d in dirnames if d not in skipped]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(dirpath, filename)
                paths[path.relative_to(root).as_posix()] = path
    docs = _read_all(paths)
    if not docs:
        raise ValueError(f"found no readable .py files under the standard library directory {root}")
    return _cap_bytes(docs, max_bytes)


def text_file_documents(
    paths: list[str],
    *,
    patterns: Sequence[str] = ("*.txt", "*.md"),
    base_dir: str | None = None,
    max_bytes: int | None = None,
) -> list[Document]:
    """Documents from files and folders on disk, sorted by name.

    A folder is walked recursively and keeps the files whose base name matches one of `patterns`;
    a file named directly is always kept, since the user asked for it by name. A document's name
    is the path as given (relative paths stay relative to `base_dir`) joined with its path inside
    the folder, so names, and therefore the split, do not depend on where the data lies on disk.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    found: dict[str, Path] = {}
    seen_files: set[Path] = set()
    for given in paths:
        resolved = Path(given) if Path(given).is_absolute() else base / given
        if not resolved.exists():
            raise FileNotFoundError(
                f"corpus path {given!r} does not exist (looked for {resolved}); "
                "fix the path or the base directory it is resolved against"
            )
        prefix = Path(given).as_posix()
        for name, file in _expand(resolved, prefix, patterns):
            real = file.resolve()
            if real in seen_files:  # the same file reached through two arguments
                continue
            if name in found:
                raise ValueError(f"two different corpus files share the document name {name!r}")
            seen_files.add(real)
            found[name] = file
    docs = _read_all(found)
    if not docs:
        raise ValueError(
            f"no readable files in corpus paths {list(paths)} matched patterns {list(patterns)}; "
            "check the paths or widen the patterns"
        )
    return _cap_bytes(docs, max_bytes)


def split_documents(
    docs: Sequence[Document], *, val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split whole documents into (train, val), deterministically from `seed` and the names.

    Splitting by document, never inside one, keeps a file's text out of both sides; otherwise
    validation would partly measure memorisation of neighbouring lines. A document's side depends
    only on its own name, so adding files to a corpus never moves the files already in it.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    keyed = sorted(docs, key=lambda d: _split_key(seed, d.name))
    val = [d for d in keyed if _split_key(seed, d.name) / 2**160 < val_fraction]
    train = keyed[len(val) :]  # the val documents are exactly the smallest keys
    if len(keyed) >= 2:
        # Tiny corpora can land on one side by chance; an empty side would break training or
        # validation, so move the document nearest to the boundary.
        if not val:
            val, train = train[:1], train[1:]
        elif not train:
            val, train = val[:-1], val[-1:]
    return sorted(train, key=_by_name), sorted(val, key=_by_name)


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """A short sha256 of the documents' names and bytes, in order, to log with each run.

    Each field is length-prefixed so that moving bytes between a name and its data, or between two
    documents, changes the fingerprint.
    """
    h = hashlib.sha256()
    for doc in docs:
        name = doc.name.encode("utf-8")
        for field in (name, doc.data):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
    return h.hexdigest()[:16]


def _split_key(seed: int, name: str) -> int:
    return int(hashlib.sha1(f"{seed}:{name}".encode()).hexdigest(), 16)


def _cap_key(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def _expand(path: Path, prefix: str, patterns: Sequence[str]) -> Iterable[tuple[str, Path]]:
    if path.is_file():
        yield prefix, path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()  # walk order does not matter for the result, but keeps logs stable
        for filename in sorted(filenames):
            if any(fnmatch.fnmatch(filename, pattern) for pattern in patterns):
                file = Path(dirpath, filename)
                yield f"{prefix}/{file.relative_to(path).as_posix()}", file


def _read_all(paths: dict[str, Path]) -> list[Document]:
    docs = []
    for name in sorted(paths):
        try:
            data = paths[name].read_bytes()
        except OSError as err:  # e.g. a dangling symlink or a file without read permission
            log.warning("skipping unreadable corpus file %s: %s", paths[name], err)
            continue
        docs.append(Document(name=name, data=data))
    return docs


def _cap_bytes(docs: list[Document], max_bytes: int | None) -> list[Document]:
    """Keep documents, in sha1-of-name order, until the next one would pass `max_bytes`.

    Taking them in name order would fill a small cap with one package (all of `asyncio/`, say);
    hash order draws from the whole tree. Stopping at the first document that does not fit, rather
    than skipping it, makes the kept set a prefix of one fixed order, so a larger cap always keeps
    a superset of a smaller one.
    """
    if max_bytes is None:
        return docs
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    kept, total = [], 0
    for doc in sorted(docs, key=lambda d: _cap_key(d.name)):
        if total + len(doc.data) > max_bytes:
            break
        kept.append(doc)
        total += len(doc.data)
    if not kept:
        first = min(docs, key=lambda d: _cap_key(d.name))
        raise CapTooSmall(
            f"max_bytes={max_bytes} keeps no documents: the first one drawn, {first.name!r}, "
            f"has {len(first.data)} bytes; raise max_bytes"
        )
    return sorted(kept, key=_by_name)
