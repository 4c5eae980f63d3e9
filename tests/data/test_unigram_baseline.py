"""The unigram baseline against hand-computed values and on the real corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeplat.data import ByteTokenizer, python_stdlib_documents, split_documents, unigram_cross_entropy


def test_hand_computed_example():
    # counts [2, 1, 0] over N=3 with V=3 -> p = [3/6, 2/6, 1/6]; val [0, 2] -> -(ln 1/2 + ln 1/6)/2
    ce = unigram_cross_entropy([0, 0, 1], [0, 2], vocab_size=3)
    assert ce == pytest.approx(math.log(12) / 2, rel=1e-12)
    assert unigram_cross_entropy(torch.tensor([0, 0, 1]), np.array([0, 2], dtype=np.uint8), 3) == ce


def test_no_training_data_is_uniform():
    assert unigram_cross_entropy([], [0, 1, 2, 2], vocab_size=3) == pytest.approx(math.log(3))


def test_invalid_inputs_are_errors():
    with pytest.raises(ValueError, match="val_ids is empty"):
        unigram_cross_entropy([1, 2], [], vocab_size=3)
    with pytest.raises(ValueError, match=r"train_ids must lie in \[0, 3\)"):
        unigram_cross_entropy([1, 3], [1], vocab_size=3)
    with pytest.raises(TypeError, match="integer"):
        unigram_cross_entropy([0.5], [1], vocab_size=3)


def test_stdlib_baseline_beats_uniform_but_not_by_magic():
    train, val = split_documents(python_stdlib_documents(), val_fraction=0.05, seed=0)
    tok = ByteTokenizer()
    ce = unigram_cross_entropy(tok.encode_documents(train), tok.encode_documents(val), tok.vocab_size)
    # Source code uses a small share of the 256 byte values, very unevenly; but a model that
    # ignores context cannot get near zero.
    assert 2.0 < ce < math.log(256) - 1.0
