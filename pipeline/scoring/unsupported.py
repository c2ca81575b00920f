"""Is an open-book answer unsupported by its passage?

Strategies (an unknown one raises ValueError):
- `baseline`: supported when the normalized prediction is non-empty and occurs in the normalized context as a
  whole-token substring (" the cat " inside " saw the cat sat "); a bare character substring would call "art"
  supported by "start".
- `overlap`: supported when at least `min_token_overlap` of the prediction's tokens (counted with multiplicity)
  occur in the context's token set. Tokens are the `\\w+` runs of the SQuAD-normalized text, so Unicode punctuation
  (which SQuAD normalization keeps) does not glue words together.
An empty prediction is never supported. Whether abstentions count at all is decided by the caller (score.py).
"""

from __future__ import annotations

import re

from pipeline.scoring.squad import normalize_answer

STRATEGIES: tuple[str, ...] = ("baseline", "overlap")
_TOKEN = re.compile(r"\w+")


def tokens(normalized: str) -> list[str]:
    """Overlap-strategy tokens of an already normalized text."""
    return _TOKEN.findall(normalized)


def unsupported_normalized(
    norm_pred: str,
    norm_context: str,
    context_tokens: frozenset[str] | None,
    *,
    strategy: str,
    min_token_overlap: float,
) -> bool:
    """`is_unsupported` on pre-normalized inputs, so batch scoring normalizes each text once.

    `context_tokens` is `frozenset(tokens(norm_context))`; it is only read by the overlap strategy.
    """
    if strategy == "baseline":
        return not norm_pred or f" {norm_pred} " not in f" {norm_context} "
    if strategy == "overlap":
        pred_tokens = tokens(norm_pred)
        if not pred_tokens:
            return True
        vocab = context_tokens if context_tokens is not None else frozenset(tokens(norm_context))
        found = sum(1 for t in pred_tokens if t in vocab)
        return found / len(pred_tokens) < min_token_overlap
    raise ValueError(f"unknown unsupported strategy {strategy!r}; expected one of {STRATEGIES}")


def is_unsupported(pred: str, context: str, *, strategy: str = "baseline", min_token_overlap: float = 0.6) -> bool:
    """True when `pred` is not supported by `context` under `strategy` (see module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown unsupported strategy {strategy!r}; expected one of {STRATEGIES}")
    norm_context = normalize_answer(context or "")
    return unsupported_normalized(
        normalize_answer(pred), norm_context, None, strategy=strategy, min_token_overlap=min_token_overlap
    )
