"""Byte-level tokenizer: token id = byte value.

Bytes need no training step and no vocabulary file, and every text (any language, any encoding,
even binary) is representable, so a run's data pipeline has nothing to fit or to ship with a
checkpoint. The price is longer sequences than a subword vocabulary would give.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from moeplat.data.corpus import Document

# Between documents: a NUL byte, which source and prose text practically never contain, framed
# by newlines so the model sees a document boundary as the end of a line, as it usually is.
DEFAULT_SEPARATOR = b"\n\x00\n"


class ByteTokenizer:
    """Maps bytes to ids 0..255 and back."""

    vocab_size = 256

    def encode(self, data: bytes | str) -> np.ndarray:
        """Ids of `data` as a writable uint8 array; a str is taken as its UTF-8 bytes."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        """Text of `ids` (array, tensor or list); bytes that are not valid UTF-8 become U+FFFD.

        A model can emit any byte sequence, including a multi-byte character cut in half, so
        decoding must never fail.
        """
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(
                f"byte token ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]"
            )
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def encode_documents(
        self, docs: Iterable[Document], *, separator: bytes = DEFAULT_SEPARATOR
    ) -> np.ndarray:
        """One uint8 stream of all documents, in order, with `separator` between neighbours."""
        return self.encode(separator.join(doc.data for doc in docs))
