"""Scoring: official SQuAD v2 EM/F1, abstention, unsupported answers, per-prediction and per-item scores."""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np
import pandas as pd
import pytest

from pipeline.scoring.abstention import DEFAULT_MARKERS, is_abstention
from pipeline.scoring.score import PER_ITEM_COLUMNS, per_item_csv, per_item_scores, score_predictions, score_summary
from pipeline.scoring.squad import exact_match, f1, normalize_answer
from pipeline.scoring.unsupported import is_unsupported


# --- reference: the official SQuAD v2 evaluation functions, transcribed from the published script ---------------
def ref_normalize(s: str) -> str:
    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_tokens(s: str) -> list[str]:
    return ref_normalize(s).split() if s else []


def ref_exact(gold: str, pred: str) -> int:
    return int(ref_normalize(gold) == ref_normalize(pred))


def ref_f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = ref_tokens(gold), ref_tokens(pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def ref_scores(pred: str, answers: list[str]) -> tuple[float, float]:
    golds = [a for a in answers if ref_normalize(a)] or [""]
    return float(max(ref_exact(g, pred) for g in golds)), float(max(ref_f1(g, pred) for g in golds))


TRICKY = [
    ("The Eiffel Tower.", ["Eiffel Tower"]),
    ("an apple a day", ["apple day"]),
    ("Anthem", ["anthem", "the anthem"]),
    ("Théâtre de l’Odéon", ["théâtre de l'odéon", "Théâtre de l’Odéon"]),
    ("Über-Straße", ["überstraße"]),
    ("U.S.A.", ["USA", "United States"]),
    ("1,000 people", ["1000", "one thousand people"]),
    ("", []),
    ("", ["", "  ", "the", "."]),
    ("the", ["a"]),
    ("unknown", []),
    ("Paris, France", ["Paris", "paris france", "France"]),
    ("cat cat dog", ["cat dog dog"]),
    ("  spaced\tout\nanswer ", ["spaced out answer"]),
    ("«Guillemets»", ["guillemets"]),
    ("A", ["an"]),
    ("北京", ["北京"]),
]


@pytest.mark.parametrize("pred,answers", TRICKY)
def test_em_f1_match_official_definitions(pred: str, answers: list[str]) -> None:
    em_ref, f1_ref = ref_scores(pred, answers)
    assert exact_match(pred, answers) == em_ref
    assert f1(pred, answers) == pytest.approx(f1_ref, abs=1e-12)
    assert normalize_answer(pred) == ref_normalize(pred)


def test_em_f1_match_official_on_random_strings() -> None:
    rng = np.random.default_rng(7)
    vocab = ["the", "a", "an", "cat", "Cat", "dog.", "’s", "it's", ",", "!", "é", "x-y", " ", "The", "AN", "and"]
    for _ in range(500):
        pred = " ".join(rng.choice(vocab, size=rng.integers(0, 6)))
        answers = [" ".join(rng.choice(vocab, size=rng.integers(0, 5))) for _ in range(rng.integers(0, 4))]
        em_ref, f1_ref = ref_scores(pred, answers)
        assert exact_match(pred, answers) == em_ref, (pred, answers)
        assert f1(pred, answers) == pytest.approx(f1_ref, abs=1e-12), (pred, answers)


def test_normalize_matches_official_on_any_characters() -> None:
    # the fast path (every word character-wise alphanumeric) and the regex path must agree with the official steps
    alphabet = ["a", "an", "the", "The", "x", "é", "ß", "İ", "Ⅻ", "٣", "_", "-", "'", "’", ".", "«", "»", "\u0301",
                " ", "\t", "\n", "\x1c", "\u2028", "\xa0", "\u3000", "北", "A", "N", "E", "5"]
    rng = np.random.default_rng(17)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 9)))
        assert normalize_answer(text) == ref_normalize(text), repr(text)


def test_empty_golds_become_empty_answer() -> None:
    assert exact_match("", ["", "the", "?!"]) == 1.0
    assert f1("", []) == 1.0
    assert exact_match("Paris", []) == 0.0
    assert f1("Paris", ["the"]) == 0.0


@pytest.mark.parametrize(
    "text",
    ["I don't know.", "I don’t know", "Unknown.", "unknown", "I CAN'T ANSWER that.", "Not sure",
     "The answer is not provided in the passage.", "Insufficient information to answer.", "", "  ...  ",
     "i do not\nknow"],
)
def test_abstention_positive(text: str) -> None:
    assert is_abstention(text)


@pytest.mark.parametrize(
    "text",
    ["unknownst", "Paris", "I know", "Knownunknown", "don't know",
     "The author of the 1820 pamphlet remains unknown to historians, but most attribute it to Percy Shelley."],
)
def test_abstention_negative(text: str) -> None:
    assert not is_abstention(text)


def test_abstention_word_limit_is_the_boundary() -> None:
    twelve = "unknown " + " ".join(["word"] * 11)
    assert is_abstention(twelve)
    assert not is_abstention(twelve + " more")
    assert is_abstention(twelve + " more", max_words=13)


def test_abstention_custom_markers() -> None:
    assert is_abstention("No idea!", markers=("no idea",))
    assert not is_abstention("Unknown", markers=("no idea",))
    assert "i don't know" in DEFAULT_MARKERS


def test_unsupported_strategies() -> None:
    context = "The cat sat on the mat near the start line."
    assert not is_unsupported("the Cat sat!", context)
    assert is_unsupported("art", context)  # whole tokens only: "art" is not supported by "start"
    assert is_unsupported("", context)
    assert is_unsupported("dog", context)
    assert not is_unsupported("cat near dog", context, strategy="overlap", min_token_overlap=0.6)
    assert is_unsupported("cat dog fox", context, strategy="overlap", min_token_overlap=0.6)
    with pytest.raises(ValueError, match="nli"):
        is_unsupported("cat", context, strategy="nli")


# --- score_predictions / per_item_scores --------------------------------------------------------------------------
ITEMS = pd.DataFrame(
    [
        {"dataset": "squad_v2", "id": "u1", "type": "open", "question": "q", "answers": [],
         "context": "Paris is in France.", "is_unanswerable": True},
        {"dataset": "squad_v2", "id": "a1", "type": "open", "question": "q", "answers": ["Eiffel Tower", "the tower"],
         "context": "The Eiffel Tower is in Paris.", "is_unanswerable": False},
        {"dataset": "triviaqa", "id": "c1", "type": "closed", "question": "q", "answers": ["Paris", "City of Light"],
         "context": None, "is_unanswerable": False},
    ]
)
COLUMNS = ["custom_id", "dataset", "item_id", "condition", "temp", "sample_index", "type", "request_id",
           "finish_reason", "response_text", "prompt_tokens", "completion_tokens", "total_tokens", "error"]


def predictions(rows: list[tuple[str, str, str, int, str, str, str]]) -> pd.DataFrame:
    """rows: (dataset, item_id, condition, sample, type, response, error_or_finish) — "length" means truncated."""
    out = []
    for dataset, item_id, condition, k, type_, text, flag in rows:
        finish = "length" if flag == "length" else "stop"
        error = flag if flag not in ("", "length") else ""
        out.append([f"{dataset}|{item_id}|{condition}|0.0|{k}|{type_}", dataset, item_id, condition, 0.0, k, type_,
                    "r", finish, text, 1, 1, 2, error])
    return pd.DataFrame(out, columns=COLUMNS)


def test_score_rules_per_row() -> None:
    preds = predictions(
        [
            ("squad_v2", "u1", "control", 0, "open", "I don't know.", ""),
            ("squad_v2", "u1", "control", 1, "open", "Lyon", ""),
            ("squad_v2", "a1", "control", 0, "open", "The Eiffel Tower!", ""),
            ("squad_v2", "a1", "control", 1, "open", "Big Ben", ""),
            ("triviaqa", "c1", "control", 0, "closed", "city of light, of course", ""),
            ("triviaqa", "c1", "control", 1, "closed", "Paris", "server error 500"),
            ("triviaqa", "c1", "control", 2, "closed", "Par", "length"),
        ]
    )
    scored = score_predictions(preds, ITEMS)
    assert list(scored["status"]) == ["ok"] * 5 + ["provider_error", "truncated"]
    rows = scored.set_index(["item_key", "sample_index"])
    abstain_u = rows.loc[("squad_v2|u1", 0)]
    assert (abstain_u.em, abstain_u.f1, abstain_u.abstained, abstain_u.false_answer, abstain_u.unsupported) == (
        1.0, 1.0, 1.0, 0.0, 0.0)
    answered_u = rows.loc[("squad_v2|u1", 1)]
    assert (answered_u.em, answered_u.f1, answered_u.false_answer, answered_u.unsupported) == (0.0, 0.0, 1.0, 1.0)
    right = rows.loc[("squad_v2|a1", 0)]
    assert (right.em, right.f1, right.false_answer, right.unsupported) == (1.0, 1.0, 0.0, 0.0)
    wrong = rows.loc[("squad_v2|a1", 1)]
    assert (wrong.em, wrong.f1, wrong.unsupported) == (0.0, 0.0, 1.0)
    closed = rows.loc[("triviaqa|c1", 0)]
    assert closed.em == 0.0 and closed.f1 == pytest.approx(ref_scores("city of light, of course", ["Paris",
                                                                                                   "City of Light"])[1])
    assert math.isnan(closed.false_answer) and math.isnan(closed.unsupported)
    for k in (1, 2):
        assert rows.loc[("triviaqa|c1", k), ["em", "f1", "abstained"]].isna().all()


def test_missing_items_raise_with_keys_and_count() -> None:
    preds = predictions([("squad_v2", f"zz{i}", "control", 0, "open", "x", "") for i in range(7)])
    with pytest.raises(ValueError, match=r"7 predicted item\(s\).*squad_v2\|zz0") as info:
        score_predictions(preds, ITEMS)
    assert "zz5" not in str(info.value)


def test_unknown_strategy_rejected() -> None:
    with pytest.raises(ValueError, match="strategy"):
        score_predictions(predictions([]), ITEMS, unsupported_strategy="magic")


def test_batched_scoring_equals_row_by_row_definitions() -> None:
    rng = np.random.default_rng(1)
    texts = ["Paris", "paris!", "City of light", "unknown", "Eiffel tower", "the tower", "I don’t know", "", "Lyon",
             "Eiffel", "tower of Paris"]
    item_rows = ITEMS.to_dict("records")
    rows = []
    for k in range(300):
        item = item_rows[rng.integers(0, len(item_rows))]
        rows.append((item["dataset"], item["id"], ("control", "treatment")[k % 2], k, item["type"],
                     texts[rng.integers(0, len(texts))], ""))
    scored = score_predictions(predictions(rows), ITEMS, unsupported_strategy="overlap", min_token_overlap=0.5)
    by_key = {f"{r['dataset']}|{r['id']}": r for r in item_rows}
    for row, (_, _, _, _, _, text, _) in zip(scored.itertuples(), rows, strict=True):
        item = by_key[row.item_key]
        abstained = is_abstention(text)
        assert row.abstained == float(abstained)
        if item["is_unanswerable"]:
            assert row.em == row.f1 == float(abstained)
        else:
            em_ref, f1_ref = ref_scores(text, item["answers"])
            assert row.em == em_ref and row.f1 == pytest.approx(f1_ref, abs=1e-12)
        if item["type"] == "open":
            expected = 0.0 if abstained else float(is_unsupported(text, item["context"], strategy="overlap",
                                                                  min_token_overlap=0.5))
            assert row.unsupported == expected
        else:
            assert math.isnan(row.unsupported)


def test_per_item_scores_aggregates_and_orders() -> None:
    preds = predictions(
        [
            ("triviaqa", "c1", "treatment", 0, "closed", "Paris", ""),
            ("triviaqa", "c1", "treatment", 1, "closed", "Lyon", ""),
            ("triviaqa", "c1", "treatment", 2, "closed", "Lyon", "boom"),
            ("squad_v2", "a1", "control", 0, "open", "Eiffel Tower", ""),
            ("squad_v2", "u1", "control", 0, "open", "x", "length"),
            ("triviaqa", "c1", "control", 0, "closed", "Paris", ""),
        ]
    )
    table = per_item_scores(score_predictions(preds, ITEMS))
    assert list(table.columns) == list(PER_ITEM_COLUMNS)
    assert list(table.columns[:14]) == sorted(table.columns[:14])
    assert list(zip(table["type"], table["condition"], table["item_key"], strict=True)) == [
        ("closed", "control", "triviaqa|c1"), ("closed", "treatment", "triviaqa|c1"),
        ("open", "control", "squad_v2|a1"), ("open", "control", "squad_v2|u1")]
    trt = table.iloc[1]
    assert trt.em == 0.5 and trt.em_std == pytest.approx(math.sqrt(0.5)) and trt.n_samples == 2
    assert trt.n_excluded == 1 and math.isnan(trt.false_answer_rate) and math.isnan(trt.false_answer_rate_std)
    single = table.iloc[2]
    assert single.em == 1.0 and single.em_std == 0.0 and single.unsupported_rate == 0.0 and single.n_samples == 1
    failed = table.iloc[3]
    assert failed.n_samples == 0 and failed.n_excluded == 1 and math.isnan(failed.em)
    shuffled = per_item_scores(score_predictions(preds.sample(frac=1, random_state=3), ITEMS))
    pd.testing.assert_frame_equal(shuffled, table)


def test_score_summary_counts() -> None:
    preds = predictions(
        [
            ("triviaqa", "c1", "control", 0, "closed", "Paris", ""),
            ("triviaqa", "c1", "control", 1, "closed", "Paris", "err"),
            ("squad_v2", "a1", "treatment", 0, "open", "x", "length"),
        ]
    )
    summary = score_summary(score_predictions(preds, ITEMS))
    assert summary["status_counts"] == {"ok": 1, "provider_error": 1, "truncated": 1}
    closed = next(g for g in summary["groups"] if g["type"] == "closed")
    assert closed["n_rows"] == 2 and closed["means"]["em"] == 1.0 and closed["means"]["false_answer_rate"] is None


def test_per_item_csv_is_what_pandas_writes() -> None:
    floats = [1e-5, 1e16, 0.1 + 0.2, -0.0, 1 / 3, 5e-324, 1.7976931348623157e308, np.nan, 2.0, 1.2345678901234568e17]
    plain = pd.DataFrame({"item_key": [f"sq|{i}" for i in range(len(floats))], "em": floats,
                          "n_samples": np.arange(len(floats)), "type": ["open"] * len(floats)})
    tables = [plain,
              plain.assign(item_key=['a,b', 'say "x"', "line\nbreak", "cr\rx", "", "é", "|", " ", "t", "u"]),
              plain.assign(type=["open", None] * 5), plain.assign(em=np.linspace(0, 1, len(floats), dtype=np.float32)),
              plain.assign(flag=[True, False] * 5), plain.iloc[:0]]
    for table in tables:
        assert per_item_csv(table) == table.to_csv(index=False, lineterminator="\n")
