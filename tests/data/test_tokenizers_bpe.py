"""Byte-level BPE (moeplat.data.tokenizers): trained on real text, cached by corpus and settings,
EOS exactly between packed documents, exact UTF-8 byte counts per token, and the byte tokenizer
behind the same interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeplat.data.corpus import Document, python_stdlib_documents, split_documents
from moeplat.data.tokenizers import ByteTok, bpe_cache_key, train_bpe


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return python_stdlib_documents(max_bytes=300_000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bpe(docs, cache):
    return train_bpe(docs, vocab_size=600, cache_dir=cache)


def test_trains_to_the_vocab_size_with_eos_first(bpe):
    assert bpe.vocab_size == 600 and not bpe.cached
    assert bpe.eos_id == 0 and bpe.tok.id_to_token(0) == "<|endoftext|>"
    assert bpe.token_bytes[0] == 0  # EOS stands for no text


def test_is_cached_by_corpus_and_settings(docs, cache, bpe):
    again = train_bpe(docs, vocab_size=600, cache_dir=cache)
    assert again.cached and again.fingerprint == bpe.fingerprint
    key = bpe_cache_key(docs, 600, 2, ["<|endoftext|>"])
    assert (cache / "tokenizers" / key / "tokenizer.json").is_file()
    assert not list((cache / "tokenizers").rglob("*.tmp"))  # atomic: no temporary left behind
    for other in (
        bpe_cache_key(docs[1:], 600, 2, ["<|endoftext|>"]),
        bpe_cache_key(docs, 601, 2, ["<|endoftext|>"]),
        bpe_cache_key(docs, 600, 3, ["<|endoftext|>"]),
        bpe_cache_key(docs, 600, 2, ["<|endoftext|>", "<pad>"]),
    ):
        assert other != key


def test_settings_change_the_tokenizer(docs, tmp_path, bpe):
    rare = train_bpe(docs, vocab_size=600, min_frequency=400, cache_dir=tmp_path)
    assert rare.vocab_size < 600  # few pairs occur 400 times in 300 kB
    two = train_bpe(docs, vocab_size=600, special_tokens=["<|end|>", "<pad>"], cache_dir=tmp_path)
    assert two.tok.id_to_token(1) == "<pad>" and two.eos_id == 0 and two.token_bytes[:2].tolist() == [0, 0]


def test_eos_lies_exactly_between_documents(docs, bpe):
    some = docs[:4]
    ids = bpe.encode_documents(some)
    assert ids.dtype == np.int32 and ids.max() < bpe.vocab_size
    cuts = np.flatnonzero(ids == bpe.eos_id)
    assert len(cuts) == len(some) - 1
    pieces = np.split(ids, cuts)
    texts = [bpe.decode(pieces[0])] + [bpe.decode(p[1:]) for p in pieces[1:]]
    assert texts == [d.data.decode() for d in some]
    assert bpe.decode(ids) == "<|endoftext|>".join(d.data.decode() for d in some)


def test_a_documents_own_eos_spelling_is_text(bpe):
    doc = Document("x.py", b"s = '<|endoftext|>'\n")
    ids = bpe.encode_documents([doc, doc])
    assert (ids == bpe.eos_id).sum() == 1  # only the one packed between them
    assert bpe.decode(ids) == "s = '<|endoftext|>'\n<|endoftext|>s = '<|endoftext|>'\n"


def test_token_bytes_count_utf8_exactly(docs, bpe):
    texts = [d.data.decode() for d in docs[:20]] + ["naïve café, 日本語, emoji 🙂 and ∑ x²"]
    for text, ids in zip(texts, bpe.encode_texts(texts)):
        assert bpe.token_bytes[ids].sum() == len(text.encode("utf-8"))


def test_trained_on_what_it_is_given_only(docs, tmp_path):
    train, _val = split_documents(docs, val_fraction=0.2, seed=0)
    tok = train_bpe(train, vocab_size=600, cache_dir=tmp_path)
    assert (tmp_path / "tokenizers" / bpe_cache_key(train, 600, 2, ["<|endoftext|>"])).is_dir()
    assert not (tmp_path / "tokenizers" / bpe_cache_key(docs, 600, 2, ["<|endoftext|>"])).exists()
    assert tok.vocab_size == 600


def test_saves_a_loadable_tokenizer_json(bpe, tmp_path):
    from tokenizers import Tokenizer

    path = bpe.save(tmp_path / "run")
    assert path == tmp_path / "run" / "tokenizer.json"
    text = "def f(x):\n    return x + 1\n"
    assert Tokenizer.from_file(str(path)).encode(text).ids == bpe.encode_texts([text])[0].tolist()


def test_byte_tokenizer_behind_the_same_interface(docs):
    tok = ByteTok()
    some = docs[:3]
    ids = tok.encode_documents(some)
    assert ids.tobytes() == b"\n\x00\n".join(d.data for d in some)  # today's separator
    assert tok.token_bytes[ids].sum() == len(ids)  # every byte, the separator's too
    assert tok.save("unused") is None


def test_training_is_deterministic(docs, tmp_path, bpe):
    """A cleared cache gives the same tokenizer back: a run's ids keep their meaning."""
    assert train_bpe(docs, vocab_size=600, cache_dir=tmp_path).fingerprint == bpe.fingerprint
