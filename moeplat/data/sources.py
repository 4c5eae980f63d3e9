"""Documents from the sources a spec names beyond the standard library: Python's documentation
(English prose that Debian's python3.11-doc ships) and whatever `datasets.load_dataset` reads.

Every reader returns `Document`s with stable names, because the document-level train/validation
split (moeplat.data.corpus.split_documents) hashes the names: a row of a dataset file is named
`<file as given>:<row>`, so the same files split the same way on every machine and adding a file
never moves the rows of the others. Errors are `SourceError`s that carry the spec field to blame
(relative to the source), which moeplat.compile.data turns into a SpecError.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from moeplat.data.corpus import Document, _cap_bytes, _read_all

log = logging.getLogger(__name__)

# Where Debian's python3.11-doc puts the reStructuredText sources of docs.python.org (shipped as
# html/_sources/**/*.rst.txt). MOEPLAT_PYTHON_DOCS points elsewhere (another Python's docs).
PYTHON_DOCS_DIR = "/usr/share/doc/python3.11/html/_sources"
PYTHON_DOCS_HOW = "run scripts/system-deps.sh or apt-get install python3.11-doc"

# load_dataset builders that read files named by data_files (anything else is a Hub name or a
# local dataset directory/script).
FILE_BUILDERS = frozenset({"json", "parquet", "csv", "text", "arrow"})


class SourceError(ValueError):
    """A source cannot be read as the spec describes; `field` is the key to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def python_docs_dir() -> Path:
    return Path(os.environ.get("MOEPLAT_PYTHON_DOCS", PYTHON_DOCS_DIR))


def python_docs_documents(*, max_bytes: int | None = None) -> list[Document]:
    """The reST sources of the Python documentation (tutorial, library reference, HOWTOs...),
    named by their path under html/_sources. Prose next to the stdlib's code: a second domain."""
    root = python_docs_dir()
    if not root.is_dir():
        raise SourceError(
            "kind",
            f"the python_docs corpus needs Debian's python3.11-doc package, and {root} does not exist; "
            f"{PYTHON_DOCS_HOW}",
        )
    paths = {p.relative_to(root).as_posix(): p for p in root.rglob("*.txt") if p.is_file()}
    docs = _read_all(paths)
    if not docs:
        raise SourceError("kind", f"found no .txt files under {root}; {PYTHON_DOCS_HOW}")
    return _cap_bytes(docs, max_bytes)


def hf_dataset_documents(
    *,
    path: str,
    name: str | None = None,
    data_files: Sequence[str] | None = None,
    split: str = "train",
    text_fields: Sequence[str] = ("text",),
    separator: str = "\n\n",
    streaming: bool = False,
    storage_options: dict | None = None,
    max_bytes: int | None = None,
    base_dir: str = ".",
) -> list[Document]:
    """One document per row of `load_dataset(path, name, data_files=..., split=split)`.

    With data_files, each file (globs expanded, in sorted order) is loaded on its own so that a
    row's name can say which file it came from. `max_bytes` stops reading at the first row that
    would pass it (a prefix in file order: a streamed dataset is never read further than needed).
    """
    if path in FILE_BUILDERS:
        if not data_files:
            raise SourceError("data_files", f"the {path!r} builder reads files: list them in data_files")
        sources = [(shown, [url]) for shown, url in _expand_data_files(data_files, base_dir, storage_options)]
    else:
        # a Hub name, or a local dataset folder (relative to the spec file, like data_files)
        shown = "/".join(p for p in (path, name, split) if p)
        files = (
            [url for _, url in _expand_data_files(data_files, base_dir, storage_options)]
            if data_files
            else None
        )
        sources = [(shown, files)]
        local = os.path.join(base_dir, path)
        if "://" not in path and not os.path.isabs(path) and os.path.isdir(local):
            path = local
    docs: list[Document] = []
    total = 0
    for shown, files in sources:
        rows = _load_rows(path, name, files, split, streaming, storage_options)
        for i, row in enumerate(rows):
            data = _row_text(row, text_fields, separator, shown).encode("utf-8")
            if max_bytes is not None and total + len(data) > max_bytes:
                if not docs:
                    raise SourceError(
                        "max_bytes", f"max_bytes={max_bytes} keeps no rows: the first has {len(data)} bytes"
                    )
                return docs
            docs.append(Document(name=f"{shown}:{i}", data=data))
            total += len(data)
    if not docs:
        raise SourceError("split", f"split {split!r} of {path!r} has no rows; point the source at data")
    return docs


def _expand_data_files(
    data_files: Sequence[str], base_dir: str, storage_options: dict | None
) -> list[tuple[str, str]]:
    """(name shown in document names, path or URL to read) per file, globs expanded and sorted.
    Relative local paths resolve against `base_dir` (the spec file's directory); URLs (s3://...)
    are globbed through fsspec with `storage_options`."""
    found: list[tuple[str, str]] = []
    for given in data_files:
        if "://" in given:
            import fsspec  # lazy: only remote data needs it

            try:
                fs, _, _ = fsspec.get_fs_token_paths(given, storage_options=storage_options or {})
                matches = sorted(fs.glob(given)) if glob.has_magic(given) else [given]
                matches = [m for m in matches if fs.isfile(m)]
            except Exception as err:  # botocore, aiohttp...: name the URL rather than a traceback
                raise SourceError(
                    "data_files",
                    f"cannot list {given!r}: {err}; check the URL, credentials and storage_options",
                ) from None
            protocol = given.split("://", 1)[0]
            urls = [m if "://" in m else f"{protocol}://{m}" for m in matches]
            found += [(u, u) for u in urls]
            if not urls:
                raise SourceError("data_files", f"{given!r} matched no files")
            continue
        resolved = given if os.path.isabs(given) else os.path.join(base_dir, given)
        matches = sorted(glob.glob(resolved, recursive=True)) if glob.has_magic(given) else [resolved]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise SourceError(
                "data_files",
                f"{given!r} matched no files (looked for {resolved}); fix the path, which is relative to "
                "the spec file's directory",
            )
        for m in matches:
            shown = given if not glob.has_magic(given) else _shown(given, resolved, m)
            found.append((shown, m))
    return found


def _shown(given: str, resolved: str, match: str) -> str:
    """A glob match named relative to where the pattern was given (not where the disk holds it)."""
    anchor = resolved[: len(resolved) - len(given)] if resolved.endswith(given) else ""
    return match[len(anchor) :] if anchor and match.startswith(anchor) else match


def _load_rows(path, name, files, split, streaming, storage_options) -> Iterable[dict]:
    try:
        import datasets  # lazy: seconds to import, and only this source needs it

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        kwargs = {"name": name, "split": split, "streaming": streaming}
        if files is not None:
            kwargs["data_files"] = files
        if storage_options:
            kwargs["storage_options"] = storage_options
        ds = datasets.load_dataset(path, **kwargs)
    except (ValueError, KeyError) as err:
        if "split" in str(err).lower() or "Unknown split" in str(err):
            raise SourceError("split", f"cannot read split {split!r} of {path!r}: {err}") from None
        raise SourceError("path", f"load_dataset({path!r}) failed: {err}") from None
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise SourceError(
            "path",
            f"cannot load dataset {path!r}: {err}. A Hub dataset needs the network or a copy in the local "
            f"Hugging Face cache ({_hf_cache()}); for local files use a builder (json, parquet, csv, text) "
            "with data_files",
        ) from None
    except Exception as err:  # the Hub client's own errors (DatasetNotFoundError, offline mode...)
        raise SourceError("path", f"cannot load dataset {path!r}: {type(err).__name__}: {err}") from None
    return _checked_rows(ds)


def _checked_rows(ds) -> Iterator[dict]:
    try:
        yield from ds
    except Exception as err:  # a malformed file shows up when its rows are read (streaming)
        raise SourceError("data_files", f"cannot read rows: {type(err).__name__}: {err}") from None


def _row_text(row: dict, fields: Sequence[str], separator: str, shown: str) -> str:
    missing = [f for f in fields if f not in row]
    if missing:
        key = "text_field" if len(fields) == 1 else "text_fields"
        raise SourceError(
            key,
            f"{shown} has no column {missing[0]!r}; its columns are {sorted(row)}; set {key} to one of them",
        )
    parts = [row[f] for f in fields]
    return separator.join("" if p is None else p if isinstance(p, str) else str(p) for p in parts)


def _hf_cache() -> str:
    return os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "datasets"
    )
