"""Lightning DataModule over pre-tokenized train and validation streams."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moeplat.data.dataset import PackedSequences
from moeplat.data.resumable import ResumableLoader, _data_parallel_rank

# Target id that cross_entropy ignores: the padding sequences that even out the ranks' validation
# shards carry it, so they add neither loss nor tokens.
IGNORE = -100


class LMDataModule(L.LightningDataModule):
    """Shuffled, seeded training batches and fixed-order validation batches.

    The token streams are already in memory (a byte corpus is small), so the datasets are built
    here rather than in `setup`: a too-short stream fails when the run is assembled, not minutes
    later. The training loader shards the global batch over data-parallel ranks itself
    (moeplat.data.resumable).

    Validation is defined by data (issue 16, item 7): `val_ids` is one stream or a mapping
    source name -> stream (a mixture: one validation set per source), each cut to its first
    `val_sequences` sequences (None: all). Which text is scored never depends on the batch size,
    accumulation or device count: ranks split each set without duplicates (`ValShardSampler`),
    and the system sums loss and tokens over ranks. `train_set`: a prebuilt training dataset that
    defines its own order (a mixture's blend) in place of the shuffled `train_ids`. `token_bytes`:
    UTF-8 bytes of each token id, for bits per byte (None: one byte per token, the byte tokenizer).
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
        val_sequences: int | None = None,
        train_set: Dataset | None = None,
        token_bytes=None,
    ):
        """`step_group` > 1: training batches look ahead over each optimizer step's micro-batches
        (moeplat.data.resumable), for global-batch load balancing."""
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if val_sequences is not None and val_sequences < 1:
            raise ValueError(f"val_sequences must be a positive integer or None, got {val_sequences!r}")
        self.train_set = PackedSequences(train_ids, seq_len) if train_set is None else train_set
        # the dataset's own order (a mixture's blend), not a shuffle; a dataset with ordered = False
        # (memmapped shards, moeplat.data.shards) is shuffled like train_ids
        self._ordered = train_set is not None and getattr(train_set, "ordered", True)
        streams = dict(val_ids) if isinstance(val_ids, Mapping) else {"": val_ids}
        self.val_names = list(streams)
        self.val_sets = [_first_sequences(ids, seq_len, val_sequences) for ids in streams.values()]
        self.val_set = self.val_sets[0]
        self.token_bytes = None if token_bytes is None else torch.as_tensor(np.asarray(token_bytes))
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
        return getattr(self.train_set, "num_tokens", 0)

    @property
    def val_tokens(self) -> int:
        """Tokens in the validation streams kept (all sources), before packing drops the remainder."""
        return sum(v.num_tokens for v in self.val_sets)

    @property
    def val_sequences(self) -> int:
        """Validation sequences scored (all sources)."""
        return sum(len(v) for v in self.val_sets)

    def scored_val_counts(self, minlength: int) -> np.ndarray:
        """Per-id counts of the validation targets scored (every source): the text the unigram
        baseline must be computed on to compare with val/loss."""
        return sum(v.target_counts(minlength) for v in self.val_sets)

    def train_dataloader(self) -> DataLoader:
        # Every fit with the same seed sees the same batch order; each epoch gets a new
        # permutation; a resumed fit continues where the checkpoint left off (resumable.py).
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            step_group=self.step_group,
            shuffle=not self._ordered,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # Fixed order and every block kept, so validation loss is comparable between runs.
        loaders = [
            DataLoader(
                _PaddedForRanks(val_set),
                batch_size=self.val_batch_size,
                sampler=ValShardSampler(len(val_set)),
                generator=torch.Generator().manual_seed(self.seed),  # keep the global RNG untouched
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
            for val_set in self.val_sets
        ]
        return loaders[0] if len(loaders) == 1 else loaders


def _first_sequences(ids, seq_len: int, count: int | None) -> PackedSequences:
    """The first `count` whole sequences of a validation stream (all of them for None)."""
    if count is not None:
        ids = ids[: count * (seq_len + 1)]
    return PackedSequences(ids, seq_len)


class ValShardSampler(Sampler[int]):
    """Rank r of W takes positions r, r + W, r + 2W, ... of 0 .. ceil(n / W) * W - 1: every
    sequence exactly once over the ranks, and every rank the same number of items, so no rank
    waits in a collective (expert parallelism's all-to-all) for a batch that never comes.
    Positions >= n are padding (`_PaddedForRanks`), scored with weight zero. Unlike Lightning's
    DistributedSampler, which pads with repeated sequences that count twice."""

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None):
        self.n, self.rank, self.world_size = n, rank, world_size

    def _layout(self) -> tuple[int, int]:
        return _data_parallel_rank() if self.world_size is None else (self.rank or 0, self.world_size)

    def __len__(self) -> int:
        return -(-self.n // self._layout()[1])

    def __iter__(self):
        rank, world = self._layout()
        yield from range(rank, -(-self.n // world) * world, world)


class _PaddedForRanks(Dataset):
    """`base`, plus padding items past its end: a real sequence with every target IGNORE."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i < len(self.base):
            return self.base[i]
        x, y = self.base[0]
        return x, torch.full_like(y, IGNORE)
