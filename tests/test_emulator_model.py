"""The emulator's simulated model: deterministic, with a treatment effect at the configured rates."""

from __future__ import annotations

import re

import pytest

from pipeline.emulator import model
from pipeline.naming import make_custom_id

N = 6000
CONTEXT = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
           "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")


def _open_key(i: int, unanswerable: bool = False) -> dict:
    return {"dataset": "squad_v2", "id": f"q{i}", "context": CONTEXT, "question": "Where is Normandy?",
            "answers": [] if unanswerable else ["France", "in France"], "is_unanswerable": unanswerable}


def _closed_key(i: int) -> dict:
    return {"dataset": "triviaqa", "id": f"t{i}", "question": "Capital of Italy?", "answers": ["Rome", "Roma"]}


def _rate(condition: str, outcome: str, *, temp: float = 0.0, unanswerable: bool = False) -> float:
    hits = 0
    for i in range(N):
        cid = make_custom_id("squad_v2", f"q{i}", condition, temp, 0, "open")
        hits += model.draw_outcome(cid, _open_key(i, unanswerable)) == outcome
    return hits / N


def _norm(text: str) -> str:
    return " ".join(re.sub(r"\b(a|an|the)\b|[^\w\s]", " ", text.lower()).split())


def test_same_custom_id_gives_same_answer() -> None:
    cid = make_custom_id("squad_v2", "q7", "treatment", 0.7, 3, "open")
    messages = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "Where is Normandy?"}]
    first = model.answer(cid, messages, _open_key(7))
    assert model.answer(cid, messages, _open_key(7)) == first
    assert first[1] == "stop"
    contents = {model.answer(make_custom_id("squad_v2", "q7", "treatment", 0.7, k, "open"), messages,
                             _open_key(7))[0] for k in range(40)}
    assert len(contents) > 1, "different samples must be able to differ"


def test_answerable_rates_match_the_table_and_treatment_beats_control() -> None:
    control = _rate("control", model.CORRECT)
    treatment = _rate("treatment", model.CORRECT)
    assert control == pytest.approx(model.RATES["answerable"]["control"][model.CORRECT], abs=0.03)
    assert treatment == pytest.approx(model.RATES["answerable"]["treatment"][model.CORRECT], abs=0.03)
    assert treatment > control + 0.05
    assert _rate("control", model.ABSTAIN) == pytest.approx(model.RATES["answerable"]["control"][model.ABSTAIN],
                                                            abs=0.03)


def test_unanswerable_abstention_rates() -> None:
    control = _rate("control", model.ABSTAIN, unanswerable=True)
    treatment = _rate("treatment", model.ABSTAIN, unanswerable=True)
    assert control == pytest.approx(model.RATES["unanswerable"]["control"][model.ABSTAIN], abs=0.03)
    assert treatment == pytest.approx(model.RATES["unanswerable"]["treatment"][model.ABSTAIN], abs=0.03)
    assert _rate("treatment", model.CORRECT, unanswerable=True) == 0.0


def test_temperature_lowers_the_correct_rate() -> None:
    assert model.outcome_rates("control", 1.0, False)[model.CORRECT] == pytest.approx(0.55)
    assert sum(model.outcome_rates("treatment", 1.0, False).values()) == pytest.approx(1.0)
    assert _rate("control", model.CORRECT, temp=1.0) == pytest.approx(0.55, abs=0.03)


def test_content_matches_the_outcome_for_open_book() -> None:
    golds = {_norm(a) for a in _open_key(0)["answers"]}
    seen = set()
    for i in range(400):
        cid = make_custom_id("squad_v2", f"q{i}", "control", 0.0, 0, "open")
        content, _, _ = model.answer(cid, [{"role": "user", "content": "q"}], _open_key(i))
        outcome = model.draw_outcome(cid, _open_key(i))
        seen.add(outcome)
        if outcome == model.CORRECT:
            assert any(g in _norm(content) for g in golds), content
        elif outcome == model.ABSTAIN:
            assert content in model.ABSTENTIONS
        else:
            assert _norm(content) not in golds and content in CONTEXT, content
    assert seen == {model.CORRECT, model.ABSTAIN, model.WRONG}


def test_closed_book_wrong_answers_are_not_gold_and_unknown_items_are_wrong() -> None:
    for i in range(300):
        cid = make_custom_id("triviaqa", f"t{i}", "control", 0.0, 0, "closed")
        content, _, _ = model.answer(cid, [{"role": "user", "content": "q"}], _closed_key(i))
        if model.draw_outcome(cid, _closed_key(i)) == model.WRONG:
            assert _norm(content) not in {"rome", "roma"} and content not in model.ABSTENTIONS
    cid = make_custom_id("triviaqa", "missing", "treatment", 0.0, 0, "closed")
    assert model.draw_outcome(cid, None) == model.WRONG
    content, reason, _ = model.answer("not-a-pipeline-id", [{"role": "user", "content": "2+2?"}], None)
    assert content and content not in model.ABSTENTIONS and reason == "stop"


def test_usage_counts_words() -> None:
    cid = make_custom_id("triviaqa", "t1", "control", 0.0, 0, "closed")
    messages = [{"role": "system", "content": "one two three"}, {"role": "user", "content": "four five six seven"}]
    content, _, usage = model.answer(cid, messages, _closed_key(1))
    assert usage["prompt_tokens"] == 10  # ceil(1.3 * 7)
    assert usage["completion_tokens"] == len(content.split()) + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
