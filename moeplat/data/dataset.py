"""Fixed-length next-token training examples cut from one token stream."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

# Dtypes kept as they are; anything else (uint16, uint32 from a larger vocabulary) is widened,
# because torch indexes and converts these reliably and a stream stays at its compact size.
_KEPT_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


class PackedSequences(Dataset):
    """Non-overlapping blocks of `seq_len + 1` tokens; item i is (x, y) with y = x shifted by one.

    Blocks of seq_len + 1 let each block supply seq_len inputs and seq_len targets without
    reading its neighbour, so the items are independent and any shuffle is valid. The trailing
    remainder shorter than one block is dropped. Items are int64, as `nn.Embedding` and
    `cross_entropy` expect, while the stream itself keeps its compact dtype (uint8 for bytes).
    """

    def __init__(self, tokens, seq_len: int):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if not torch.is_tensor(tokens):
            tokens = np.asarray(tokens)
            # torch refuses to share memory with a read-only array (np.frombuffer's); the
            # remainder-dropping copy below happens anyway, so copy first instead.
            tokens = torch.from_numpy(tokens if tokens.flags.writeable else tokens.copy())
        stream = tokens
        if stream.dim() != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(stream.shape)}")
        if stream.is_floating_point() or stream.is_complex() or stream.dtype == torch.bool:
            raise TypeError(f"tokens must hold integer ids, got dtype {stream.dtype}")
        if stream.dtype not in _KEPT_DTYPES:
            stream = stream.to(torch.int64)
        if stream.numel() < seq_len + 1:
            raise ValueError(
                f"{stream.numel()} tokens are fewer than one block of seq_len + 1 = {seq_len + 1}; "
                "use more text or a shorter seq_len"
            )
        self.seq_len = seq_len
        self.num_tokens = stream.numel()
        self.num_blocks = stream.numel() // (seq_len + 1)
        # Slice off the remainder and copy, so the dataset neither holds the caller's larger
        # buffer alive nor changes if the caller later writes into it.
        self._blocks = stream[: self.num_blocks * (seq_len + 1)].clone().view(self.num_blocks, seq_len + 1)

    def __len__(self) -> int:
        return self.num_blocks

    def target_counts(self, minlength: int) -> np.ndarray:
        """How often each id is a target, which is what a loss over these blocks scores: every
        token but each block's first."""
        return np.bincount(self._blocks[:, 1:].reshape(-1).numpy().astype(np.int64), minlength=minlength)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self._blocks[i].to(torch.int64)  # IndexError out of range, as Dataset requires
        return block[:-1], block[1:]
