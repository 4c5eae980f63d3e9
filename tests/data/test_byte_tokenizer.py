"""Byte-level tokenizer round trips, including multi-byte UTF-8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeplat.data import ByteTokenizer, Document

TEXT = "naïve café — 日本語 🙂 Ωmega\n\ttabs"


def test_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT.encode("utf-8"))
    assert ids.dtype == np.uint8
    assert ids.tolist() == list(TEXT.encode("utf-8"))
    assert len(ids) > len(TEXT)  # multi-byte characters take several tokens
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == TEXT
    assert tok.decode(ids.tolist()) == TEXT
    assert tok.encode(TEXT).tolist() == ids.tolist()


def test_encoded_array_is_writable_and_independent():
    data = b"abc"
    ids = ByteTokenizer().encode(data)
    ids[0] = 0
    assert data == b"abc"


def test_decode_never_fails_on_cut_characters():
    tok = ByteTokenizer()
    ids = tok.encode("日".encode())  # three bytes
    assert tok.decode(ids[:2]) == "\ufffd"
    assert tok.decode(np.array([], dtype=np.uint8)) == ""


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        ByteTokenizer().decode([65, 256])


def test_encode_documents_puts_separator_between_documents():
    tok = ByteTokenizer()
    docs = [Document("a", b"first"), Document("b", "zwéi".encode()), Document("c", b"")]
    stream = tok.encode_documents(docs)
    assert stream.tobytes() == b"first\n\x00\nzw\xc3\xa9i\n\x00\n"
    assert tok.encode_documents(docs, separator=b"|").tobytes() == "first|zwéi|".encode()
    assert tok.encode_documents([]).size == 0
    assert ByteTokenizer.vocab_size == 256


def test_the_byte_tokenizer_as_a_tokenizers_object_encodes_exactly_the_bytes():
    """What a transformers export ships for a byte-level run: id = byte value, every text."""
    from moeplat.data.tokenizers import ByteTok

    tok = ByteTok()
    fast = tok.to_tokenizers()
    assert fast.get_vocab_size() == 256
    for text in ["plain ascii", "  two  spaces\n\ttab", "héllo ✓ Ā \x00 NUL", "def f():\n    return 1\n"]:
        ids = fast.encode(text).ids
        assert ids == list(text.encode()) == tok.encode_texts([text])[0].tolist()
        assert fast.decode(ids) == text == tok.decode(ids)
    assert fast.encode(bytes(range(256)).decode("latin-1")).ids == list(
        bytes(range(256)).decode("latin-1").encode()
    )
