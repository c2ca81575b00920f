"""Exact match and F1 exactly as the official SQuAD v2 evaluation script defines them.

- `normalize_answer`: lower-case, delete ASCII punctuation (`string.punctuation`), replace the words
  a/an/the (regex `\\b(a|an|the)\\b`) by a space, collapse whitespace. Unicode punctuation is kept, as officially.
- Gold answers whose normalized form is empty are dropped; if none remain the gold list is `[""]`, so an
  empty prediction scores 1 on an unanswerable question.
- EM and F1 are maximised over the gold answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_PUNCT_BYTES = string.punctuation.encode()
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ARTICLE_WORDS = frozenset(("a", "an", "the"))


def normalize_answer(s: str) -> str:
    """The official SQuAD normalization (same order of steps: lower, punctuation, articles, whitespace)."""
    lower = s.lower()
    # ASCII text (an O(1) flag in CPython) takes bytes.translate, which deletes the same characters much faster
    text = lower.encode().translate(None, _PUNCT_BYTES).decode() if lower.isascii() else lower.translate(_PUNCT_TABLE)
    words = text.split()
    if "".join(words).isalnum():
        # Every non-space character is a regex word character (str.isalnum is sre's Unicode \w minus "_", which the
        # punctuation step removed), so \b falls exactly between words: dropping whole-word articles is the same.
        return " ".join([w for w in words if w not in _ARTICLE_WORDS])
    return " ".join(_ARTICLES.sub(" ", text).split())


def gold_answers(golds: Iterable[str]) -> list[str]:
    """The gold texts the official script keeps: normalized form non-empty, else `[""]`."""
    kept = [g for g in golds if normalize_answer(g)]
    return kept or [""]


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals some normalized gold answer, else 0.0."""
    norm_pred = normalize_answer(pred)
    return float(any(normalize_answer(g) == norm_pred for g in gold_answers(golds)))


def bag_f1(pred: Mapping[str, int], n_pred: int, gold: Mapping[str, int], n_gold: int) -> float:
    """Official token-overlap F1 of two token multisets (token → count, total count); both empty → 1.0.

    Callers that score many pairs build each side's multiset once; the arithmetic is the official one
    (precision, recall, 2PR/(P+R)) so results are bit-identical to the script.
    """
    if n_pred == 0 or n_gold == 0:
        return float(n_pred == n_gold)
    small, large = (pred, gold) if len(pred) <= len(gold) else (gold, pred)
    num_same = 0
    for token, count in small.items():
        other = large.get(token)
        if other:
            num_same += count if count < other else other
    if num_same == 0:
        return 0.0
    precision = num_same / n_pred
    recall = num_same / n_gold
    return 2 * precision * recall / (precision + recall)


def f1(pred: str, golds: Sequence[str]) -> float:
    """Official SQuAD F1, maximised over the kept gold answers."""
    pred_tokens = normalize_answer(pred).split()
    pred_bag = Counter(pred_tokens)
    best = 0.0
    for gold in gold_answers(golds):
        gold_tokens = normalize_answer(gold).split()
        best = max(best, bag_f1(pred_bag, len(pred_tokens), Counter(gold_tokens), len(gold_tokens)))
    return best
