"""Lightning DataModule over pre-tokenized train and validation streams."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from moeplat.data.dataset import PackedSequences
from moeplat.data.resumable import ResumableLoader


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
        step_group: int = 1,
    ):
        """`step_group` > 1: training batches look ahead over each optimizer step's micro-batches
        (moeplat.data.resumable), for global-batch load balancing."""
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
        self.step_group = step_group

    @property
    def train_tokens(self) -> int:
        """Tokens in the training stream given, before packing drops the remainder."""
        return self.train_set.num_tokens

    @property
    def val_tokens(self) -> int:
        """Tokens in the validation stream given, before packing drops the remainder."""
        return self.val_set.num_tokens

    def train_dataloader(self) -> DataLoader:
        # Every fit with the same seed sees the same batch order; each epoch gets a new
        # permutation; a resumed fit continues where the checkpoint left off (resumable.py).
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            step_group=self.step_group,
        )

    def val_dataloader(self) -> DataLoader:
        # Fixed order and every block kept, so validation loss is comparable between runs.
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(self.seed),  # keep the global RNG untouched
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
