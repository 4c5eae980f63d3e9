"""Document-level train/val split on the real stdlib corpus."""

from __future__ import annotations

import hashlib

import pytest

from moeplat.data import Document, python_stdlib_documents, split_documents


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return python_stdlib_documents()


def test_split_is_deterministic_disjoint_and_complete(docs):
    train, val = split_documents(docs, val_fraction=0.05, seed=0)
    again = split_documents(list(reversed(docs)), val_fraction=0.05, seed=0)
    assert (train, val) == again
    train_names, val_names = {d.name for d in train}, {d.name for d in val}
    assert not train_names & val_names
    assert train_names | val_names == {d.name for d in docs}
    assert [d.name for d in val] == sorted(val_names)


def test_split_follows_the_documented_hash_rule(docs):
    _, val = split_documents(docs, val_fraction=0.3, seed=7)
    expected = {
        d.name for d in docs if int(hashlib.sha1(f"7:{d.name}".encode()).hexdigest(), 16) / 2**160 < 0.3
    }
    assert {d.name for d in val} == expected


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_split_fraction_is_approximately_kept(docs, fraction):
    _, val = split_documents(docs, val_fraction=fraction, seed=0)
    # Hundreds of documents: the binomial spread of the count is a few percent at most.
    assert abs(len(val) / len(docs) - fraction) < 0.04


def test_seed_changes_the_split(docs):
    _, val0 = split_documents(docs, val_fraction=0.1, seed=0)
    _, val1 = split_documents(docs, val_fraction=0.1, seed=1)
    assert {d.name for d in val0} != {d.name for d in val1}


def test_adding_documents_does_not_move_existing_ones(docs):
    half = docs[::2]
    _, val_half = split_documents(half, val_fraction=0.1, seed=3)
    _, val_all = split_documents(docs, val_fraction=0.1, seed=3)
    assert {d.name for d in val_half} == {d.name for d in val_all} & {d.name for d in half}


def test_two_documents_always_give_two_non_empty_sides():
    pair = [Document("one.txt", b"1"), Document("two.txt", b"2")]
    key = {d.name: int(hashlib.sha1(f"0:{d.name}".encode()).hexdigest(), 16) for d in pair}
    for fraction in (1e-12, 1 - 1e-12):
        train, val = split_documents(pair, val_fraction=fraction, seed=0)
        assert len(train) == 1 and len(val) == 1
    train, val = split_documents(pair, val_fraction=1e-12, seed=0)
    assert val[0].name == min(key, key=key.get)  # the smallest key moved to val
    train, val = split_documents(pair, val_fraction=1 - 1e-12, seed=0)
    assert train[0].name == max(key, key=key.get)  # the largest key moved to train


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_outside_open_interval_is_an_error(docs, fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, val_fraction=fraction, seed=0)
