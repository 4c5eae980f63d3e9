"""Spec -> corpus, tokens and a Lightning DataModule."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from moeplat.data import (
    ByteTokenizer,
    Document,
    LMDataModule,
    corpus_fingerprint,
    python_stdlib_documents,
    split_documents,
    text_file_documents,
    unigram_cross_entropy,
)
from moeplat.data.corpus import CapTooSmall
from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.root import Spec
from moeplat.spec.sections import DataSpec, PythonStdlibSource


@dataclass(frozen=True)
class CorpusInfo:
    documents: int
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int
    fingerprint: str
    unigram_baseline: float  # nats/token of val under the train byte-frequency distribution

    def as_params(self) -> dict:
        return {f"data.corpus.{k}": v for k, v in self.__dict__.items()}


def load_documents(data: DataSpec, base_dir: str) -> list[Document]:
    src = data.source
    try:
        if isinstance(src, PythonStdlibSource):
            return python_stdlib_documents(include_tests=src.include_tests, max_bytes=src.max_bytes)
        return text_file_documents(
            list(src.paths), patterns=list(src.patterns), base_dir=base_dir, max_bytes=src.max_bytes
        )
    except CapTooSmall as e:
        raise SpecError(SpecIssue("data.source.max_bytes", str(e))) from None
    except (FileNotFoundError, ValueError) as e:
        raise SpecError(SpecIssue("data.source.paths", str(e))) from None


def step_group(spec: Spec) -> int:
    """Micro-batches the training loader looks ahead over: train.grad_accum when global-batch
    load balancing must count a whole step before its first backward (moeplat.nn.balance), else 1."""
    moe = spec.model.moe
    lb = moe.losses.load_balancing if moe is not None else None
    global_batch = lb is not None and lb.coef > 0 and lb.scope == "global_batch"
    return spec.train.grad_accum if global_batch else 1


def build_data(spec: Spec, base_dir: str = ".") -> tuple[LMDataModule, CorpusInfo]:
    d = spec.data
    docs = load_documents(d, base_dir)
    train_docs, val_docs = split_documents(docs, val_fraction=d.val_fraction, seed=d.split_seed)
    assert d.tokenizer.kind == "byte", d.tokenizer  # the only tokenizer of spec v1
    tok = ByteTokenizer()
    train_ids, val_ids = tok.encode_documents(train_docs), tok.encode_documents(val_docs)
    block = d.seq_len + 1
    for name, ids, minimum in (
        ("train", train_ids, block * spec.train.batch_size),
        ("validation", val_ids, block),
    ):
        if len(ids) < minimum:
            raise SpecError(
                SpecIssue(
                    "data",
                    f"the {name} split has {len(ids)} tokens, fewer than one batch needs; "
                    "add text, raise max_bytes or lower data.seq_len / train.batch_size",
                )
            )
    info = CorpusInfo(
        documents=len(docs),
        train_documents=len(train_docs),
        val_documents=len(val_docs),
        train_tokens=len(train_ids),
        val_tokens=len(val_ids),
        fingerprint=corpus_fingerprint(docs),
        unigram_baseline=float(unigram_cross_entropy(train_ids, val_ids, tok.vocab_size)),
    )
    dm = LMDataModule(
        np.asarray(train_ids),
        np.asarray(val_ids),
        seq_len=d.seq_len,
        batch_size=spec.train.batch_size,
        seed=spec.train.seed,
        num_workers=min(d.num_workers, os.cpu_count() or 1),
        step_group=step_group(spec),
    )
    return dm, info
