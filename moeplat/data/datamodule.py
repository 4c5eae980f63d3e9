"""Lightning DataModule over pre-tokenized train and validation streams."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from moeplat.data.dataset import PackedSequences


class LMDataModule(L.LightningDataModule):
    """Shuffled, seeded training batches and fixed-order validation batches.

    The token streams are already in memory (a byte corpus is small), so the datasets are built
    here rather than in `setup`: a too-short stream fails when the run is assembled, not minutes
    later. Under a distributed strategy Lightning swaps in a DistributedSampler, which shuffles
    from the global seed (`seed_everything`) instead of the generator here.
    """

    def __init__(
        self,
        train_ids,
        val_ids,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.train_set = PackedSequences(train_ids, seq_len)
        self.val_set = PackedSequences(val_ids, seq_len)
        if len(self.train_set) < batch_size:
            # drop_last would leave an epoch with no steps at all, which trains silently on nothing.
            raise ValueError(
                f"the training stream holds {len(self.train_set)} blocks of seq_len + 1 = {seq_len + 1} "
                f"tokens, fewer than batch_size={batch_size}; use more text, a shorter seq_len or a "
                "smaller batch_size"
            )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers

    @property
    def train_tokens(self) -> int:
        """Tokens in the training stream given, before packing drops the remainder."""
        return self.train_set.num_tokens

    @property
    def val_tokens(self) -> int:
        """Tokens in the validation stream given, before packing drops the remainder."""
        return self.val_set.num_tokens

    def train_dataloader(self) -> DataLoader:
        # A fresh generator per call: every fit with the same seed sees the same batch order, and
        # each epoch still gets a new permutation drawn from this generator's stream.
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(
            self.train_set, self.batch_size, shuffle=True, drop_last=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        # Fixed order and every block kept, so validation loss is comparable between runs.
        return self._loader(self.val_set, self.val_batch_size, shuffle=False, drop_last=False, generator=None)

    def _loader(self, dataset, batch_size, *, shuffle, drop_last, generator) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
