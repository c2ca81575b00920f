"""Abstention detection: did the model decline to answer?

Rule (documented contract, tested on both sides):
- The text is lower-cased and curly apostrophes (’ ‘) become `'`; apostrophes are kept, so markers such as
  "i don't know" and "can't answer" can match (the original stripped them and never matched).
- A marker matches on word boundaries only: "Unknown." matches "unknown", "unknownst" does not.
  Whitespace inside a marker matches any run of whitespace.
- A response is an abstention when it contains a marker AND is short: at most `max_words` (default 12)
  words, a word being a letter or digit followed by letters, digits or apostrophes. A long real answer that
  merely mentions "unknown" ("The author of the 1820 pamphlet remains unknown to historians, but most
  attribute it to …") is not.
  Known limitation: a short answer that is a name containing a marker ("Tomb of the Unknown Soldier") counts
  as an abstention; the task instructions ask the model to reply exactly "unknown", so short replies are
  where abstentions live.
- An empty response (nothing but whitespace/punctuation) is an abstention: it is the official SQuAD v2
  no-answer prediction, and scoring it as a false answer would contradict the official metric.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

DEFAULT_MARKERS: tuple[str, ...] = (
    "i don't know",
    "i do not know",
    "unknown",
    "not sure",
    "cannot answer",
    "can't answer",
    "insufficient information",
    "not enough information",
    "not provided in the passage",
)
DEFAULT_MAX_WORDS = 12

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_WORD = re.compile(r"\w[\w']*")


def _canon(text: str) -> str:
    return text.lower() if text.isascii() else text.translate(_APOSTROPHES).lower()  # the apostrophes are not ASCII


@lru_cache(maxsize=64)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern[str] | None:
    alternatives = [r"\s+".join(re.escape(w) for w in _canon(m).split()) for m in markers if m.strip()]
    if not alternatives:
        return None
    # \w-lookarounds instead of \b: a marker may itself start or end with a non-word character.
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


def is_abstention(text: str, markers: Sequence[str] = DEFAULT_MARKERS, *, max_words: int = DEFAULT_MAX_WORDS) -> bool:
    """True when `text` declines to answer, per the rule in the module docstring."""
    canon = _canon(text)
    n_words = len(_WORD.findall(canon))
    if n_words == 0:
        return True
    if n_words > max_words:
        return False
    pattern = _marker_pattern(tuple(markers))
    return pattern is not None and pattern.search(canon) is not None
