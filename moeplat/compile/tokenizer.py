"""Spec's data.tokenizer -> a `Tok` (moeplat.data.tokenizers), and the figures that compare
tokenizers (bytes per token, the unigram baseline in bits per byte)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from moeplat.data.corpus import Document
from moeplat.data.tokenizers import ByteTok, HFTok, load_tokenizer_file, train_bpe
from moeplat.errors import SpecError, SpecIssue
from moeplat.spec.tokenizer_files import resolve_tokenizer_file


def build_tokenizer(
    tok_spec, train_docs: Sequence[Document], base_dir: str = ".", *, show_progress: bool = False
) -> ByteTok | HFTok:
    """The tokenizer `tok_spec` (spec.data.tokenizer) names. `train_docs`: the training split only
    (all sources of a mixture), which a `bpe` tokenizer is trained on (or found in the cache by);
    `base_dir`: where a relative `hf` path resolves when validation did not already find the file.
    Bad files are a SpecError on data.tokenizer.*."""
    if tok_spec.kind == "byte":
        return ByteTok()
    if tok_spec.kind == "bpe":
        t0 = time.perf_counter()
        tok = train_bpe(
            train_docs,
            vocab_size=tok_spec.vocab_size,
            min_frequency=tok_spec.min_frequency,
            special_tokens=tok_spec.special_tokens,
            show_progress=show_progress,
        )
        how = "taken from the cache" if tok.cached else f"trained on {len(train_docs)} documents"
        took = time.perf_counter() - t0
        print(f"tokenizer: BPE of {tok.vocab_size} ids {how} ({took:.1f} s): {tok.path}", file=sys.stderr)
        return tok
    try:
        file = tok_spec.file or resolve_tokenizer_file(tok_spec.path, base_dir)
        return load_tokenizer_file(file, eos_token=tok_spec.eos_token)
    except FileNotFoundError as e:
        raise SpecError(SpecIssue("data.tokenizer.path", str(e))) from None
    except ValueError as e:
        field = "eos_token" if "eos_token" in str(e) else "path"
        raise SpecError(SpecIssue(f"data.tokenizer.{field}", str(e))) from None


def stream_bytes(tok, ids) -> int:
    """UTF-8 bytes of text a token stream stands for (special tokens 0; bytes: one per id)."""
    return int(tok.token_bytes[np.asarray(ids)].sum())


def tokenizer_figures(tok, train_counts, val_counts, unigram_nats_per_token: float) -> dict[str, float]:
    """data/bytes_per_token (training split) and the unigram baseline in bits per byte of the
    validation text scored: the same nats as `unigram_baseline`, divided by ln 2 x the bytes they
    cover. From per-id token counts (a prepared corpus keeps them; special tokens count 0 bytes)."""
    tb = np.asarray(tok.token_bytes, dtype=np.int64)
    train_counts, val_counts = np.asarray(train_counts), np.asarray(val_counts)
    train_bytes = int(train_counts[: tb.size] @ tb[: train_counts.size])
    val_bytes = int(val_counts[: tb.size] @ tb[: val_counts.size])
    return {
        "bytes_per_token": train_bytes / max(int(train_counts.sum()), 1),
        "unigram_baseline_bpb": unigram_nats_per_token
        * int(val_counts.sum())
        / (math.log(2) * max(val_bytes, 1)),
    }
