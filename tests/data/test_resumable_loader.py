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


def _pairs(n: int = 10):
    """A dataset of (x, y) pairs, as PackedSequences yields: x = [i, i], y = [i + 100]."""
    return [(torch.tensor([i, i]), torch.tensor([i + 100])) for i in range(n)]


def test_step_group_looks_ahead_over_each_steps_micro_batches():
    """step_group 2 (global-batch balancing with grad_accum 2): positions 0, 2, 4 of the epoch's
    5 batches carry the inputs of their step, the last step being the single batch 4; the
    batches themselves and the resume state are those of a plain loader."""
    plain = ResumableLoader(_pairs(), batch_size=2, seed=1)
    grouped = ResumableLoader(_pairs(), batch_size=2, seed=1, step_group=2)
    batches, reference = list(grouped), list(plain)
    assert [len(b) for b in batches] == [3, 2, 3, 2, 3]
    for b, r in zip(batches, reference, strict=True):
        assert torch.equal(b[0], r[0]) and torch.equal(b[1], r[1])
    for start, size in ((0, 2), (2, 2), (4, 1)):
        ahead = batches[start][2]
        assert ahead.shape == (size, 2, 2)
        for j in range(size):
            assert torch.equal(ahead[j], batches[start + j][0])
    assert grouped.state_dict() == plain.state_dict()


def test_step_group_resumed_at_a_step_start_looks_ahead_again():
    first = ResumableLoader(_pairs(), batch_size=2, seed=1, step_group=2)
    it = iter(first)
    next(it), next(it)  # one step of 2 micro-batches
    second = ResumableLoader(_pairs(), batch_size=2, seed=1, step_group=2)
    second.load_state_dict(first.state_dict())
    assert [len(b) for b in second] == [3, 2, 3]  # positions 2, 3, 4
    third = ResumableLoader(_pairs(), batch_size=2, seed=1, step_group=2)
    third.load_state_dict({"epoch": 0, "batches": 1})  # mid-step: no look-ahead until the next step
    assert [len(b) for b in third] == [2, 3, 2, 3]
