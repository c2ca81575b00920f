"""Loaders for the published dataset formats (fixtures in tests/fixtures/datasets) and prepare_from_sources."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from pipeline.data.loaders import clean_text, load_nq_open, load_squad_v2, load_triviaqa, prepare_from_sources
from pipeline.data.prepared import DataFormatError, read_prepared
from targets.fingerprint import sha256_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "datasets"


def _write_lines(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- SQuAD v2


def test_squad_official_json_with_impossible_question() -> None:
    rows = load_squad_v2(FIXTURES / "squad_v2_official.json")
    assert [r["id"] for r in rows] == ["sq-001", "sq-002", "sq-003"]
    first, impossible, third = rows
    assert first == {
        "dataset": "squad_v2", "id": "sq-001",
        "context": "The lighthouse at Kestrel Point was built in 1871 from local granite. "
                   "Its lamp was converted to electricity in 1926.",
        "question": "When was the Kestrel Point lighthouse built?",
        "answers": ["1871", "in 1871"],  # duplicates dropped, whitespace collapsed, order kept
        "is_unanswerable": False,
    }
    assert impossible["answers"] == [] and impossible["is_unanswerable"] is True  # plausible_answers are not gold
    assert third["answers"] == ["212 kilometres"]
    assert list(first) == ["dataset", "id", "context", "question", "answers", "is_unanswerable"]


def test_squad_official_on_one_line_is_detected_as_a_document(tmp_path: Path) -> None:
    doc = json.loads((FIXTURES / "squad_v2_official.json").read_text())
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(doc))
    assert load_squad_v2(path) == load_squad_v2(FIXTURES / "squad_v2_official.json")


def test_squad_hf_json_lines() -> None:
    rows = load_squad_v2(FIXTURES / "squad_v2_hf.jsonl")
    assert [(r["id"], r["answers"], r["is_unanswerable"]) for r in rows] == [
        ("hf-001", ["the Tallow Estuary", "Tallow Estuary"], False),
        ("hf-002", [], True),
        ("hf-003", ["1934"], False),
    ]


def test_squad_hf_rows_as_a_json_list(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "squad_v2_hf.jsonl").read_text().splitlines() if line.strip()]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    assert load_squad_v2(path) == load_squad_v2(FIXTURES / "squad_v2_hf.jsonl")


def test_squad_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    good = (FIXTURES / "squad_v2_hf.jsonl").read_text().splitlines()[0]
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + good.replace("hf-001", "hf-009") + "\n" + '{"id": "x", "context": \n')
    with pytest.raises(DataFormatError, match=rf"{path}:3: not valid JSON.*Fix: pass SQuAD v2"):
        load_squad_v2(path)


def test_squad_missing_field_names_the_json_path(tmp_path: Path) -> None:
    doc = json.loads((FIXTURES / "squad_v2_official.json").read_text())
    del doc["data"][1]["paragraphs"][0]["qas"][0]["question"]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(doc, indent=1))
    with pytest.raises(DataFormatError) as err:
        load_squad_v2(path)
    message = str(err.value)
    assert f"{path} at $.data[1].paragraphs[0].qas[0]" in message
    assert "'question'" in message and "expected" in message and "Fix:" in message


def test_squad_wrong_type_is_rejected(tmp_path: Path) -> None:
    row = {"id": "a", "title": "t", "context": "c", "question": "q", "answers": {"text": "single", "answer_start": [0]}}
    path = _write_lines(tmp_path / "rows.jsonl", [row])
    expected = rf"{path}:1 at \$.answers: field 'text' is str; expected 'text' to be a list"
    with pytest.raises(DataFormatError, match=expected):
        load_squad_v2(path)


def test_squad_impossible_with_answers_is_contradictory(tmp_path: Path) -> None:
    row = {"id": "a", "context": "c", "question": "q", "is_impossible": True,
           "answers": {"text": ["c"], "answer_start": [0]}}
    with pytest.raises(DataFormatError, match="is_impossible is true but answers are given"):
        load_squad_v2(_write_lines(tmp_path / "rows.jsonl", [row]))


def test_squad_id_with_pipe_is_rejected(tmp_path: Path) -> None:
    row = {"id": "a|b", "context": "c", "question": "q", "answers": {"text": ["c"], "answer_start": [0]}}
    with pytest.raises(DataFormatError, match=r":1: id 'a\|b' is empty or contains '\|'"):
        load_squad_v2(_write_lines(tmp_path / "rows.jsonl", [row]))


def test_document_without_data_list_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{\n  "version": "v2.0",\n  "articles": []\n}\n')
    with pytest.raises(DataFormatError, match=rf"{path} at \$: found a JSON dict without a 'data' list"):
        load_squad_v2(path)


def test_invalid_json_document_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{\n  "data": [\n    {"title": "t",,}\n  ]\n}\n')
    with pytest.raises(DataFormatError, match=rf"{path}:3:\d+: not valid JSON"):
        load_squad_v2(path)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataFormatError, match="file is empty"):
        load_nq_open(path)


def test_file_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = FIXTURES / "nq_open.jsonl"
    with pytest.raises(DataFormatError, match="larger than the limit of 10"):
        load_nq_open(path, max_file_bytes=10)
    assert load_nq_open(path, max_file_bytes=path.stat().st_size)


def test_overlong_json_line_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.data.loaders as loaders

    monkeypatch.setattr(loaders, "MAX_LINE_BYTES", 80)
    path = _write_lines(tmp_path / "nq.jsonl", [{"question": "q1", "answer": ["a"]},
                                               {"question": "q" * 100, "answer": ["a"]}])
    with pytest.raises(DataFormatError, match=rf"{path}:2: line longer than 80 bytes"):
        load_nq_open(path)


# ---------------------------------------------------------------------------------------------- TriviaQA


def test_triviaqa_hf_rows() -> None:
    rows = load_triviaqa(FIXTURES / "triviaqa_hf.jsonl")
    assert rows == [
        {"dataset": "triviaqa", "id": "tqa_t1", "question": "Which planet is known as the Red Planet?",
         "answers": ["Mars", "Mars (planet)", "Planet Mars"]},
        {"dataset": "triviaqa", "id": "tqa_t2", "question": "What is the chemical symbol for gold?",
         "answers": ["AU", "Au"]},
    ]


def test_triviaqa_hf_rows_as_json_list(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (FIXTURES / "triviaqa_hf.jsonl").read_text().splitlines()]
    path = tmp_path / "validation.json"
    path.write_text(json.dumps(rows))
    assert load_triviaqa(path) == load_triviaqa(FIXTURES / "triviaqa_hf.jsonl")


def test_triviaqa_unfiltered_json() -> None:
    rows = load_triviaqa(FIXTURES / "triviaqa_unfiltered.json")
    assert [(r["id"], r["question"], r["answers"]) for r in rows] == [
        ("tqa_u1", "In which country is the city of Kyoto?", ["Japan", "Nihon", "Nippon"]),
        ("tqa_u2", "How many sides does a hexagon have?", ["6", "six"]),
    ]


def test_triviaqa_unfiltered_without_answers_names_the_path(tmp_path: Path) -> None:
    doc = json.loads((FIXTURES / "triviaqa_unfiltered.json").read_text())
    del doc["Data"][1]["Answer"]
    path = tmp_path / "unfiltered-web-test.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=r"at \$\.Data\[1\]: missing or null field 'Answer'.*test files"):
        load_triviaqa(path)


def test_triviaqa_alias_of_wrong_type(tmp_path: Path) -> None:
    row = {"question": "q", "question_id": "x", "answer": {"value": "v", "aliases": ["v", 7]}}
    with pytest.raises(DataFormatError, match=r":1 at \$\.answer\.aliases\[1\]: found int"):
        load_triviaqa(_write_lines(tmp_path / "t.jsonl", [row]))


def test_triviaqa_row_without_any_answer(tmp_path: Path) -> None:
    row = {"question": "q", "question_id": "x", "answer": {"value": " ", "aliases": []}}
    with pytest.raises(DataFormatError, match="no non-empty answer value or alias"):
        load_triviaqa(_write_lines(tmp_path / "t.jsonl", [row]))


# ---------------------------------------------------------------------------------------------- NQ-Open


def test_nq_open_ids_are_md5_of_question_and_repeats_merge() -> None:
    rows = load_nq_open(FIXTURES / "nq_open.jsonl")
    war = "who wrote the novel war and peace"
    assert rows[0] == {"dataset": "nq_open", "id": hashlib.md5(war.encode()).hexdigest(), "question": war,
                       "answers": ["Leo Tolstoy", "Tolstoy"]}
    assert [r["id"] for r in rows][1:] == [
        hashlib.md5(b"what is the boiling point of water at sea level in celsius").hexdigest(), "nq-custom-7"]


def test_nq_open_same_id_different_question_is_an_error(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "nq.jsonl", [{"id": "1", "question": "a?", "answer": ["x"]},
                                               {"id": "1", "question": "b?", "answer": ["y"]}])
    with pytest.raises(DataFormatError, match=rf"{path}:2: id '1' repeats the id of {path}:1"):
        load_nq_open(path)


@pytest.mark.parametrize(("row", "message"), [
    ({"answer": ["x"]}, "missing or null field 'question'"),
    ({"question": "q"}, "missing or null field 'answer'"),
    ({"question": "q", "answer": 5}, "field 'answer' is int"),
    ({"question": 5, "answer": ["x"]}, "field 'question' is int"),
    ({"question": "q", "answer": [""]}, "no non-empty answer"),
    ([1, 2], "found list"),
])
def test_nq_open_bad_rows(tmp_path: Path, row: object, message: str) -> None:
    path = _write_lines(tmp_path / "nq.jsonl", [{"question": "ok", "answer": ["y"]}, row])
    with pytest.raises(DataFormatError, match=rf"{path}:2.*{message}.*Fix: pass NQ-Open"):
        load_nq_open(path)


def test_clean_text_collapses_whitespace() -> None:
    assert clean_text("  a\t b\n\nc  ") == "a b c"


# ---------------------------------------------------------------------------------------------- prepare


def _prepare(out: Path, **caps: int | None) -> dict:
    return prepare_from_sources(squad_v2=FIXTURES / "squad_v2_official.json", triviaqa=FIXTURES / "triviaqa_hf.jsonl",
                                nq_open=FIXTURES / "nq_open.jsonl", out_dir=out, **caps)


def test_prepare_is_deterministic_and_readable(tmp_path: Path) -> None:
    first, second = _prepare(tmp_path / "a"), _prepare(tmp_path / "b")
    assert first == second
    for kind in ("open_book", "closed_book"):
        a, b = (tmp_path / "a" / f"{kind}.jsonl").read_bytes(), (tmp_path / "b" / f"{kind}.jsonl").read_bytes()
        assert a == b and a.endswith(b"\n") and b"\r" not in a
        assert first[kind]["sha256"] == sha256_file(tmp_path / "a" / f"{kind}.jsonl")
        assert first[kind]["items"] == len(read_prepared(tmp_path / "a" / f"{kind}.jsonl", kind))
    assert first["open_book"]["items"] == 3 and first["closed_book"]["items"] == 5
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["closed_book.jsonl", "open_book.jsonl"]


def test_prepare_shuffles_like_the_original_then_truncates(tmp_path: Path) -> None:
    summary = _prepare(tmp_path, open_book_max_items=2, triviaqa_max_items=1, nq_open_max_items=2)
    assert summary["open_book"]["items"] == 2 and summary["closed_book"]["items"] == 3
    squad = load_squad_v2(FIXTURES / "squad_v2_official.json")
    random.Random(2025).shuffle(squad)
    assert read_prepared(tmp_path / "open_book.jsonl", "open_book") == squad[:2]
    closed = read_prepared(tmp_path / "closed_book.jsonl", "closed_book")
    assert [r["dataset"] for r in closed] == ["triviaqa", "nq_open", "nq_open"]
    nq = load_nq_open(FIXTURES / "nq_open.jsonl")
    random.Random(2025).shuffle(nq)
    assert closed[1:] == nq[:2]


def test_prepare_seed_changes_the_order(tmp_path: Path) -> None:
    base = prepare_from_sources(squad_v2=FIXTURES / "squad_v2_hf.jsonl", triviaqa=None, nq_open=None,
                                out_dir=tmp_path / "a")
    orders = {base["open_book"]["sha256"]}
    for seed in range(1, 6):
        orders.add(prepare_from_sources(squad_v2=FIXTURES / "squad_v2_hf.jsonl", triviaqa=None, nq_open=None,
                                        out_dir=tmp_path / str(seed), seed=seed)["open_book"]["sha256"])
    assert len(orders) > 1
    assert base["closed_book"] == {"items": 0, "sha256": hashlib.sha256(b"").hexdigest()}


def test_prepare_bad_source_writes_nothing(tmp_path: Path) -> None:
    bad = _write_lines(tmp_path / "nq.jsonl", [{"question": "q"}])
    out = tmp_path / "out"
    with pytest.raises(DataFormatError):
        prepare_from_sources(squad_v2=FIXTURES / "squad_v2_hf.jsonl", triviaqa=None, nq_open=bad, out_dir=out)
    assert not out.exists()


def test_prepare_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        prepare_from_sources(squad_v2=None, triviaqa=None, nq_open=None, out_dir=tmp_path)
    with pytest.raises(ValueError, match="nq_open_max_items must be >= 0"):
        _prepare(tmp_path, nq_open_max_items=-1)
