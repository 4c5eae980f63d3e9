"""ResumableLoader: a loader restored from state_dict() continues the exact batch stream."""

from __future__ import annotations

import itertools

import torch

from moeplat.data.resumable import ResumableLoader


def _stream(loader, n):
    """The first n batches across epoch boundaries, as lists of sample values."""
    out = []
    while len(out) < n:
        out.extend(b.tolist() for b in itertools.islice(iter(loader), n - len(out)))
    return out


def _loader(seed=3):
    return ResumableLoader(torch.arange(10), batch_size=3, seed=seed)  # 3 batches/epoch, 1 dropped


def test_restored_loader_continues_the_stream_mid_epoch_and_across_epochs():
    reference = _stream(_loader(), 8)
    for cut in (1, 2, 3, 4, 7):
        first = _loader()
        it = iter(first)
        consumed = []
        while len(consumed) < cut:
            try:
                consumed.append(next(it).tolist())
            except StopIteration:
                it = iter(first)
        second = _loader()
        second.load_state_dict(first.state_dict())
        assert consumed + _stream(second, 8 - cut) == reference, cut


def test_epochs_are_different_permutations_and_seed_matters():
    stream = _stream(_loader(), 6)
    assert stream[:3] != stream[3:6]
    assert (
        len({x for batch in stream[:3] for x in batch}) == 9
    )  # drop_last: 9 distinct of the 10 samples per epoch
    assert _stream(_loader(seed=4), 3) != stream[:3]


def test_iterating_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    _stream(_loader(), 4)
    assert torch.equal(state, torch.random.get_rng_state())
