"""Weighted mixtures of sources with Megatron-LM's blended-dataset semantics.

Megatron (megatron/core/datasets/blended_dataset.py, helpers.cpp `build_blending_indices`) assigns
sample n of the blended stream to the source whose count lags its share the most: with weights w
normalised to sum 1 and c_i(n) the samples source i got before n,

    source(n) = argmax_i  w_i * max(n, 1) - c_i(n)        (first index on ties)

so every window of consecutive samples, and therefore every global batch, holds each source's
share up to one sample, and the stream is a pure function of the weights. Each sample is a whole
sequence of one source ("within one sequence"): sources are never spliced inside a sequence.
A source's own sequences are visited in a fresh seeded permutation each time it is exhausted (its
epochs), so the blend needs no source to be larger than its share of the run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    return w / w.sum()


def blending_indices_reference(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each sample, its index within that source) for the first `size` samples: a line
    by line transcription of Megatron's helpers.cpp build_blending_indices. Slow; kept as the
    definition that `blending_indices` is tested against."""
    w = _normalised(weights)
    source = np.zeros(size, dtype=np.int64)
    within = np.zeros(size, dtype=np.int64)
    current = np.zeros(len(w), dtype=np.int64)
    for n in range(size):
        n_double = max(float(n), 1.0)
        best, best_error = 0, w[0] * n_double - current[0]
        for i in range(1, len(w)):
            error = w[i] * n_double - current[i]
            if error > best_error:
                best, best_error = i, error
        source[n] = best
        within[n] = current[best]
        current[best] += 1
    return source, within


class BlendIndex:
    """The same assignment, computed incrementally: `extend(size)` continues from where the last
    call stopped, so a run that trains past one pass over its data (or resumes) computes only the
    samples it reaches. Plain Python floats in the loop: no numpy scalar per step."""

    def __init__(self, weights: Sequence[float]):
        self.weights = [float(x) for x in _normalised(weights)]
        self.counts = [0] * len(self.weights)
        self.source = np.zeros(0, dtype=np.int64)
        self.within = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.source)

    def extend(self, size: int) -> None:
        start = len(self.source)
        if size <= start:
            return
        w, counts = self.weights, self.counts
        k = len(w)
        sources, withins = [0] * (size - start), [0] * (size - start)
        for n in range(start, size):
            n_double = n if n > 1 else 1.0
            best, best_error = 0, w[0] * n_double - counts[0]
            for i in range(1, k):
                error = w[i] * n_double - counts[i]
                if error > best_error:
                    best, best_error = i, error
            sources[n - start] = best
            withins[n - start] = counts[best]
            counts[best] += 1
        self.source = np.concatenate([self.source, np.asarray(sources, dtype=np.int64)])
        self.within = np.concatenate([self.within, np.asarray(withins, dtype=np.int64)])


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    index = BlendIndex(weights)
    index.extend(size)
    return index.source, index.within


class BlendedSequences(Dataset):
    """Training sequences drawn from several sources by weight.

    `sources`: datasets of (x, y) sequences (PackedSequences over an in-memory array or a memmap).
    `limits[i]`: at most this many of source i's sequences are ever used (its max_tokens), the
    first ones of a fixed seeded permutation, so a cap keeps sequences from all of the source.
    Item g (any g >= 0; len() is one pass over all sources' sequences) is the blend's g-th sample;
    a loader walks g = 0, 1, 2, ... (moeplat.data.resumable, order="stream"): the blend, not the
    sampler, decides the order.
    """

    def __init__(
        self,
        sources: Sequence[Dataset],
        weights: Sequence[float],
        *,
        seed: int,
        limits: Sequence[int | None] | None = None,
    ):
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        self.sources = list(sources)
        self.seed = seed
        limits = list(limits) if limits is not None else [None] * len(sources)
        self.sizes = [len(s) if lim is None else min(len(s), lim) for s, lim in zip(sources, limits)]
        if any(n < 1 for n in self.sizes):
            raise ValueError(f"every source needs at least one sequence, got sizes {self.sizes}")
        # The kept subset of a capped source: a prefix of one seeded permutation of all its sequences.
        self._kept = [
            None if n == len(s) else _permutation(len(s), seed, i, -1)[:n]
            for i, (s, n) in enumerate(zip(sources, self.sizes))
        ]
        self.index = BlendIndex(weights)
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, g: int) -> tuple[int, int]:
        """(source, sequence index within that source's dataset) of blended sample g."""
        if g < 0:
            raise IndexError(f"blended sample index must be >= 0, got {g}")
        if g >= len(self.index):
            self.index.extend(max(2 * len(self.index), g + 1, 1024))
        s, j = int(self.index.source[g]), int(self.index.within[g])
        n = self.sizes[s]
        epoch, pos = divmod(j, n)
        key = (s, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            perm = _permutation(n, self.seed, s, epoch)
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != s}
            self._perm_cache[key] = perm
        local = int(perm[pos])
        kept = self._kept[s]
        return s, local if kept is None else int(kept[local])

    def __getitem__(self, g: int):
        s, i = self.locate(int(g))
        return self.sources[s][i]


def _permutation(n: int, seed: int, source: int, epoch: int) -> torch.Tensor:
    # A hash, not arithmetic on the seed: any (seed, source, epoch) gets its own in-range seed.
    digest = hashlib.sha256(f"blend:{seed}:{source}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=generator)
