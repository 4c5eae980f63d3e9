"""Spec -> prepared token shards (`moeplat data prepare`, data.prepared_dir) and the DataModule that
trains from them (data.source.kind: prepared) through np.memmap.

Errors name the spec field: data.prepared_dir / data.source.path for where the shards live (and
S3 that cannot be reached), data.tokenizer for a directory prepared with another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeplat.data.prepare import DEFAULT_SHARD_BYTES, PrepareResult, SourceSplits, prepare
from moeplat.data.shards import MANIFEST, PreparedSplit, open_prepared, read_manifest, shard_files
from moeplat.data.storage import StorageError, cache_root, download_dir, is_remote, read_bytes, upload_dir
from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.data_section import PreparedSource
from moeplat.spec.root import Spec

MAIN = "main"  # the sub-directory of a spec whose source is not a mixture


def _say(message: str) -> None:
    print(f"data: {message}", file=sys.stderr, flush=True)


def resolve(path: str, base_dir: str) -> str:
    if is_remote(path) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def tokenizer_desc(spec: Spec) -> dict:
    return spec.data.tokenizer.model_dump(mode="json")


# --- prepare ----------------------------------------------------------------------------------


def prepare_spec(
    spec: Spec,
    base_dir: str,
    out: str,
    *,
    workers: int = 1,
    progress: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    field: str = "data.prepared_dir",
) -> tuple[PrepareResult, object]:
    """Tokenize the spec's sources into `out` (local or s3://); (result, the tokenizer used)."""
    from moeplat.compile.data import split_sources
    from moeplat.compile.tokenizer import build_tokenizer

    d = spec.data
    if isinstance(d.source, PreparedSource):
        raise SpecError(SpecIssue("data.source.kind", "is already prepared: there is nothing to prepare"))
    sources = [SourceSplits(c.name or MAIN, train, val) for c, _, train, val in split_sources(d, base_dir)]
    tok = build_tokenizer(d.tokenizer, [doc for s in sources for doc in s.train], base_dir)
    local = _staging(out) if is_remote(out) else Path(out)
    kw = dict(workers=workers, shard_bytes=shard_bytes, progress=progress)
    settings = {"val_fraction": d.val_fraction, "split_seed": d.split_seed}
    try:
        result = prepare(
            sources,
            tok,
            tok.vocab_size,
            local,
            split_settings=settings,
            tokenizer_desc=tokenizer_desc(spec),
            **kw,
        )
        if is_remote(out):
            _publish(result, out)
    except (FileExistsError, StorageError, OSError) as e:
        raise SpecError(SpecIssue(field, f"{e}")) from None
    return result, tok


def _staging(url: str) -> Path:
    """Where a prepare bound for S3 is built (and resumed) before it is uploaded."""
    return cache_root() / "prepare-staging" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _publish(result: PrepareResult, url: str) -> None:
    """Upload a complete local prepare to `url`, manifest last; nothing when the same corpus is there."""
    try:
        remote = json.loads(read_bytes(f"{url.rstrip('/')}/{MANIFEST}"))
    except FileNotFoundError:
        remote = None
    if (
        remote is not None
        and remote.get("complete")
        and remote["fingerprint"] == result.manifest["fingerprint"]
    ):
        return
    upload_dir(result.path, url, _files(result.manifest), MANIFEST)


def _files(manifest: dict) -> list[str]:
    out = [manifest["tokenizer"]["file"]] if manifest["tokenizer"].get("file") else []
    for entry in manifest["sources"].values():
        for shards in entry["shards"].values():
            out += [f for s in shards for f in shard_files(s["stem"])]
    return out


# --- read -------------------------------------------------------------------------------------


def local_prepared(path: str, field: str) -> Path:
    """A local directory with the prepared corpus at `path`: itself, or for s3:// a copy in the
    cache keyed by the corpus's fingerprint (downloaded once, atomically)."""
    if not is_remote(path):
        if not (Path(path) / MANIFEST).is_file():
            raise SpecError(
                SpecIssue(
                    field, f"{path} holds no {MANIFEST}: make it with `moeplat data prepare SPEC -o {path}`"
                )
            )
        return Path(path)
    try:
        manifest = json.loads(read_bytes(f"{path.rstrip('/')}/{MANIFEST}"))
    except FileNotFoundError:
        raise SpecError(
            SpecIssue(
                field, f"{path}/{MANIFEST} does not exist: make it with `moeplat data prepare SPEC -o {path}`"
            )
        ) from None
    except StorageError as e:
        raise SpecError(SpecIssue(field, str(e))) from None
    if not manifest.get("complete"):
        raise SpecError(
            SpecIssue(field, f"{path} is an unfinished prepare; run `moeplat data prepare` again")
        )
    fp = manifest["fingerprint"]
    dest = cache_root() / "prepared" / f"{fp['sources']}-{fp['tokenizer']}"
    if (dest / MANIFEST).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_dir(path, [*_files(manifest), MANIFEST], dest)
    except (StorageError, FileNotFoundError) as e:
        raise SpecError(SpecIssue(field, str(e))) from None
    return dest


def check_tokenizer(spec: Spec, manifest: dict, base_dir: str) -> None:
    """The spec's data.tokenizer must be the one the shards were made with; the error names both.
    bpe: the same settings (the same training split is implied by the corpus); hf: the same file
    contents (fingerprint), wherever the spec's path points."""
    made = dict(manifest["tokenizer"])
    want = tokenizer_desc(spec)
    same = made["kind"] == want["kind"]
    if same and want["kind"] == "bpe":
        same = all(made.get(k) == v for k, v in want.items())
    elif same and want["kind"] == "hf":
        from moeplat.compile.tokenizer import build_tokenizer

        tok = build_tokenizer(spec.data.tokenizer, [], base_dir)
        want["fingerprint"] = tok.fingerprint
        same = tok.fingerprint == made["fingerprint"]
    if not same:
        raise SpecError(
            SpecIssue(
                "data.tokenizer",
                f"the prepared corpus was made with tokenizer {_describe(made)}, the spec names "
                f"{_describe(want)}; set data.tokenizer to the one it was made with, or prepare it again "
                "with this spec's tokenizer",
            )
        )


def _describe(desc: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in sorted(desc.items()) if k not in ("kind", "file", "size"))
    return f"{desc['kind']}" + (f" ({extra})" if extra else "")


def load_tokenizer(root: Path, manifest: dict):
    """The Tok the shards were made with: bytes, or the tokenizer.json saved beside them."""
    from moeplat.data.tokenizers import ByteTok, HFTok

    desc = manifest["tokenizer"]
    if desc["kind"] == "byte":
        return ByteTok()
    from tokenizers import Tokenizer

    tok = HFTok(
        Tokenizer.from_file(str(root / desc["file"])), kind=desc["kind"], eos_id=manifest["separator"][0]
    )
    assert tok.fingerprint == desc["fingerprint"], (tok.fingerprint, desc)
    return tok


@dataclass(frozen=True)
class Opened:
    root: Path
    manifest: dict
    splits: dict[str, dict[str, PreparedSplit]]
    tok: object


def open_for_spec(spec: Spec, base_dir: str, *, workers: int = 1, progress: bool = True) -> Opened:
    """The prepared corpus a spec trains from: data.source.kind prepared, or data.prepared_dir
    (prepared now, reused or prepared again; each said on stderr)."""
    d = spec.data
    if isinstance(d.source, PreparedSource):
        field = "data.source.path"
        root = local_prepared(resolve(d.source.path, base_dir), field)
        manifest = read_manifest(root)
        check_tokenizer(spec, manifest, base_dir)
    else:
        field = "data.prepared_dir"
        where = resolve(d.prepared_dir, base_dir)
        result, _ = prepare_spec(spec, base_dir, where, workers=workers, progress=progress)
        if result.action == "reused":
            _say(f"reusing the prepared corpus in {where} ({result.reason}: sources and tokenizer unchanged)")
        elif result.action == "re-prepared":
            _say(f"prepared {where} again: {result.reason} ({result.tokens_written:,} tokens)")
        else:
            _say(f"{result.action} {where} ({result.reason}; {result.tokens_written:,} tokens)")
        root = local_prepared(where, field)
    try:
        manifest, splits = open_prepared(root)
    except (FileNotFoundError, ValueError) as e:
        raise SpecError(SpecIssue(field, str(e))) from None
    return Opened(root, manifest, splits, load_tokenizer(root, manifest))


# --- the DataModule ---------------------------------------------------------------------------


def _weights(spec: Spec, names: list[str]) -> list[float] | None:
    """Per-source weights of a prepared mixture, in `names` order; None for one source."""
    from moeplat.spec.data_section import MixtureSource

    src = spec.data.source
    if isinstance(src, MixtureSource):
        return [next(c.weight for c in src.sources if c.name == n) for n in names]
    given = src.weights if isinstance(src, PreparedSource) else None
    if given is None:
        if len(names) == 1:
            return None
        raise SpecError(
            SpecIssue(
                "data.source.weights",
                f"the prepared corpus holds the sources {names}: give each a weight, e.g. "
                "weights: {" + ", ".join(f"{n}: 1.0" for n in names) + "}",
            )
        )
    if sorted(given) != sorted(names):
        raise SpecError(
            SpecIssue(
                "data.source.weights", f"names {sorted(given)}, the prepared corpus holds {sorted(names)}"
            )
        )
    return [given[n] for n in names] if len(names) > 1 else None


def _limits(spec: Spec, names: list[str]) -> list[int | None]:
    from moeplat.spec.data_section import MixtureSource

    src, block = spec.data.source, spec.data.seq_len + 1
    if not isinstance(src, MixtureSource):
        return [None] * len(names)
    caps = {c.name: c.max_tokens for c in src.sources}
    return [None if caps[n] is None else max(caps[n] // block, 1) for n in names]


def _val_stream(split: PreparedSplit, seq_len: int, val_sequences: int | None) -> np.ndarray:
    """The validation tokens scored (data.val_tokens): the first whole sequences, read from the
    shards (all of the split for val_tokens: all)."""
    from moeplat.data.shards import MemmapSequences

    ds = MemmapSequences(split.token_paths(), split.dtype, seq_len, sizes=[s.tokens for s in split.shards])
    stop = ds.num_tokens if val_sequences is None else min(ds.num_tokens, val_sequences * (seq_len + 1))
    return ds.read(0, stop)


def build_prepared_data(spec: Spec, base_dir: str = "."):
    """(LMDataModule, CorpusInfo) of a spec that trains from shards, as compile.data.build_data."""
    from moeplat.compile.data import step_group
    from moeplat.data.blend import BlendedSequences
    from moeplat.data.datamodule import LMDataModule
    from moeplat.data.shards import MemmapSequences

    d = spec.data
    opened = open_for_spec(spec, base_dir)
    names = list(opened.splits)
    if opened.manifest["vocab_size"] > spec.model.vocab_size:
        raise SpecError(
            SpecIssue(
                "model.vocab_size",
                f"{spec.model.vocab_size} is smaller than the prepared corpus's vocabulary of "
                f"{opened.manifest['vocab_size']}; set model.vocab_size: auto (or >= {opened.manifest['vocab_size']})",
            )
        )
    trains = []
    for n in names:
        split = opened.splits[n]["train"]
        try:
            trains.append(
                MemmapSequences(
                    split.token_paths(), split.dtype, d.seq_len, sizes=[s.tokens for s in split.shards]
                )
            )
        except ValueError as e:
            raise SpecError(SpecIssue("data.seq_len", f"source {n!r}, train split: {e}")) from None
    weights = _weights(spec, names)
    val_sequences = None if d.val_tokens == "all" else d.val_tokens // d.seq_len
    vals = {}
    for n in names:
        try:
            vals[n] = _val_stream(opened.splits[n]["val"], d.seq_len, val_sequences)
        except ValueError as e:
            raise SpecError(
                SpecIssue(
                    "data.seq_len",
                    f"source {n!r}, validation split: {e}; or prepare it with a larger val_fraction",
                )
            ) from None
    kw = dict(
        seq_len=d.seq_len,
        batch_size=spec.train.batch_size,
        seed=spec.train.seed,
        num_workers=min(d.num_workers, os.cpu_count() or 1),
        step_group=step_group(spec),
        val_sequences=val_sequences,
        token_bytes=opened.tok.token_bytes,
    )
    try:
        if weights is None:
            dm = LMDataModule(None, vals[names[0]], train_set=trains[0], **kw)
        else:
            blend = BlendedSequences(trains, weights, seed=spec.train.seed, limits=_limits(spec, names))
            dm = LMDataModule(None, vals, train_set=blend, **kw)
    except ValueError as e:
        raise SpecError(SpecIssue("data", str(e))) from None
    dm.tokenizer = opened.tok
    dm.prepared_dir = opened.root
    return dm, _corpus_info(opened, names, weights, dm)


def _corpus_info(opened: Opened, names: list[str], weights, dm):
    from moeplat.compile.data import CorpusInfo
    from moeplat.compile.tokenizer import tokenizer_figures
    from moeplat.data.baseline import unigram_cross_entropy_from_counts

    sp = opened.splits
    train_counts = sum(sp[n]["train"].counts() for n in names)
    val_counts = dm.scored_val_counts(train_counts.size)  # the text val/loss scores
    unigram = unigram_cross_entropy_from_counts(train_counts, val_counts)
    per_source = ()
    if weights is not None:
        per_source = tuple(
            (
                n,
                {
                    "documents": sp[n]["train"].num_documents + sp[n]["val"].num_documents,
                    "train_tokens": sp[n]["train"].num_tokens,
                    "val_tokens": sp[n]["val"].num_tokens,
                    "val_sequences": len(v),
                    "weight": w,
                },
            )
            for n, w, v in zip(names, weights, dm.val_sets, strict=True)
        )
    return CorpusInfo(
        documents=sum(sp[n][s].num_documents for n in names for s in ("train", "val")),
        train_documents=sum(sp[n]["train"].num_documents for n in names),
        val_documents=sum(sp[n]["val"].num_documents for n in names),
        train_tokens=int(train_counts.sum()),
        val_tokens=sum(sp[n]["val"].num_tokens for n in names),
        fingerprint=opened.manifest["fingerprint"]["sources"],
        unigram_baseline=unigram,
        val_sequences=dm.val_sequences,
        per_source=per_source,
        **tokenizer_figures(opened.tok, train_counts, val_counts, unigram),
    )
