"""The on-disk format of a prepared corpus, and a dataset that reads it through `np.memmap`.

A prepared directory (`moeplat data prepare`, moeplat.data.prepare) holds, per source and split:

    manifest.json                              what is complete, and the fingerprints
    <source>/<split>/<k>.tokens                raw token ids, dtype from the vocabulary size
    <source>/<split>/<k>.index                 uint64 document start offsets into .tokens, + the end
    <source>/<split>/<k>.counts                int64 token counts (vocab_size), for the unigram baseline

The split's stream is its shards concatenated in order; it equals what the in-memory path packs
(documents joined by the tokenizer's separator), so a prepared run trains on the same blocks.

Atomicity: each file is written to `*.tmp`, fsynced and renamed; a shard counts as complete only
once the manifest (itself replaced atomically) lists it. A crash leaves at worst `*.tmp` files or
shard files the manifest does not list, which the next prepare removes and writes again; a reader
never trusts a file the manifest does not list, and refuses a manifest that is not `complete`.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids < vocab_size: uint8 for bytes, uint16 up to 65,536
    (GPT-2's 50,257 and most BPE vocabularies), else uint32. Half or a quarter of int64's disk
    and page cache, and the memmap is read as is, widened per block only."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32")


def atomic_write(path: Path, write: Callable[[object], None], *, sync_dir: bool = True) -> None:
    """`write(f)` into `path.tmp`, fsync, rename over `path`, fsync the directory: after a crash,
    `path` is either absent, its old content or the whole new content. `sync_dir=False` leaves the
    directory's fsync to a later write into the same directory (the rename is then durable with it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if not sync_dir:
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Shard:
    """One complete shard as the manifest lists it; `stem` is relative to the directory."""

    stem: str
    tokens: int
    documents: int
    text_bytes: int  # UTF-8 bytes of the documents' text, for bits per byte

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def write_shard(
    root: Path, stem: str, docs_tokens: Sequence[np.ndarray], dtype, vocab_size: int, text_bytes: int
) -> Shard:
    """The documents' tokens, back to back, as one shard (three files, each written atomically)."""
    lengths = np.fromiter((len(t) for t in docs_tokens), dtype=np.uint64, count=len(docs_tokens))
    offsets = np.zeros(len(docs_tokens) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(docs_tokens).astype(dtype, copy=False) if docs_tokens else np.zeros(0, dtype)
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.int64)
    if counts.size > vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}")
    base = root / stem
    # the shard counts only once the manifest lists it, so its three renames share one directory fsync
    atomic_write(base.with_suffix(".tokens"), lambda f: f.write(tokens.data), sync_dir=False)
    atomic_write(base.with_suffix(".index"), lambda f: f.write(offsets.data), sync_dir=False)
    atomic_write(base.with_suffix(".counts"), lambda f: f.write(counts.data))
    return Shard(stem=stem, tokens=int(tokens.size), documents=len(docs_tokens), text_bytes=int(text_bytes))


def shard_files(stem: str) -> list[str]:
    return [f"{stem}.tokens", f"{stem}.index", f"{stem}.counts"]


def shard_intact(root: Path, shard: Shard, dtype) -> bool:
    """The shard's files exist with the sizes the manifest entry implies."""
    sizes = (shard.tokens * np.dtype(dtype).itemsize, (shard.documents + 1) * 8, None)
    for name, size in zip(shard_files(shard.stem), sizes, strict=True):
        path = root / name
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
    return True


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path}: prepared-corpus format {manifest.get('format')!r}, this moeplat reads {FORMAT}; "
            "prepare it again"
        )
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(Path(root) / MANIFEST, lambda f: f.write(text))


@dataclass(frozen=True)
class PreparedSplit:
    """One source's split of a complete prepared directory: its shards in stream order."""

    root: Path
    source: str
    split: str
    dtype: np.dtype
    vocab_size: int
    shards: tuple[Shard, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def text_bytes(self) -> int:
        return sum(s.text_bytes for s in self.shards)

    def token_paths(self) -> list[Path]:
        return [self.root / f"{s.stem}.tokens" for s in self.shards]

    def counts(self) -> np.ndarray:
        """Token counts over the split, summed from the shards' count files (no token is read)."""
        total = np.zeros(self.vocab_size, dtype=np.int64)
        for s in self.shards:
            total += np.fromfile(self.root / f"{s.stem}.counts", dtype=np.int64)
        return total

    def stream(self) -> np.ndarray:
        """The whole split in memory (tests and small corpora only)."""
        parts = [np.fromfile(p, dtype=self.dtype) for p in self.token_paths()]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


def open_prepared(root: str | Path) -> tuple[dict, dict[str, dict[str, PreparedSplit]]]:
    """(manifest, {source: {split: PreparedSplit}}) of a complete prepared directory.

    Raises FileNotFoundError / ValueError with what to do: no manifest, an unfinished prepare,
    a shard whose files are missing or have the wrong size."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(
            f"{root} holds no {MANIFEST}: it is not a prepared corpus; make one with `moeplat data prepare`"
        )
    if not manifest.get("complete"):
        raise ValueError(
            f"{root} is an unfinished prepare (the manifest is not complete); run `moeplat data prepare` "
            "again to finish it"
        )
    dtype = np.dtype(manifest["dtype"])
    out: dict[str, dict[str, PreparedSplit]] = {}
    for source, entry in manifest["sources"].items():
        out[source] = {}
        for split in SPLITS:
            shards = tuple(Shard(**s) for s in entry["shards"][split])
            for s in shards:
                if not shard_intact(root, s, dtype):
                    raise ValueError(
                        f"{root}: shard {s.stem} is missing or truncated; run `moeplat data prepare` again"
                    )
            out[source][split] = PreparedSplit(root, source, split, dtype, manifest["vocab_size"], shards)
    return manifest, out


# A page fault maps the whole page-cache folio around the page (up to a PMD, 2 MiB on x86-64, on
# kernels with large folios), and mapped page cache counts as resident memory: reading one block of
# 129 tokens could add 2 MiB to RSS, and a run's RSS would grow with the blocks it has read.
_WINDOW = 2 * 2**20


def _unmap(m: np.ndarray, lo: int, hi: int) -> None:
    """Drop the page-table entries of the folio-sized windows around bytes [lo, hi) of a read-only
    file mapping (MADV_DONTNEED: the pages stay in the page cache, only our mapping of them goes),
    so resident memory stays flat however much of the corpus a run reads."""
    mm = getattr(m, "_mmap", None)
    if mm is None:
        return
    a = lo // _WINDOW * _WINDOW
    b = min(-(-hi // _WINDOW) * _WINDOW, len(mm))
    mm.madvise(mmap.MADV_DONTNEED, a, b - a)


class MemmapSequences:
    """`PackedSequences` over shard files read through `np.memmap`: blocks of seq_len + 1 tokens
    of the shards' concatenated stream, item i = (x, y) with y = x shifted by one.

    Nothing but the block asked for is read, so resident memory does not grow with the corpus
    (the page cache holds what was touched, and the kernel can drop it). The blocks are those
    PackedSequences cuts from the same stream in memory (tested against it); a block may straddle
    two shards. Memmaps are opened on first use in each process and not pickled, so DataLoader
    workers open their own instead of receiving a copy of the data.
    """

    ordered = False  # a training loader shuffles it (LMDataModule), unlike a mixture's blend

    def __init__(
        self, paths: Sequence[str | Path], dtype, seq_len: int, *, sizes: Sequence[int] | None = None
    ):
        import torch  # noqa: F401  (items are tensors; imported here to keep `prepare` torch-free)

        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.paths = [str(p) for p in paths]
        self.dtype = np.dtype(dtype)
        if sizes is None:
            sizes = [os.path.getsize(p) // self.dtype.itemsize for p in self.paths]
        self.starts = np.zeros(len(self.paths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(sizes, dtype=np.int64), out=self.starts[1:])
        self.seq_len = seq_len
        self.num_tokens = int(self.starts[-1])
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"{self.num_tokens} tokens are fewer than one block of seq_len + 1 = {seq_len + 1}; "
                "use more text or a shorter seq_len"
            )
        self.num_blocks = self.num_tokens // (seq_len + 1)
        self._maps: list[np.memmap | None] = [None] * len(self.paths)

    def __getstate__(self):
        return {**self.__dict__, "_maps": [None] * len(self.paths)}

    def __len__(self) -> int:
        return self.num_blocks

    def _map(self, k: int) -> np.ndarray:
        m = self._maps[k]
        if m is None:
            size = int(self.starts[k + 1] - self.starts[k])
            m = np.zeros(0, self.dtype)
            if size:
                m = np.memmap(self.paths[k], dtype=self.dtype, mode="r", shape=(size,))
                m._mmap.madvise(mmap.MADV_RANDOM)  # blocks are read at random: no read-ahead
            self._maps[k] = m
        return m

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream, as int64 (a copy)."""
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - int(self.starts[k])
            take = min(stop, int(self.starts[k + 1])) - pos
            m = self._map(k)
            out[pos - start : pos - start + take] = m[lo : lo + take]
            _unmap(m, lo * self.dtype.itemsize, (lo + take) * self.dtype.itemsize)
            pos += take
            k += 1
        return out

    def __getitem__(self, i: int):
        import torch

        if not -self.num_blocks <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for {self.num_blocks} blocks")
        i %= self.num_blocks
        block = torch.from_numpy(self.read(i * (self.seq_len + 1), (i + 1) * (self.seq_len + 1)))
        return block[:-1], block[1:]
