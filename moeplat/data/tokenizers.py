"""Tokenizers behind one small interface, `Tok`: bytes, byte-level BPE trained with Hugging Face
`tokenizers`, and any `tokenizer.json` (a file, a transformers directory or a Hub cache snapshot).

The interface other code uses (compile, prepare, mixtures):

    tok.vocab_size        ids produced lie in [0, vocab_size); a model may pad its vocabulary above
    tok.eos_id            the id packed between documents (byte: the NUL of the separator "\\n\\0\\n")
    tok.token_bytes       int array [vocab_size]: UTF-8 bytes of text each id stands for; special
                          tokens (EOS) count 0, so bits per byte are per byte of the documents' text
                          (byte tokenizer: every id, the separator's included, is one byte)
    tok.encode_texts(texts) -> list[np.ndarray]  batch encoding (tokenizers' Rust encode_batch_fast)
    tok.encode_documents(docs) -> np.ndarray     one stream, EOS between neighbouring documents
    tok.decode(ids) -> str
    tok.save(dir) -> Path | None                 writes dir/tokenizer.json (byte: nothing, ids are bytes)
    tok.fingerprint       short hash of the tokenizer (its JSON), for caches and prepared corpora

Streams are int32 for a learned vocabulary (PackedSequences keeps int32 as is), uint8 for bytes.
Text containing a special token's spelling (e.g. "<|endoftext|>" inside a document) is encoded as
ordinary text: only the packing inserts EOS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moeplat.data.corpus import Document, corpus_fingerprint
from moeplat.data.tokenizer import DEFAULT_SEPARATOR, ByteTokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# Bumped when the training recipe below changes, so old cache entries are not reused.
_BPE_RECIPE = "bytelevel-bpe-v1"


def cache_root() -> Path:
    """$MOEPLAT_CACHE_DIR, else ~/.cache/moeplat."""
    env = os.environ.get("MOEPLAT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moeplat"


def _doc_text(doc: Document) -> str:
    # Non-UTF-8 bytes become U+FFFD: the text that is encoded is the text whose bytes are counted.
    return doc.data.decode("utf-8", errors="replace")


class ByteTok:
    """Today's byte tokenizer behind the `Tok` interface: id = byte, separator b"\\n\\0\\n"."""

    kind = "byte"
    vocab_size = 256
    eos_id = 0
    fingerprint = "byte"
    separator = DEFAULT_SEPARATOR
    cached = False

    def __init__(self) -> None:
        self._bytes = ByteTokenizer()
        self.token_bytes = np.ones(256, dtype=np.int64)

    def encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._bytes.encode(t) for t in texts]

    def encode_documents(self, docs: Iterable[Document]) -> np.ndarray:
        return self._bytes.encode_documents(docs, separator=self.separator)

    def decode(self, ids) -> str:
        return self._bytes.decode(ids)

    def save(self, directory: str | Path) -> Path | None:
        return None

    def to_tokenizers(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (for a transformers export): GPT-2's
        byte-to-unicode alphabet with id = byte value and no merges, no regex split, so encoding
        any text gives exactly its UTF-8 bytes and decoding joins them back. Byte 0 stays an
        ordinary token (the packing's EOS is the NUL byte inside the separator)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins, unordered
        by_byte = {ch: _gpt2_byte(ch) for ch in alphabet}
        tok = Tokenizer(models.BPE(vocab=by_byte, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return tok


def _gpt2_byte(ch: str) -> int:
    """The byte GPT-2's bytes_to_unicode maps to `ch` (Radford et al. 2019's reversible table:
    printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if ord(ch) in printable:
        return ord(ch)
    others = [b for b in range(256) if b not in printable]
    return others[ord(ch) - 256]


class HFTok:
    """A `tokenizers.Tokenizer` behind the `Tok` interface."""

    def __init__(
        self, tokenizer, *, kind: str, eos_id: int, cached: bool = False, path: Path | None = None
    ) -> None:
        self.tok = tokenizer
        self.path = path  # the file it was read from or cached at
        self.tok.encode_special_tokens = True  # a document's "<|endoftext|>" is text, not EOS
        self.kind = kind
        self.eos_id = eos_id
        self.cached = cached
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        blob = tokenizer.to_str().encode()
        self.fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        self.token_bytes = token_byte_lengths(tokenizer)

    def encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def encode_documents(self, docs: Iterable[Document]) -> np.ndarray:
        parts = self.encode_texts([_doc_text(d) for d in docs])
        if not parts:
            return np.zeros(0, dtype=np.int32)
        eos = np.asarray([self.eos_id], dtype=np.int32)
        out = [parts[0]]
        for p in parts[1:]:
            out += [eos, p]
        return np.concatenate(out)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        _atomic_write(path, self.tok.to_str(pretty=True))
        return path


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each id decodes to; 0 for special tokens.

    Exact for byte-level vocabularies (this module's BPE, GPT-2/Llama-3-style tokenizer.json): each
    token's characters map back to bytes through GPT-2's byte-to-unicode table, so the lengths of a
    text's tokens sum to its UTF-8 length. Other tokenizers (SentencePiece-style "▁" pieces,
    WordPiece "##") are approximated by decoding each id alone.
    """
    from tokenizers import pre_tokenizers

    n = tokenizer.get_vocab_size(with_added_tokens=True)
    out = np.zeros(n, dtype=np.int64)
    added = tokenizer.get_added_tokens_decoder()
    byte_level = json.loads(tokenizer.to_str()).get("decoder", {}) or {}
    byte_level = byte_level.get("type") == "ByteLevel"
    alphabet = set(pre_tokenizers.ByteLevel.alphabet()) if byte_level else set()
    for i in range(n):
        if i in added:
            out[i] = 0 if added[i].special else len(added[i].content.encode())
            continue
        piece = tokenizer.id_to_token(i)
        if piece is None:
            continue
        if byte_level and set(piece) <= alphabet:
            out[i] = len(piece)  # one character of the byte-level alphabet per byte
        else:
            out[i] = len(tokenizer.decode([i]).encode())
    return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bpe_cache_key(
    train_docs: Sequence[Document], vocab_size: int, min_frequency: int, special_tokens: Sequence[str]
) -> str:
    """Cache key of a trained BPE: the training documents' fingerprint and every training setting."""
    import tokenizers

    blob = json.dumps(
        {
            "recipe": _BPE_RECIPE,
            "tokenizers": tokenizers.__version__,
            "corpus": corpus_fingerprint(train_docs),
            "vocab_size": vocab_size,
            "min_frequency": min_frequency,
            "special_tokens": list(special_tokens),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def train_bpe(
    train_docs: Sequence[Document],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    cache_dir: str | Path | None = None,
    show_progress: bool = False,
) -> HFTok:
    """Byte-level BPE (GPT-2's scheme) trained on `train_docs` only; special_tokens[0] is EOS.

    Trained once per (documents' fingerprint, settings) and cached at
    `<cache_dir or cache_root()>/tokenizers/<key>/tokenizer.json`; later calls load that file (and
    log that they did). `vocab_size` counts the 256 byte symbols and the special tokens; a small
    corpus may stop with fewer merges, so the result can be smaller, never larger.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(special_tokens)
    key = bpe_cache_key(train_docs, vocab_size, min_frequency, specials)
    path = Path(cache_dir or cache_root()) / "tokenizers" / key / TOKENIZER_FILE
    if path.is_file():
        log.info("BPE tokenizer taken from the cache: %s", path)
        return HFTok(Tokenizer.from_file(str(path)), kind="bpe", eos_id=0, cached=True, path=path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator((_doc_text(d) for d in train_docs), trainer, length=len(train_docs))
    eos_id = tok.token_to_id(specials[0])
    assert eos_id == 0, eos_id  # the trainer numbers special tokens first
    _atomic_write(path, tok.to_str(pretty=True))
    log.info("BPE tokenizer trained on %d documents, cached at %s", len(train_docs), path)
    return HFTok(tok, kind="bpe", eos_id=eos_id, path=path)


# Spellings of an end-of-text token, tried in order when neither the spec nor a
# tokenizer_config.json names one.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")


def load_tokenizer_file(path: str | Path, *, eos_token: str | None = None) -> HFTok:
    """A `tokenizer.json` (`path` the file, or a directory holding it, e.g. a transformers
    save_pretrained directory or a Hub snapshot). EOS: `eos_token`, else tokenizer_config.json's
    eos_token next to the file, else the first of EOS_CANDIDATES that is a special token.
    Raises ValueError (with what to do) when the file does not load or no EOS is found."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception on bad JSON
        raise ValueError(f"{file} is not a tokenizers tokenizer.json ({e})") from None
    name = eos_token or _config_eos(file.parent)
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    if name is None:
        name = next((c for c in EOS_CANDIDATES if c in specials), None)
    eos_id = tok.token_to_id(name) if name is not None else None
    if eos_id is None:
        found = f"token {name!r} is not in its vocabulary" if name else "it names no end-of-text token"
        raise ValueError(
            f"{file}: {found}; set data.tokenizer.eos_token to one of its special tokens "
            f"{sorted(specials)[:10]}"
        )
    return HFTok(tok, kind="hf", eos_id=eos_id, path=file)


def _config_eos(directory: Path) -> str | None:
    cfg = directory / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
