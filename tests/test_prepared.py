"""read_prepared validation, sha256_file, and the shipped sample data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.data.prepared import DataFormatError, read_prepared, row_problem
from targets.fingerprint import sha256_file

REPO = Path(__file__).resolve().parent.parent
OPEN = {"dataset": "squad_v2", "id": "o1", "context": "Paris is in France.", "question": "Where is Paris?",
        "answers": ["France"], "is_unanswerable": False}
CLOSED = {"dataset": "nq_open", "id": "c1", "question": "capital of france", "answers": ["Paris"]}


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reads_valid_rows_and_skips_blank_lines(tmp_path: Path) -> None:
    second = {**OPEN, "id": "o2", "answers": [], "is_unanswerable": True, "extra": 1}
    path = _write(tmp_path / "open_book.jsonl", [OPEN, "", second])
    assert read_prepared(path, "open_book") == [OPEN, second]


def test_max_items_keeps_the_first_rows_and_stops_reading(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [CLOSED, {**CLOSED, "id": "c2"}, "not json at all"])
    assert [r["id"] for r in read_prepared(path, "closed_book", max_items=2)] == ["c1", "c2"]
    assert read_prepared(path, "closed_book", max_items=0) == []
    with pytest.raises(DataFormatError, match=":3: not valid UTF-8 JSON"):
        read_prepared(path, "closed_book", max_items=3)


@pytest.mark.parametrize(("kind", "row", "message"), [
    ("open_book", {k: v for k, v in OPEN.items() if k != "context"}, "missing field 'context'"),
    ("open_book", {**OPEN, "is_unanswerable": "no"}, "field 'is_unanswerable' must be bool, got str"),
    ("open_book", {**OPEN, "answers": "France"}, "field 'answers' must be list"),
    ("open_book", {**OPEN, "answers": ["France", 3]}, "every entry of 'answers' must be a non-empty string"),
    ("open_book", {**OPEN, "answers": [" "]}, "every entry of 'answers' must be a non-empty string"),
    ("open_book", {**OPEN, "answers": [], "is_unanswerable": False}, "is_unanswerable must be true exactly when"),
    ("open_book", {**OPEN, "is_unanswerable": True}, "is_unanswerable must be true exactly when"),
    ("closed_book", {**CLOSED, "answers": []}, "closed-book items need at least one gold answer"),
    ("closed_book", {**CLOSED, "id": 7}, "field 'id' must be str, got int"),
    ("closed_book", {**CLOSED, "id": "a|b"}, r"id 'a\|b' is empty or contains '\|'"),
    ("closed_book", {**CLOSED, "dataset": ""}, "dataset '' is empty"),
    ("closed_book", ["not", "an", "object"], "expected a JSON object, got list"),
])
def test_invalid_rows_name_file_line_and_fix(tmp_path: Path, kind: str, row: object, message: str) -> None:
    good = OPEN if kind == "open_book" else CLOSED
    path = _write(tmp_path / f"{kind}.jsonl", [good, row])
    with pytest.raises(DataFormatError, match=rf"{path}:2: {message}.*Fix: .*prepare-data"):
        read_prepared(path, kind)  # type: ignore[arg-type]
    assert row_problem(row, kind) is not None  # type: ignore[arg-type]


def test_duplicate_item_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [CLOSED, {**CLOSED, "dataset": "triviaqa"}, {**CLOSED, "answers": ["x"]}])
    with pytest.raises(DataFormatError, match=rf"{path}:3: duplicate item nq_open\|c1"):
        read_prepared(path, "closed_book")


def test_malformed_json_and_bad_utf8(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [CLOSED, '{"dataset": "nq_open",'])
    with pytest.raises(DataFormatError, match=rf"{path}:2: not valid UTF-8 JSON"):
        read_prepared(path, "closed_book")
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(json.dumps(CLOSED).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    with pytest.raises(DataFormatError, match=rf"{raw}:2: not valid UTF-8 JSON"):
        read_prepared(raw, "closed_book")


def test_argument_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [CLOSED])
    with pytest.raises(ValueError, match="kind must be one of"):
        read_prepared(path, "open")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_items must be >= 0"):
        read_prepared(path, "closed_book", max_items=-1)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # more than one read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_shipped_sample_open_book() -> None:
    rows = read_prepared(REPO / "data" / "sample" / "open_book.jsonl", "open_book")
    assert len(rows) == 30 and {r["dataset"] for r in rows} == {"squad_v2"}
    assert [r["id"] for r in rows] == [f"sample-ob-{i:03d}" for i in range(1, 31)]
    answerable = [r for r in rows if not r["is_unanswerable"]]
    assert len(answerable) == 22 and len(rows) - len(answerable) == 8
    for row in answerable:
        assert 1 <= len(row["answers"]) <= 3
        assert all(answer in row["context"] for answer in row["answers"]), row["id"]


def test_shipped_sample_closed_book() -> None:
    rows = read_prepared(REPO / "data" / "sample" / "closed_book.jsonl", "closed_book")
    assert [r["id"] for r in rows] == ([f"sample-tqa-{i:03d}" for i in range(1, 16)]
                                       + [f"sample-nq-{i:03d}" for i in range(1, 16)])
    assert [r["dataset"] for r in rows] == ["triviaqa"] * 15 + ["nq_open"] * 15
    assert all(r["answers"] == sorted(set(r["answers"])) for r in rows if r["dataset"] == "triviaqa")


@pytest.mark.parametrize("name", ["prompts/control_system.txt", "prompts/treatment_excellence.txt",
                                  "prompts/treatment_concise.txt", "task_instructions/open_book.txt",
                                  "task_instructions/closed_book.txt"])
def test_prompt_texts_ask_for_an_abstention_phrase(name: str) -> None:
    text = (REPO / "config" / name).read_text(encoding="utf-8")
    assert text.strip() and ("unknown" in text or "I don't know." in text)
