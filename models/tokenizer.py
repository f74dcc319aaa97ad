"""The word-level tokenizer of the text tower, with its vocabulary shipped in the repository.

No tokenizer can be downloaded on these machines, and the captions of the built-in datasets use a
closed vocabulary, so words (and single punctuation marks) are the tokens: ``models/vocab.json``
lists them, after ``[pad]`` (id 0) and ``[unk]`` (id 1). Every site and the coordinator read the
same file, so a caption is the same id sequence everywhere; a word not in the file is ``[unk]``,
never an error (a site's own prompt still encodes). The vocabulary's SHA-256 is part of the
model's identity: :attr:`Tokenizer.digest`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import torch

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words_of(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, the units the vocabulary lists."""
    return _TOKEN.findall(text.lower())


class Tokenizer:
    """Text <-> ids over a fixed vocabulary (``[pad]`` = 0, ``[unk]`` = 1)."""

    def __init__(self, vocabulary: Sequence[str]):
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("the vocabulary lists a token twice")
        self.vocabulary = tuple(vocabulary)
        self._ids = {w: i for i, w in enumerate(self.vocabulary)}

    @property
    def size(self) -> int:
        return len(self.vocabulary)

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.vocabulary).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``'s words (``[unk]`` for a word the vocabulary lacks)."""
        return [self._ids.get(w, UNK) for w in words_of(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Words joined by single spaces, padding dropped: ``decode(encode(t))`` is ``t``
        lower-cased with one space between its words and marks, when every word is known."""
        return " ".join(self.vocabulary[int(i)] for i in ids if int(i) != PAD)

    def batch(self, texts: Sequence[str], length: int | None = None) -> torch.Tensor:
        """``(len(texts), length)`` ids, right-padded (default length: the longest text)."""
        encoded = [self.encode(t) for t in texts]
        longest = max((len(e) for e in encoded), default=1)
        length = max(longest, 1) if length is None else length
        if longest > length:
            raise ValueError(f"a text has {longest} tokens, more than length={length}")
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for row, ids in enumerate(encoded):
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The tokenizer of ``models/vocab.json`` (shipped as package data)."""
    text = resources.files("fedcl.models").joinpath("vocab.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return Tokenizer([*data["special"], *data["words"]])
