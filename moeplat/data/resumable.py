"""A shuffled training loader whose position survives a checkpoint, so `--resume` continues
with exactly the batches an uninterrupted run would have seen.

Lightning saves `state_dict()` of every stateful train loader into the checkpoint and calls
`load_state_dict()` on resume. Each epoch's order is a permutation drawn from (seed, epoch) alone,
so restoring (epoch, batches already consumed) restores the stream. Single-process layouts only:
a distributed strategy replaces the sampler (the multi-device issue revisits this).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochPermutationSampler(Sampler[int]):
    """Epoch e yields randperm(n) drawn from a generator seeded with (seed, e), from `skip` on."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.n - self.skip

    def __iter__(self):
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        yield from torch.randperm(self.n, generator=generator)[skip:].tolist()


class ResumableLoader(DataLoader):
    """drop_last batches over an EpochPermutationSampler, counting what it has handed out."""

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, num_workers: int = 0):
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=EpochPermutationSampler(len(dataset), seed),
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
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch = state["epoch"]
        self.sampler.skip = state["batches"] * self.batch_size
