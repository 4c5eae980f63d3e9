"""Spec -> corpus, tokens and a Lightning DataModule."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from moeplat.compile.tokenizer import build_tokenizer, tokenizer_figures
from moeplat.data import (
    Document,
    LMDataModule,
    corpus_fingerprint,
    python_stdlib_documents,
    split_documents,
    text_file_documents,
)
from moeplat.data.baseline import unigram_cross_entropy_from_counts
from moeplat.data.blend import BlendedSequences
from moeplat.data.corpus import CapTooSmall
from moeplat.data.dataset import PackedSequences
from moeplat.data.sources import SourceError, hf_dataset_documents, python_docs_documents
from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.data_section import (
    DataSpec,
    HfDatasetSource,
    MixtureSource,
    PythonDocsSource,
    PythonStdlibSource,
)
from moeplat.spec.root import Spec


@dataclass(frozen=True)
class CorpusInfo:
    documents: int
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int
    fingerprint: str
    unigram_baseline: float  # nats/token of the scored val text under the train token frequencies
    val_sequences: int = 0  # validation sequences scored (data.val_tokens per source, all sources)
    # a mixture's sources: ((name, {train_documents, train_tokens, val_tokens, val_sequences, ...}), ...)
    per_source: tuple = ()
    bytes_per_token: float | None = None  # UTF-8 bytes per training token (compile.tokenizer)
    unigram_baseline_bpb: float | None = None  # unigram_baseline in bits per validation byte

    def as_params(self) -> dict:
        params = {f"data.corpus.{k}": v for k, v in self.__dict__.items() if k != "per_source"}
        for name, fields in self.per_source:
            params.update({f"data.corpus.{name}.{k}": v for k, v in fields.items()})
        return params


@dataclass(frozen=True)
class Component:
    """One source of the spec: the whole of data.source, or one entry of a mixture."""

    name: str  # "" for a source that is not a mixture
    field: str  # dotted spec path of the source, for errors
    source: object
    weight: float = 1.0
    max_tokens: int | None = None


def components(data: DataSpec) -> list[Component]:
    src = data.source
    if not isinstance(src, MixtureSource):
        return [Component("", "data.source", src)]
    return [
        Component(c.name, f"data.source.sources.{i}.source", c.source, c.weight, c.max_tokens)
        for i, c in enumerate(src.sources)
    ]


def load_documents(data: DataSpec, base_dir: str) -> list[Document]:
    """The documents of a spec whose source is not a mixture."""
    (only,) = components(data)
    return load_source_documents(only.source, base_dir, only.field)


def load_source_documents(src, base_dir: str, field: str = "data.source") -> list[Document]:
    """Documents of one (non-mixture) source; errors name `field`.<key>."""
    try:
        if isinstance(src, PythonStdlibSource):
            return python_stdlib_documents(include_tests=src.include_tests, max_bytes=src.max_bytes)
        if isinstance(src, PythonDocsSource):
            return python_docs_documents(max_bytes=src.max_bytes)
        if isinstance(src, HfDatasetSource):
            return hf_dataset_documents(
                path=src.path,
                name=src.name,
                data_files=src.data_files,
                split=src.split,
                text_fields=src.text_fields or [src.text_field],
                separator=src.separator,
                streaming=src.streaming,
                storage_options=src.storage_options,
                max_bytes=src.max_bytes,
                base_dir=base_dir,
            )
        return text_file_documents(
            list(src.paths), patterns=list(src.patterns), base_dir=base_dir, max_bytes=src.max_bytes
        )
    except SourceError as e:
        raise SpecError(SpecIssue(f"{field}.{e.field}", str(e))) from None
    except CapTooSmall as e:
        raise SpecError(SpecIssue(f"{field}.max_bytes", str(e))) from None
    except (FileNotFoundError, ValueError) as e:
        raise SpecError(SpecIssue(f"{field}.paths", str(e))) from None


def step_group(spec: Spec) -> int:
    """Micro-batches the training loader looks ahead over: train.grad_accum when global-batch
    load balancing must count a whole step before its first backward (moeplat.nn.balance), else 1."""
    moe = spec.model.moe
    lb = moe.losses.load_balancing if moe is not None else None
    global_batch = lb is not None and lb.coef > 0 and lb.scope == "global_batch"
    return spec.train.grad_accum if global_batch else 1


def split_sources(d: DataSpec, base_dir: str) -> list[tuple[Component, list, list, list]]:
    """(component, documents, train, val) of each source (a mixture's, or the one), read and split
    the same way for a run, `data prepare` and `tokenizer train`."""
    read = []
    for c in components(d):
        docs = load_source_documents(c.source, base_dir, c.field)
        read.append((c, docs, *split_documents(docs, val_fraction=d.val_fraction, seed=d.split_seed)))
    return read


def build_data(spec: Spec, base_dir: str = ".") -> tuple[LMDataModule, CorpusInfo]:
    d = spec.data
    if d.prepared_dir is not None or d.source.kind == "prepared":  # token shards, memmapped
        from moeplat.compile.prepared import build_prepared_data

        return build_prepared_data(spec, base_dir)
    read = split_sources(d, base_dir)
    comps, splits = [c for c, *_ in read], [(docs, train, val) for _, docs, train, val in read]
    # trained (bpe) on the training split of every source, never on validation text
    tok = build_tokenizer(d.tokenizer, [doc for _, train, _ in splits for doc in train], base_dir)
    streams = [(tok.encode_documents(train), tok.encode_documents(val)) for _, train, val in splits]
    block = d.seq_len + 1
    mixture = isinstance(d.source, MixtureSource)
    for c, (train_ids, val_ids) in zip(comps, streams):
        where = f"source {c.name!r}: " if c.name else ""
        for name, ids, minimum in (
            ("train", train_ids, block if mixture else block * spec.train.batch_size),
            ("validation", val_ids, block),
        ):
            if len(ids) < minimum:
                raise SpecError(
                    SpecIssue(
                        c.field if mixture else "data",
                        f"{where}the {name} split has {len(ids)} tokens, fewer than one batch needs; "
                        "add text, raise max_bytes or lower data.seq_len / train.batch_size",
                    )
                )
    val_sequences = None if d.val_tokens == "all" else d.val_tokens // d.seq_len
    dm_kwargs = {
        "seq_len": d.seq_len,
        "batch_size": spec.train.batch_size,
        "seed": spec.train.seed,
        "num_workers": min(d.num_workers, os.cpu_count() or 1),
        "step_group": step_group(spec),
        "val_sequences": val_sequences,
        "token_bytes": tok.token_bytes,
    }
    if mixture:
        dm = LMDataModule(
            None,
            {c.name: val_ids for c, (_, val_ids) in zip(comps, streams)},
            train_set=_blend(spec, comps, streams),
            **dm_kwargs,
        )
    else:
        dm = LMDataModule(np.asarray(streams[0][0]), np.asarray(streams[0][1]), **dm_kwargs)
    dm.tokenizer = tok  # saved with the run (moeplat.train.run_artifacts.save_tokenizer)
    return dm, _corpus_info(comps, splits, streams, dm, tok)


def _blend(spec: Spec, comps: list[Component], streams) -> BlendedSequences:
    block = spec.data.seq_len + 1
    limits = []
    for i, c in enumerate(comps):
        if c.max_tokens is not None and c.max_tokens < block:
            raise SpecError(
                SpecIssue(
                    f"data.source.sources.{i}.max_tokens",
                    f"max_tokens={c.max_tokens} is less than one sequence (data.seq_len + 1 = {block} tokens); "
                    "raise it or remove it",
                )
            )
        limits.append(None if c.max_tokens is None else c.max_tokens // block)
    sources = [PackedSequences(np.asarray(train_ids), spec.data.seq_len) for train_ids, _ in streams]
    return BlendedSequences(sources, [c.weight for c in comps], seed=spec.train.seed, limits=limits)


def _corpus_info(comps, splits, streams, dm: LMDataModule, tok) -> CorpusInfo:
    vocab_size = tok.vocab_size
    train_counts = sum(np.bincount(np.asarray(t, dtype=np.int64), minlength=vocab_size) for t, _ in streams)
    val_counts = dm.scored_val_counts(vocab_size)  # the text val/loss scores (data.val_tokens)
    unigram = unigram_cross_entropy_from_counts(train_counts, val_counts)
    named = [
        Document(f"{c.name}/{doc.name}", doc.data) if c.name else doc
        for c, (docs, _, _) in zip(comps, splits)
        for doc in docs
    ]
    per_source = tuple(
        (
            c.name,
            {
                "documents": len(docs),
                "train_tokens": len(train_ids),
                "val_tokens": len(val_ids),
                "val_sequences": len(val_set),
                "weight": c.weight,
            },
        )
        for c, (docs, _, _), (train_ids, val_ids), val_set in zip(comps, splits, streams, dm.val_sets)
        if c.name
    )
    return CorpusInfo(
        documents=sum(len(docs) for docs, _, _ in splits),
        train_documents=sum(len(train) for _, train, _ in splits),
        val_documents=sum(len(val) for _, _, val in splits),
        train_tokens=int(train_counts.sum()),
        val_tokens=sum(len(v) for _, v in streams),
        fingerprint=corpus_fingerprint(named),
        unigram_baseline=unigram,
        val_sequences=dm.val_sequences,
        per_source=per_source,
        **tokenizer_figures(tok, train_counts, val_counts, unigram),
    )
