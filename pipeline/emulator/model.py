"""The emulator's simulated model: a deterministic answer per custom_id, with a built-in treatment effect.

`answer(custom_id, messages, key)` -> `(content, finish_reason, usage)` is pure: the outcome (correct / abstain /
wrong) and every textual choice are drawn from sha256 of the custom_id and the system prompt, so re-running a job
gives identical rows, while two treatment prompts (same custom_ids, different system prompts) answer differently.
Rates live in `RATES` (answerable vs unanswerable items, per condition); the correct rate drops by
`TEMP_PENALTY` x temperature, the lost mass going to "wrong". `key` is the prepared-data row of the item
(open_book rows have `context` and `is_unanswerable`; closed_book rows do not); without a key the answer is wrong.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from pipeline.naming import CustomId, parse_custom_id

CORRECT = "correct"
ABSTAIN = "abstain"
WRONG = "wrong"

RATES: dict[str, dict[str, dict[str, float]]] = {
    "answerable": {
        "control": {CORRECT: 0.60, ABSTAIN: 0.10, WRONG: 0.30},
        "treatment": {CORRECT: 0.70, ABSTAIN: 0.12, WRONG: 0.18},
    },
    "unanswerable": {
        "control": {CORRECT: 0.0, ABSTAIN: 0.40, WRONG: 0.60},
        "treatment": {CORRECT: 0.0, ABSTAIN: 0.70, WRONG: 0.30},
    },
}
"""Outcome probabilities at temperature 0. For unanswerable items abstaining is the right answer."""

TEMP_PENALTY = 0.05
WRAP_RATE = 0.2
"""Share of correct answers wrapped in a sentence ("The answer is X.") instead of the bare span."""

ABSTENTIONS = ("unknown", "I don't know.")
_WRAPS = ("The answer is {}.", "{}.", "It is {}.")
_CLOSED_WRONG = ("Paris", "1945", "George Washington", "the Pacific Ocean", "Jupiter", "Charles Dickens",
                 "Mount Everest", "1066", "Albert Einstein", "the Nile", "Tokyo", "Shakespeare")
_MARKERS = ("unknown", "know", "not sure", "cannot answer", "can't answer", "insufficient", "not enough",
            "not provided")
_NORM_DROP = re.compile(r"\b(a|an|the)\b|[^\w\s]")


def _stream(seed: str) -> list[float]:
    """Independent uniform draws in [0, 1) from sha256(seed): [outcome, wording, pick, extra]."""
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    return [int.from_bytes(digest[i:i + 8], "big") / 2**64 for i in range(0, 32, 8)]


def _parse(custom_id: str) -> CustomId | None:
    try:
        return parse_custom_id(custom_id)
    except ValueError:
        return None


def outcome_rates(condition: str, temperature: float, unanswerable: bool) -> dict[str, float]:
    """The effective outcome probabilities for one request (temperature penalty applied)."""
    base = RATES["unanswerable" if unanswerable else "answerable"].get(condition, RATES["answerable"]["control"])
    shift = min(base[CORRECT], TEMP_PENALTY * max(temperature, 0.0))
    return {CORRECT: base[CORRECT] - shift, ABSTAIN: base[ABSTAIN], WRONG: base[WRONG] + shift}


def draw_outcome(custom_id: str, key: dict[str, Any] | None, seed: str | None = None) -> str:
    """correct / abstain / wrong for this request; always wrong without a key. `seed` defaults to the custom_id."""
    cid = _parse(custom_id)
    if key is None or cid is None:
        return WRONG
    rates = outcome_rates(cid.condition, float(cid.temp), bool(key.get("is_unanswerable")))
    u = _stream(seed or custom_id)[0]
    if u < rates[CORRECT]:
        return CORRECT
    if u < rates[CORRECT] + rates[ABSTAIN]:
        return ABSTAIN
    return WRONG


def _norm(text: str) -> str:
    return " ".join(_NORM_DROP.sub(" ", text.lower()).split())


def _wrong_span(context: str, golds: set[str], u: float) -> str | None:
    """A 1-4 word span of the context that is neither a gold answer nor contains an abstention marker."""
    words = context.split()
    for offset in range(len(words)):
        i = (int(u * len(words)) + offset) % len(words)
        span = " ".join(words[i:i + 1 + i % 4]).strip(".,;:!?\"'()")
        norm = _norm(span)
        if norm and norm not in golds and not any(m in span.lower() for m in _MARKERS):
            return span
    return None


def _wrong(key: dict[str, Any] | None, u: float) -> str:
    golds = {_norm(a) for a in (key or {}).get("answers") or []}
    span = _wrong_span(str((key or {}).get("context") or ""), golds, u)
    if span:
        return span
    start = int(u * len(_CLOSED_WRONG))
    for offset in range(len(_CLOSED_WRONG)):
        candidate = _CLOSED_WRONG[(start + offset) % len(_CLOSED_WRONG)]
        if _norm(candidate) not in golds:
            return candidate
    return "42"


def _content(custom_id: str, key: dict[str, Any] | None, seed: str) -> str:
    outcome = draw_outcome(custom_id, key, seed)
    _, wording, pick, extra = _stream(seed)
    answers = [a for a in (key or {}).get("answers") or [] if str(a).strip()]
    if outcome == CORRECT and answers:
        gold = str(answers[int(pick * len(answers))]).strip()
        if wording < WRAP_RATE:
            return _WRAPS[int(extra * len(_WRAPS))].format(gold)
        return gold
    if outcome == ABSTAIN or (outcome == CORRECT and not answers):
        return ABSTENTIONS[int(wording * len(ABSTENTIONS))]
    return _wrong(key, pick)


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def answer(custom_id: str, messages: list[dict[str, Any]],
           key: dict[str, Any] | None) -> tuple[str, str, dict[str, int]]:
    """(content, finish_reason, usage) for one request; see the module docstring."""
    system = "".join(_text_of(m) for m in messages if m.get("role") == "system")
    seed = custom_id if not system else f"{custom_id}\x1f{hashlib.sha256(system.encode()).hexdigest()}"
    content = _content(custom_id, key, seed)
    prompt_words = sum(len(_text_of(m).split()) for m in messages)
    prompt_tokens = math.ceil(1.3 * prompt_words)
    completion_tokens = len(content.split()) + 1
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return content, "stop", usage
