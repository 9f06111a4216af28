"""Caption text: one normalisation and one vocabulary, shared by the shard builder, trainer and scorer.

Everything that turns a caption into ids goes through here, so a caption is never normalised two
different ways between training and scoring.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from itsim.io import atomic_write

PAD_ID = 0
UNK_ID = 1
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize(caption: object) -> str:
    """Lowercase, replace every run of non-alphanumerics by one space, trim (the reference's rule).

    Accents and other scripts are not alphanumerics under this rule; that matches the reference
    design, which trained on English Flickr captions.
    """
    if not isinstance(caption, str):
        return ""
    return _NON_ALNUM.sub(" ", caption.lower()).strip()


def tokenize(caption: object) -> list[str]:
    return normalize(caption).split()


class Vocab:
    """Frequency-ordered word list; id 0 is padding, 1 is unknown."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        if self.words[:2] != ["<pad>", "<unk>"]:
            raise ValueError("vocab must start with <pad>, <unk>")
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = 20000) -> "Vocab":
        counts = Counter(tok for c in captions for tok in tokenize(c))
        # Ties broken alphabetically so the same captions always give the same vocab.
        ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max(0, max_size - 2)]
        return cls(["<pad>", "<unk>", *ranked])

    def __len__(self) -> int:
        return len(self.words)

    @property
    def hash(self) -> str:
        return hashlib.sha256("\n".join(self.words).encode()).hexdigest()[:16]

    def encode(self, captions: Sequence[str], max_len: int = 100) -> tuple[np.ndarray, np.ndarray]:
        """Ids int32 [n, max_len] (right-padded with 0, truncated) and lengths int32 [n].

        Lengths are at least 1 (an empty caption becomes one <unk>), since packed LSTMs reject 0.
        """
        ids = np.zeros((len(captions), max_len), dtype=np.int32)
        lengths = np.ones(len(captions), dtype=np.int32)
        for row, caption in enumerate(captions):
            toks = [self.index.get(t, UNK_ID) for t in tokenize(caption)][:max_len] or [UNK_ID]
            ids[row, : len(toks)] = toks
            lengths[row] = len(toks)
        return ids, lengths

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps({"words": self.words, "hash": self.hash}))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        data = json.loads(Path(path).read_text())
        vocab = cls(data["words"])
        if data.get("hash") and data["hash"] != vocab.hash:
            raise ValueError(f"{path}: vocab hash mismatch (file edited or corrupt)")
        return vocab
