"""The training loader under data parallelism: W ranks with per-rank batch B together draw exactly
the global batches of one process with batch W x B (the basis of the DDP equality test), and a
restored loader continues each rank's shard."""

from __future__ import annotations

import itertools

import pytest
import torch

from moeplat.data.resumable import EpochPermutationSampler, ResumableLoader

N, SEED = 37, 5  # 37 is not a multiple of the world sizes: the tail is cut


def _batches(loader, n):
    out = []
    while len(out) < n:
        out.extend(sorted(b.tolist()) for b in itertools.islice(iter(loader), n - len(out)))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_draw_the_single_process_global_batches(world):
    B = 2
    single = _batches(ResumableLoader(torch.arange(N), batch_size=world * B, seed=SEED), 10)  # > 1 epoch
    ranks = [
        _batches(ResumableLoader(torch.arange(N), batch_size=B, seed=SEED, rank=r, world_size=world), 10)
        for r in range(world)
    ]
    for k in range(10):
        merged = sorted(x for r in range(world) for x in ranks[r][k])
        assert merged == single[k], k
    for k in range(10):  # and the ranks' shards are disjoint
        seen = [set(ranks[r][k]) for r in range(world)]
        assert sum(map(len, seen)) == len(set().union(*seen))


def test_one_rank_is_the_old_single_process_order():
    sampler = EpochPermutationSampler(N, SEED)
    explicit = EpochPermutationSampler(N, SEED, rank=0, world_size=1)
    g = torch.Generator().manual_seed(SEED * 1_000_003)
    assert list(sampler) == list(explicit) == torch.randperm(N, generator=g).tolist()


def test_rank_shard_lengths_and_resume():
    s = EpochPermutationSampler(N, SEED, rank=1, world_size=4)
    assert len(s) == N // 4
    first = ResumableLoader(torch.arange(N), batch_size=2, seed=SEED, rank=1, world_size=4)
    reference = _batches(first, 6)
    cut = ResumableLoader(torch.arange(N), batch_size=2, seed=SEED, rank=1, world_size=4)
    it = iter(cut)
    head = [sorted(next(it).tolist()) for _ in range(3)]
    again = ResumableLoader(torch.arange(N), batch_size=2, seed=SEED, rank=1, world_size=4)
    again.load_state_dict(cut.state_dict())
    assert head + _batches(again, 3) == reference


def test_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        EpochPermutationSampler(N, SEED, rank=2, world_size=2)
