"""Seeded, repeatable batches from the real stdlib corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplat.data import ByteTokenizer, LMDataModule, python_stdlib_documents, split_documents


@pytest.fixture(scope="module")
def streams() -> tuple[np.ndarray, np.ndarray]:
    train, val = split_documents(python_stdlib_documents(max_bytes=1_000_000), val_fraction=0.1, seed=0)
    tok = ByteTokenizer()
    return tok.encode_documents(train), tok.encode_documents(val)


def _dm(streams, seed: int, **kwargs) -> LMDataModule:
    train_ids, val_ids = streams
    return LMDataModule(train_ids, val_ids, seq_len=64, batch_size=8, seed=seed, **kwargs)


def test_same_seed_same_batches_other_seed_other_batches(streams):
    first = next(iter(_dm(streams, seed=0).train_dataloader()))
    again = next(iter(_dm(streams, seed=0).train_dataloader()))
    other = next(iter(_dm(streams, seed=1).train_dataloader()))
    assert first[0].shape == first[1].shape == (8, 64)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_each_epoch_is_a_new_permutation(streams):
    loader = _dm(streams, seed=0).train_dataloader()
    assert not torch.equal(next(iter(loader))[0], next(iter(loader))[0])


def test_train_drops_the_last_partial_batch(streams):
    dm = _dm(streams, seed=0)
    assert len(dm.train_set) % 8 != 0  # otherwise this test would prove nothing
    assert sum(1 for _ in dm.train_dataloader()) == len(dm.train_set) // 8


def test_val_order_is_fixed_and_complete(streams):
    dm = _dm(streams, seed=0, val_batch_size=5)
    batches = list(dm.val_dataloader())
    assert batches[0][0].shape == (5, 64)
    x0 = torch.stack([dm.val_set[i][0] for i in range(5)])
    assert torch.equal(batches[0][0], x0)
    assert sum(len(x) for x, _ in batches) == len(dm.val_set)
    other_seed = list(_dm(streams, seed=1, val_batch_size=5).val_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, other_seed))


def test_token_counts(streams):
    dm = _dm(streams, seed=0)
    assert dm.train_tokens == len(streams[0])
    assert dm.val_tokens == len(streams[1])


def test_too_few_blocks_for_one_batch_is_an_error(streams):
    with pytest.raises(ValueError, match="fewer than batch_size=8"):
        LMDataModule(streams[0][: 64 * 7], streams[1], seq_len=64, batch_size=8, seed=0)
