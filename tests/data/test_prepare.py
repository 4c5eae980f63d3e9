"""`moeplat data prepare`: shards hold exactly the in-memory token streams, are reused while the
fingerprint matches, re-prepared (saying why) when it does not, never read while half-written, and
an interrupted prepare resumes. Real text throughout: the standard library's sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplat.data.corpus import python_stdlib_documents, split_documents
from moeplat.data.dataset import PackedSequences
from moeplat.data.prepare import SourceSplits, prepare
from moeplat.data.shards import MANIFEST, MemmapSequences, open_prepared, read_manifest, token_dtype
from moeplat.data.tokenizers import ByteTok, train_bpe

SHARD = 64 * 1024  # small shards: many per split, blocks straddling shard boundaries


@pytest.fixture(scope="module")
def corpus():
    docs = python_stdlib_documents(max_bytes=600_000)
    train, val = split_documents(docs, val_fraction=0.1, seed=0)
    return [SourceSplits("main", train, val)]


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    return train_bpe(corpus[0].train, vocab_size=600, cache_dir=tmp_path_factory.mktemp("bpe"))


def _streams(root):
    _, splits = open_prepared(root)
    return {name: {s: sp.stream() for s, sp in by.items()} for name, by in splits.items()}


def test_token_dtype_follows_the_vocabulary():
    assert [token_dtype(v).name for v in (256, 257, 65536, 65537)] == ["uint8", "uint16", "uint16", "uint32"]


@pytest.mark.parametrize("workers", [1, 2])
def test_byte_shards_are_the_in_memory_stream(corpus, tmp_path, workers):
    result = prepare(
        corpus, ByteTok(), 256, tmp_path / "p", workers=workers, shard_bytes=SHARD, progress=False
    )
    assert result.action == "prepared" and result.shards_written > 4
    tok = ByteTok()
    streams = _streams(tmp_path / "p")["main"]
    for split, docs in (("train", corpus[0].train), ("val", corpus[0].val)):
        expected = tok.encode_documents(docs)
        assert streams[split].dtype == np.uint8
        assert np.array_equal(streams[split], expected)
    _, splits = open_prepared(tmp_path / "p")
    train = splits["main"]["train"]
    assert np.array_equal(train.counts(), np.bincount(streams["train"], minlength=256))
    assert train.num_documents == len(corpus[0].train)
    assert train.text_bytes == sum(len(d.data) for d in corpus[0].train)


def test_document_index_points_at_each_document(corpus, tmp_path):
    prepare(corpus, ByteTok(), 256, tmp_path, shard_bytes=SHARD, progress=False)
    _, splits = open_prepared(tmp_path)
    docs = iter(corpus[0].train)
    sep = ByteTok.separator
    for k, shard in enumerate(splits["main"]["train"].shards):
        tokens = np.fromfile(tmp_path / f"{shard.stem}.tokens", dtype=np.uint8)
        offsets = np.fromfile(tmp_path / f"{shard.stem}.index", dtype=np.uint64)
        assert offsets[0] == 0 and offsets[-1] == tokens.size and len(offsets) == shard.documents + 1
        for j in range(shard.documents):
            record = tokens[offsets[j] : offsets[j + 1]].tobytes()
            prefix = b"" if (k, j) == (0, 0) else sep  # separator between neighbours only
            assert record == prefix + next(docs).data


def test_bpe_shards_are_encode_documents_in_uint16(corpus, bpe, tmp_path):
    prepare(corpus, bpe, bpe.vocab_size, tmp_path, workers=2, shard_bytes=SHARD, progress=False)
    streams = _streams(tmp_path)["main"]
    assert streams["train"].dtype == np.uint16
    assert np.array_equal(streams["train"], bpe.encode_documents(corpus[0].train))
    assert np.array_equal(streams["val"], bpe.encode_documents(corpus[0].val))
    manifest = read_manifest(tmp_path)
    assert manifest["separator"] == [bpe.eos_id]
    assert (tmp_path / manifest["tokenizer"]["file"]).is_file()  # the corpus can be decoded


@pytest.mark.parametrize("seq_len", [7, 50, 127])
def test_memmap_sequences_cut_the_blocks_packed_sequences_cuts(corpus, tmp_path, seq_len):
    prepare(corpus, ByteTok(), 256, tmp_path, shard_bytes=SHARD, progress=False)
    _, splits = open_prepared(tmp_path)
    train = splits["main"]["train"]
    fast = MemmapSequences(train.token_paths(), train.dtype, seq_len)
    reference = PackedSequences(ByteTok().encode_documents(corpus[0].train), seq_len)
    assert len(fast) == len(reference) and fast.num_tokens == reference.num_tokens
    starts = np.cumsum([s.tokens for s in train.shards])
    straddling = [int(s // (seq_len + 1)) for s in starts[:-1]]  # blocks across a shard boundary
    for i in [0, 1, len(fast) - 1, -1, *straddling, *range(3, len(fast), max(len(fast) // 50, 1))]:
        (x, y), (rx, ry) = fast[i], reference[i]
        assert x.dtype == torch.int64 and torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(IndexError):
        fast[len(fast)]


def test_reused_while_the_fingerprint_matches_else_prepared_again_saying_why(corpus, bpe, tmp_path):
    kw = {"shard_bytes": SHARD, "progress": False}
    assert prepare(corpus, ByteTok(), 256, tmp_path, **kw).action == "prepared"
    again = prepare(corpus, ByteTok(), 256, tmp_path, **kw)
    assert (again.action, again.shards_written) == ("reused", 0)

    fewer = [SourceSplits("main", corpus[0].train[:-1], corpus[0].val)]
    changed = prepare(fewer, ByteTok(), 256, tmp_path, **kw)
    assert (changed.action, changed.reason) == ("re-prepared", "sources changed")
    assert np.array_equal(_streams(tmp_path)["main"]["train"], ByteTok().encode_documents(fewer[0].train))

    other_tok = prepare(fewer, bpe, bpe.vocab_size, tmp_path, **kw)
    assert (other_tok.action, other_tok.reason) == ("re-prepared", "tokenizer changed")
    assert read_manifest(tmp_path)["dtype"] == "uint16"

    split = prepare(corpus, ByteTok(), 256, tmp_path, split_settings={"val_fraction": 0.2}, **kw)
    assert split.reason == "sources and tokenizer changed"


def test_a_half_written_prepare_is_never_read_and_resumes(corpus, tmp_path):
    class Crash(Exception):
        pass

    recorded = []

    def crash_after_three(shard):
        recorded.append(shard.stem)
        if len(recorded) == 3:
            raise Crash

    with pytest.raises(Crash):
        prepare(
            corpus, ByteTok(), 256, tmp_path, shard_bytes=SHARD, progress=False, on_shard=crash_after_three
        )
    manifest = read_manifest(tmp_path)
    assert not manifest["complete"] and len(manifest["sources"]["main"]["shards"]["train"]) == 3
    with pytest.raises(ValueError, match="unfinished prepare"):
        open_prepared(tmp_path)
    # what a kill leaves besides: a shard written but not yet listed, a file caught mid-write
    (tmp_path / "main/train/00009.tokens").write_bytes(b"partial")
    (tmp_path / "main/train/00004.tokens.tmp").write_bytes(b"partial")
    resumed = prepare(corpus, ByteTok(), 256, tmp_path, shard_bytes=SHARD, progress=False)
    assert resumed.action == "resumed" and resumed.shards_written == len(_all_shards(tmp_path)) - 3
    assert not list(tmp_path.rglob("*.tmp"))
    assert np.array_equal(_streams(tmp_path)["main"]["train"], ByteTok().encode_documents(corpus[0].train))


def test_a_listed_shard_that_lost_its_file_is_written_again(corpus, tmp_path):
    prepare(corpus, ByteTok(), 256, tmp_path, shard_bytes=SHARD, progress=False)
    (tmp_path / "main/train/00001.tokens").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="missing or truncated"):
        open_prepared(tmp_path)
    manifest = read_manifest(tmp_path)
    manifest["complete"] = False  # as a prepare that died would leave it
    (tmp_path / MANIFEST).write_text(__import__("json").dumps(manifest))
    again = prepare(corpus, ByteTok(), 256, tmp_path, shard_bytes=SHARD, progress=False)
    assert again.shards_written == 1
    assert np.array_equal(_streams(tmp_path)["main"]["train"], ByteTok().encode_documents(corpus[0].train))


def test_a_directory_that_is_not_a_prepare_is_refused(corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare(corpus, ByteTok(), 256, tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _all_shards(root):
    m = read_manifest(root)
    return [s for e in m["sources"].values() for shards in e["shards"].values() for s in shards]
