"""Packing a token stream into next-token examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplat.data import ByteTokenizer, PackedSequences


def test_shapes_dtype_and_count():
    ds = PackedSequences(np.arange(23), seq_len=4)  # blocks of 5 -> 4 blocks, 3 tokens left over
    assert len(ds) == 4
    x, y = ds[0]
    assert x.shape == y.shape == (4,)
    assert x.dtype == y.dtype == torch.int64
    assert ds.num_tokens == 23


def test_targets_are_inputs_shifted_by_one():
    stream = ByteTokenizer().encode("the quick brown fox jumps over the lazy dog, twice: " * 3)
    ds = PackedSequences(stream, seq_len=16)
    for i in range(len(ds)):
        x, y = ds[i]
        block = torch.from_numpy(stream[i * 17 : (i + 1) * 17].astype(np.int64))
        assert torch.equal(x, block[:-1])
        assert torch.equal(y, block[1:])


def test_blocks_tile_the_stream_without_overlap_and_drop_the_remainder():
    tokens = torch.arange(23, dtype=torch.int32)
    ds = PackedSequences(tokens, seq_len=4)
    rebuilt = torch.cat([torch.cat([x, y[-1:]]) for x, y in ds])
    assert torch.equal(rebuilt, tokens[:20].to(torch.int64))
    assert [int(x[0]) for x, _ in ds] == [0, 5, 10, 15]
    with pytest.raises(IndexError):
        ds[4]


def test_dataset_is_a_copy_of_the_caller_stream():
    tokens = np.arange(10, dtype=np.int64)
    ds = PackedSequences(tokens, seq_len=4)
    tokens[:] = 0
    assert ds[1][0].tolist() == [5, 6, 7, 8]


def test_exactly_one_block_and_too_short_input():
    assert len(PackedSequences(np.arange(5), seq_len=4)) == 1
    with pytest.raises(ValueError, match=r"4 tokens are fewer than one block of seq_len \+ 1 = 5"):
        PackedSequences(np.arange(4), seq_len=4)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="seq_len"):
        PackedSequences(np.arange(10), seq_len=0)
    with pytest.raises(ValueError, match="1-D"):
        PackedSequences(np.zeros((2, 10), dtype=np.int64), seq_len=4)
    with pytest.raises(TypeError, match="integer"):
        PackedSequences(np.zeros(10, dtype=np.float32), seq_len=4)
