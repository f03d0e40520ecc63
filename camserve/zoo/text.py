"""Word vocabularies for the captioner and the VQA model (001 sec. 2.2-2.3).

Text is lower-cased and split into words (punctuation dropped); unknown words
map to ``<unk>``. Id 0 is always ``<pad>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from camserve.errors import InvalidRequestError
from camserve.zoo.scenes import COLOURS, COUNT_WORDS, SHAPES

__all__ = [
    "ANSWERS",
    "BOS",
    "CAPTION_WORDS",
    "EOS",
    "PAD",
    "QUESTION_WORDS",
    "UNK",
    "Vocab",
    "tokenize",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"

#: Caption words: ``a <colour> <shape> (left of a <colour> <shape>)*``.
CAPTION_WORDS: tuple[str, ...] = (PAD, UNK, BOS, EOS, "a", "left", "of", *COLOURS, *SHAPES)
#: Question words of the VQA templates in :func:`camserve.zoo.scenes.questions_for`.
QUESTION_WORDS: tuple[str, ...] = (
    PAD, UNK, "what", "colour", "color", "shape", "is", "the", "object", "objects", "how",
    "many", "are", "there", "a", *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES),
)
#: The fixed VQA answer set (001 sec. 2.3 classifies over a fixed set of answers).
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *COUNT_WORDS, "yes", "no")

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of ``text``, punctuation dropped."""
    return _WORD.findall(text.lower())


class Vocab:
    """A fixed word list with encoding to and decoding from token ids."""

    def __init__(self, words: Sequence[str]) -> None:
        if len(set(words)) != len(words) or not words or words[0] != PAD:
            raise InvalidRequestError("a vocabulary needs unique words starting with <pad>")
        self.words: tuple[str, ...] = tuple(words)
        self._ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def id(self, word: str) -> int:
        """The id of ``word`` (``<unk>``'s id when unknown and the vocabulary has one)."""
        if word in self._ids:
            return self._ids[word]
        if UNK in self._ids:
            return self._ids[UNK]
        raise InvalidRequestError(f"word {word!r} is not in the vocabulary")

    def encode(self, text: str, eos: bool = False) -> list[int]:
        """Token ids of ``text``; ``eos`` appends ``<eos>`` (captions)."""
        ids = [self.id(w) for w in tokenize(text)]
        return [*ids, self._ids[EOS]] if eos else ids

    def encode_batch(self, texts: Iterable[str], eos: bool = False,
                     length: int | None = None) -> torch.Tensor:
        """LongTensor (N, T) of right-padded ids; ``length`` fixes T (longer texts raise)."""
        rows = [self.encode(t, eos=eos) for t in texts]
        if not rows:
            raise InvalidRequestError("empty batch of texts")
        t = max(len(r) for r in rows) if length is None else length
        if any(len(r) > t for r in rows):
            raise InvalidRequestError(f"a text has more than {t} tokens")
        if t == 0:
            raise InvalidRequestError("texts have no known words")
        out = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` up to the first ``<eos>``, skipping padding and ``<bos>``."""
        words: list[str] = []
        for i in ids:
            w = self.words[int(i)]
            if w == EOS:
                break
            if w not in (PAD, BOS):
                words.append(w)
        return " ".join(words)
