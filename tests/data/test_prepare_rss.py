"""Training from prepared shards reads them through np.memmap: resident memory does not grow with
the corpus. Real text: the standard library's sources, repeated to the size (moeplat.bench.data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeplat.bench.data import peak_rss_of_run, repeated_corpus

MiB = 2**20
TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny.yaml"


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS")).split()[1]) * 1024


def _spec(path: Path, corpus: Path, steps: int) -> Path:
    path.write_text(
        f"extends: {TINY}\nname: rss\ndata:\n  source: {{kind: prepared, path: '{corpus}'}}\n"
        f"train: {{max_steps: {steps}, val_every: {steps}}}\nparallel: {{accelerator: cpu}}\n"
    )
    return path


def test_a_200_mb_corpus_adds_nothing_to_resident_memory(tmp_path):
    from moeplat.compile.data import build_data
    from moeplat.spec import load_spec

    corpus = repeated_corpus(tmp_path / "big", 200 * MiB, shard_tokens=50 * MiB)
    loaded = load_spec(_spec(tmp_path / "s.yaml", corpus, 4))
    before = _rss()
    dm, info = build_data(loaded.spec, loaded.base_dir)
    assert info.train_tokens == 200 * MiB
    batches = iter(dm.train_dataloader())
    for _ in range(50):  # random blocks from all over the 200 MB
        next(batches)
    for _ in dm.val_dataloader():
        pass
    grown = _rss() - before
    # What does scale with the corpus: the epoch's shuffled block order, 4 bytes per block of
    # seq_len + 1 = 33 tokens (24 MiB here; about 30 MiB for 1e9 tokens at the quick-start's 129).
    # The in-memory path would hold the 200 MiB stream, and mapped shards read at random used to
    # add a page-cache folio (up to 2 MiB) per block read.
    order = 4 * len(dm.train_set)
    assert grown - order < 16 * MiB, f"resident memory grew by {grown / MiB:.1f} MiB"


@pytest.mark.slow
def test_peak_rss_of_a_run_on_200_mb_is_that_of_a_run_on_10_mb(tmp_path):
    peaks = {}
    for name, tokens in (("small", 10 * MiB), ("big", 200 * MiB)):
        corpus = repeated_corpus(tmp_path / name, tokens, shard_tokens=50 * MiB)
        work = tmp_path / f"run-{name}"
        work.mkdir()
        peaks[name] = peak_rss_of_run(_spec(work / "spec.yaml", corpus, 6), work)
    assert peaks["big"] - peaks["small"] < 50 * MiB, {k: v / MiB for k, v in peaks.items()}


def test_the_int32_epoch_order_is_the_int64_permutation():
    """The resumable sampler draws its order as int32 (half the memory of a corpus's block order);
    runs from before, and the in-memory path's tests, rely on it being the int64 permutation."""
    import torch

    from moeplat.data.resumable import EpochPermutationSampler

    for n in (7, 1000, 3_000_001):
        sampler = EpochPermutationSampler(n, seed=11, rank=0, world_size=1)
        sampler.epoch = 2
        generator = torch.Generator().manual_seed(11 * 1_000_003 + 2)
        assert list(sampler) == torch.randperm(n, generator=generator).tolist()
