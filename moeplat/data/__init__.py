"""Corpora, tokenizer, datasets and the Lightning DataModule.

Names are imported on first use (PEP 562) so that reading a corpus or computing the unigram
baseline does not pull in torch and lightning, which take seconds to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeplat.data.baseline import unigram_cross_entropy
    from moeplat.data.corpus import (
        Document,
        corpus_fingerprint,
        python_stdlib_documents,
        split_documents,
        text_file_documents,
    )
    from moeplat.data.datamodule import LMDataModule
    from moeplat.data.dataset import PackedSequences
    from moeplat.data.tokenizer import ByteTokenizer

_HOMES = {
    "Document": "corpus",
    "python_stdlib_documents": "corpus",
    "text_file_documents": "corpus",
    "split_documents": "corpus",
    "corpus_fingerprint": "corpus",
    "ByteTokenizer": "tokenizer",
    "unigram_cross_entropy": "baseline",
    "PackedSequences": "dataset",
    "LMDataModule": "datamodule",
}

__all__ = [
    "ByteTokenizer",
    "Document",
    "LMDataModule",
    "PackedSequences",
    "corpus_fingerprint",
    "python_stdlib_documents",
    "split_documents",
    "text_file_documents",
    "unigram_cross_entropy",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
