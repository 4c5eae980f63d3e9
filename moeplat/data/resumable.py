"""A shuffled training loader whose position survives a checkpoint, so `--resume` continues
with exactly the batches an uninterrupted run would have seen.

Lightning saves `state_dict()` of every stateful train loader into the checkpoint and calls
`load_state_dict()` on resume. Each epoch's order is a permutation drawn from (seed, epoch) alone,
so restoring (epoch, batches already consumed) restores the stream.

Data parallel: rank r of W takes positions r, r + W, r + 2W, ... of the same global permutation
(DistributedSampler semantics, the tail cut to a multiple of W), so with a per-rank batch of B the
W ranks' k-th batches together are exactly the k-th batch of W x B that one process would draw:
a DDP run sees the same global batches as a single-device run with the batch W times larger.

Look-ahead (`step_group` A > 1, for global-batch load balancing with A accumulation
micro-batches, moeplat.nn.balance): the micro-batches at epoch positions kA, ..., kA + A - 1 form
one optimizer step (Lightning's accumulation counts from the epoch start too); the first of them
comes as (x, y, ahead_ABS), ahead_ABS the inputs of all of the step's micro-batches, stacked
(fewer in an epoch's last, shorter step). The others come as (x, y), as without look-ahead.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _data_parallel_rank() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochPermutationSampler(Sampler[int]):
    """Epoch e yields this rank's share of randperm(n) drawn from a generator seeded with (seed, e),
    from `skip` on. `rank`, `world_size`: None = the default process group's, read when iterated
    (the loader is built before the process group exists). `shuffle=False`: epoch e is the
    positions e*n, ..., e*n + n - 1 instead, for a dataset that defines its own order over an
    unbounded index (a mixture's blend, moeplat.data.blend.BlendedSequences)."""

    def __init__(
        self, n: int, seed: int, rank: int | None = None, world_size: int | None = None, shuffle: bool = True
    ):
        if world_size is not None and not 0 <= (rank or 0) < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def _layout(self) -> tuple[int, int]:
        if self.world_size is None:
            return _data_parallel_rank()
        return self.rank or 0, self.world_size

    def __len__(self) -> int:
        return self.n // self._layout()[1] - self.skip

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        rank, world = self._layout()
        # int32 (the same permutation as int64, tested) and handed out in chunks: a list of every
        # index would hold O(corpus) Python ints, hundreds of MB for a prepared corpus of 1e9 tokens
        dtype = torch.int32 if self.n < 2**31 else torch.int64
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=generator, dtype=dtype)[: self.n // world * world]
        else:
            perm = torch.arange(self.n // world * world, dtype=torch.int64) + epoch * self.n
        for chunk in perm[rank::world][skip:].split(1 << 16):
            yield from chunk.tolist()


class ResumableLoader(DataLoader):
    """drop_last batches over an EpochPermutationSampler, counting what it has handed out (per rank:
    every rank consumes the same number of batches)."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        step_group: int = 1,
        shuffle: bool = True,
    ):
        if step_group < 1:
            raise ValueError(f"step_group must be >= 1, got {step_group}")
        self.step_group = step_group
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=EpochPermutationSampler(len(dataset), seed, rank, world_size, shuffle),
            drop_last=True,
            # Its own generator: creating an iterator draws a worker base seed, which must not
            # consume the global RNG that dropout uses (a resumed run would be one draw off).
            generator=torch.Generator().manual_seed(seed),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        self._epoch, self._consumed = 0, 0

    def __iter__(self):
        self._epoch = self.sampler.epoch
        self._consumed = self.sampler.skip // self.batch_size
        batches = super().__iter__()
        if self.step_group > 1:
            batches = _with_look_ahead(batches, self.step_group, self._consumed)
        for batch in batches:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch = state["epoch"]
        self.sampler.skip = state["batches"] * self.batch_size


def _with_look_ahead(batches, group: int, position: int):
    """(x, y, ahead_ABS) for the first micro-batch of each step of `group`, (x, y) otherwise;
    `position`: the epoch position of the first batch (a resumed epoch starts at a step's start)."""
    pending: list = []
    for batch in batches:
        pending.append(batch)
        if (position + len(pending)) % group == 0:
            yield from _grouped(pending, group, position)
            position, pending = position + len(pending), []
    yield from _grouped(pending, group, position)


def _grouped(pending: list, group: int, position: int):
    if not pending:
        return
    if position % group:  # not a step's start (an epoch resumed mid-step): no look-ahead
        yield from pending
        return
    ahead_ABS = torch.stack([batch[0] for batch in pending])
    yield (*pending[0], ahead_ABS)
    yield from pending[1:]
