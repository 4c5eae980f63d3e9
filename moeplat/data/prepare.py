"""Tokenize a corpus once, in parallel, into memory-mapped token shards (moeplat.data.shards).

Work is cut into shards of consecutive documents (`shard_bytes` of text each, a fixed function of
the documents, so an interrupted prepare cuts the same shards when it resumes) and handed to a
pool of worker processes; each encodes its documents with the tokenizer's batch encoder (one
thread per worker: N workers use N cores) and writes its shard's files atomically. The parent
records each finished shard in the manifest (replaced atomically), so a prepare killed at any
moment resumes with the shards the manifest lists and redoes only the rest.

The directory's fingerprint is two hashes: the sources (names, bytes and the split settings) and
the tokenizer. A prepare into a directory made from other sources or another tokenizer starts
over and says which of the two changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeplat.data.corpus import Document, corpus_fingerprint
from moeplat.data.shards import (
    FORMAT,
    MANIFEST,
    Shard,
    read_manifest,
    shard_files,
    shard_intact,
    token_dtype,
    write_manifest,
    write_shard,
)

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 16 * 2**20


@dataclass(frozen=True)
class SourceSplits:
    """One source's documents, already split; `name` is its sub-directory."""

    name: str
    train: Sequence[Document]
    val: Sequence[Document]


@dataclass
class PrepareResult:
    path: Path
    action: str  # "reused" | "prepared" | "resumed" | "re-prepared"
    reason: str  # why, in words: "fingerprint matches", "sources changed", ...
    shards_written: int = 0
    tokens_written: int = 0
    seconds: float = 0.0
    manifest: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


# --- the tokenizer as prepare sees it ---------------------------------------------------------


def tokenizer_fingerprint(tok) -> str:
    """What identifies the ids a tokenizer produces (moeplat.data.tokenizers' `Tok.fingerprint`)."""
    return str(tok.fingerprint)


def separator_ids(tok) -> np.ndarray:
    """Ids packed between neighbouring documents, as `tok.encode_documents` packs them: the byte
    tokenizer's separator bytes, otherwise the EOS token."""
    if getattr(tok, "kind", None) == "byte":
        return np.frombuffer(tok.separator, dtype=np.uint8).astype(np.int64)
    return np.asarray([tok.eos_id], dtype=np.int64)


def encode_batch(tok, texts: Sequence[bytes]) -> list[np.ndarray]:
    """Ids of each document: its bytes as they are for the byte tokenizer (no decoding, as the
    in-memory path); otherwise the tokenizer's batch encoder (`tokenizers`, in Rust) on the text
    decoded with U+FFFD for invalid UTF-8, as `Tok.encode_documents` does."""
    if getattr(tok, "kind", None) == "byte":
        return [np.frombuffer(t, dtype=np.uint8) for t in texts]
    return tok.encode_texts([t.decode("utf-8", errors="replace") for t in texts])


# --- work units -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    stem: str  # <source>/<split>/<k>
    first: int  # index of the shard's first document in its split
    docs: tuple[bytes, ...]


def _cut(name: str, split: str, docs: Sequence[Document], shard_bytes: int) -> list[tuple[str, int, int]]:
    """(stem, first, stop) document ranges of about `shard_bytes` each, in order."""
    out, first, size = [], 0, 0
    for i, d in enumerate(docs):
        size += len(d.data)
        if size >= shard_bytes:
            out.append((f"{name}/{split}/{len(out):05d}", first, i + 1))
            first, size = i + 1, 0
    if first < len(docs) or not out:
        out.append((f"{name}/{split}/{len(out):05d}", first, len(docs)))
    return out


_WORKER: dict = {}


def _init_worker(tok, sep: np.ndarray, root: str, dtype: str, vocab_size: int) -> None:
    # One thread per worker: the pool, not the tokenizer, spreads the work over the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tok=tok, sep=sep, root=Path(root), dtype=np.dtype(dtype), vocab_size=vocab_size)


def _run_task(task: _Task) -> Shard:
    w = _WORKER
    ids = encode_batch(w["tok"], task.docs)
    records = [np.concatenate([w["sep"], d]) if task.first + j > 0 else d for j, d in enumerate(ids)]
    text_bytes = sum(len(d) for d in task.docs)
    return write_shard(w["root"], task.stem, records, w["dtype"], w["vocab_size"], text_bytes)


# --- prepare ----------------------------------------------------------------------------------


def sources_fingerprint(sources: Sequence[SourceSplits], split_settings: dict) -> str:
    h = hashlib.sha256(repr(sorted(split_settings.items())).encode())
    for s in sources:
        h.update(f"{s.name}:{corpus_fingerprint(s.train)}:{corpus_fingerprint(s.val)}".encode())
    return h.hexdigest()[:16]


def _change_reason(old: dict, fp: dict, shard_bytes: int) -> str | None:
    changed = [k for k in ("sources", "tokenizer") if old["fingerprint"].get(k) != fp[k]]
    if changed:
        return " and ".join(changed) + " changed"
    if old.get("shard_bytes") != shard_bytes:
        return "shard size changed"
    return None


def prepare(
    sources: Sequence[SourceSplits],
    tok,
    vocab_size: int,
    out: str | Path,
    *,
    workers: int = 1,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    split_settings: dict | None = None,
    tokenizer_desc: dict | None = None,
    progress: bool = True,
    on_shard: Callable[[Shard], None] | None = None,
) -> PrepareResult:
    """Tokenize `sources` into shards under `out`; reuse or resume what a matching earlier prepare
    left there, start over when the sources or the tokenizer changed."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not sources:
        raise ValueError("no sources to prepare")
    root = Path(out)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Ranks of a multi-process run prepare the same directory: one does it, the others then reuse.
    with open(root.with_name(f".{root.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare(
            sources,
            tok,
            vocab_size,
            root,
            workers,
            shard_bytes,
            split_settings,
            tokenizer_desc,
            progress,
            on_shard,
        )


def _prepare(
    sources, tok, vocab_size, root, workers, shard_bytes, split_settings, tokenizer_desc, progress, on_shard
):
    t0 = time.perf_counter()
    fp = {
        "sources": sources_fingerprint(sources, split_settings or {}),
        "tokenizer": tokenizer_fingerprint(tok),
    }
    dtype = token_dtype(vocab_size)
    old = read_manifest(root) if root.is_dir() else None
    action, reason = "prepared", "new directory"
    if old is not None:
        why = _change_reason(old, fp, shard_bytes)
        if why is None and old.get("complete"):
            return PrepareResult(root, "reused", "fingerprint matches", manifest=old)
        if why is None:
            action, reason = "resumed", "an earlier prepare was interrupted"
        else:
            action, reason = "re-prepared", why
            _wipe(root, old)
            old = None
    elif root.is_dir() and any(p.name != "tokenizer.json" for p in root.iterdir()):
        raise FileExistsError(
            f"{root} is not empty and holds no {MANIFEST}; choose an empty or new directory"
        )
    manifest = old or {
        "format": FORMAT,
        "complete": False,
        "fingerprint": fp,
        "tokenizer": {**(tokenizer_desc or {}), "fingerprint": fp["tokenizer"], "size": vocab_size},
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "shard_bytes": shard_bytes,
        "separator": separator_ids(tok).tolist(),
        "sources": {},
    }
    done: dict[str, dict] = {}
    plan: dict[str, list[tuple[str, int, int]]] = {}
    for s in sources:
        entry = manifest["sources"].setdefault(s.name, {"documents": {}, "shards": {}})
        for split, docs in (("train", s.train), ("val", s.val)):
            entry["documents"][split] = len(docs)
            kept = [sh for sh in entry["shards"].get(split, []) if shard_intact(root, Shard(**sh), dtype)]
            done.update({sh["stem"]: sh for sh in kept})
            plan[f"{s.name}/{split}"] = _cut(s.name, split, docs, shard_bytes)
    for key, cuts in plan.items():
        name, split = key.split("/")
        manifest["sources"][name]["shards"][split] = [done[c[0]] for c in cuts if c[0] in done]
    _remove_strays(root, set(done))
    todo, by_key = [], {s.name: s for s in sources}
    for key, cuts in plan.items():
        name, split = key.split("/")
        docs = by_key[name].train if split == "train" else by_key[name].val
        for stem, first, stop in cuts:
            if stem not in done:
                todo.append(_Task(stem, first, tuple(d.data for d in docs[first:stop])))
    root.mkdir(parents=True, exist_ok=True)
    # The tokenizer beside its shards, so a prepared corpus can always be decoded (written again
    # on resume: atomic and the same bytes), and a manifest before the first shard.
    saved = tok.save(root)
    manifest["tokenizer"]["file"] = saved.name if saved is not None else None
    write_manifest(root, manifest)

    def record(shard: Shard) -> None:
        done[shard.stem] = shard.to_dict()
        for key, cuts in plan.items():
            name, split = key.split("/")
            manifest["sources"][name]["shards"][split] = [done[c[0]] for c in cuts if c[0] in done]
        manifest["complete"] = all(c[0] in done for cuts in plan.values() for c in cuts)
        write_manifest(root, manifest)  # the shard is complete from here on
        if on_shard is not None:
            on_shard(shard)

    written = _run(todo, tok, root, dtype, vocab_size, workers, record, progress)
    if not manifest["complete"]:  # nothing was left to do: an earlier run died before saying so
        manifest["complete"] = True
        write_manifest(root, manifest)
    return PrepareResult(root, action, reason, len(todo), written, time.perf_counter() - t0, manifest)


def _run(
    todo: list[_Task], tok, root: Path, dtype, vocab_size: int, workers: int, record, progress: bool
) -> int:
    total_bytes = sum(len(d) for t in todo for d in t.docs)
    bar = _progress(total_bytes, progress)
    tokens = 0
    init = (tok, separator_ids(tok), str(root), dtype.name, vocab_size)
    sizes = {t.stem: sum(len(d) for d in t.docs) for t in todo}
    try:
        if workers == 1 or len(todo) <= 1:
            before = os.environ.get("TOKENIZERS_PARALLELISM")
            _init_worker(*init)
            try:
                results = map(_run_task, todo)
                for shard in results:
                    tokens += shard.tokens
                    record(shard)
                    bar(sizes[shard.stem], tokens)
            finally:
                _restore_env("TOKENIZERS_PARALLELISM", before)
        else:
            # spawn, not fork: a parent that has imported torch or used tokenizers' threads must
            # not be forked (OpenMP and Rayon pools do not survive it)
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
                for shard in pool.imap_unordered(_run_task, todo):
                    tokens += shard.tokens
                    record(shard)
                    bar(sizes[shard.stem], tokens)
    finally:
        bar(None, tokens)
    return tokens


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _progress(total_bytes: int, enabled: bool):
    """A tqdm bar over the text's bytes (so the ETA is right before any token is counted),
    tokens/s in its postfix. Returns update(bytes_done_now | None to close, tokens_so_far)."""
    if not enabled or total_bytes == 0:
        return lambda n, tokens: None
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", smoothing=0.1)
    start = time.perf_counter()

    def update(n: int | None, tokens: int) -> None:
        if n is None:
            bar.close()
            return
        rate = tokens / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{tokens:,} tokens, {rate / 1e6:.2f}M tokens/s", refresh=False)
        bar.update(n)

    return update


def _wipe(root: Path, manifest: dict) -> None:
    """Remove what an earlier prepare wrote (its manifest and source directories), nothing else."""
    (root / MANIFEST).unlink(missing_ok=True)
    if manifest.get("tokenizer", {}).get("file"):
        (root / manifest["tokenizer"]["file"]).unlink(missing_ok=True)
    for name in manifest.get("sources", {}):
        shutil.rmtree(root / name, ignore_errors=True)


def _remove_strays(root: Path, complete: set[str]) -> None:
    """Delete *.tmp files and shard files the manifest does not list: the leftovers of a
    prepare that died between writing a shard and recording it."""
    if not root.is_dir():
        return
    keep = {f for stem in complete for f in shard_files(stem)}
    for path in root.rglob("*"):
        if not path.is_file() or path.name in (MANIFEST,):
            continue
        rel = path.relative_to(root).as_posix()
        if rel.endswith(".tmp") or (rel.endswith((".tokens", ".index", ".counts")) and rel not in keep):
            path.unlink()
