"""A deterministic hashing tokenizer and GLUE SST-2 from a prepared TFDS ``data_dir``."""


from __future__ import annotations

import os
import re
import zlib

import numpy as np

from jaxjpq.data.sources import ArraySource
from jaxjpq.data.tfds import open_tfds, read_all

PAD_ID, CLS_ID, SEP_ID, NUM_SPECIAL = 0, 1, 2, 3
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def hash_tokenize(text: str | bytes, max_len: int = 64, vocab_size: int = 30522) -> np.ndarray:
    """Deterministic hashing tokenizer → int32 [max_len]: ``[CLS] tokens... [SEP]`` then 0 pads.

    Lower-cases, splits words and punctuation, maps each token to
    ``NUM_SPECIAL + crc32(token) % (vocab_size - NUM_SPECIAL)``; truncates to ``max_len``.
    """
    if max_len < 2 or vocab_size <= NUM_SPECIAL:
        raise ValueError(f"need max_len >= 2 and vocab_size > {NUM_SPECIAL}.")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    ids = [
        NUM_SPECIAL + zlib.crc32(t.encode("utf-8")) % (vocab_size - NUM_SPECIAL)
        for t in _TOKEN_RE.findall(text.lower())
    ][: max_len - 2]
    out = np.zeros(max_len, np.int32)
    out[: len(ids) + 2] = [CLS_ID, *ids, SEP_ID]
    return out


def load_sst2(
    data_dir: str | os.PathLike, max_len: int = 64, vocab_size: int = 30522
) -> dict[str, ArraySource]:
    """GLUE SST-2 from a prepared TFDS ``glue/sst2``: ``{"train", "validation"}`` splits.

    ``inputs`` int32 [N, max_len] token ids (0 = padding; mask is ``inputs != 0``),
    ``labels`` int32 [N] in {0, 1}.
    """
    out = {}
    for split in ("train", "validation"):
        rows = read_all(open_tfds("glue/sst2", split, data_dir))
        tokens = [hash_tokenize(r["sentence"], max_len, vocab_size) for r in rows]
        out[split] = ArraySource(
            {
                "inputs": np.stack(tokens) if tokens else np.zeros((0, max_len), np.int32),
                "labels": np.array([r["label"] for r in rows], np.int32),
            }
        )
    return out
