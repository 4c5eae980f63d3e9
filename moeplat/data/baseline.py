"""The number a language model has to beat before it has learned anything about context."""

from __future__ import annotations

import numpy as np


def unigram_cross_entropy(train_ids, val_ids, vocab_size: int) -> float:
    """Cross-entropy, in nats per token, of `val_ids` under the unigram model of `train_ids`.

    The unigram model predicts every token from the training set's token frequencies alone,
    ignoring all context. A language model whose validation loss is not well below this number
    has learned no more than "which bytes are common". Add-one (Laplace) smoothing,
    p(v) = (count(v) + 1) / (N + V), keeps tokens never seen in training at a finite loss.
    Uniform guessing would score ln(vocab_size).
    """
    train = _as_ids(train_ids, vocab_size, "train_ids")
    val = _as_ids(val_ids, vocab_size, "val_ids")
    if val.size == 0:
        raise ValueError("val_ids is empty; cross-entropy needs at least one validation token")
    return unigram_cross_entropy_from_counts(
        np.bincount(train, minlength=vocab_size), np.bincount(val, minlength=vocab_size)
    )


def unigram_cross_entropy_from_counts(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """`unigram_cross_entropy` from per-id token counts (length: the vocabulary), so a prepared
    corpus's baseline reads its shards' .counts files instead of its tokens. Summing over the
    vocabulary instead of over tokens: one dot product of V counts."""
    train_counts, val_counts = np.asarray(train_counts), np.asarray(val_counts)
    if val_counts.sum() == 0:
        raise ValueError("val_ids is empty; cross-entropy needs at least one validation token")
    vocab = train_counts.size
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab)
    return float(-(val_counts[:vocab] @ log_p) / val_counts.sum())


def _as_ids(ids, vocab_size: int, what: str) -> np.ndarray:
    arr = np.asarray(ids).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"{what} must lie in [0, {vocab_size}), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)
