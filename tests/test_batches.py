from __future__ import annotations

import json

from pipeline.batches import build_lines, render, split_parts
from pipeline.naming import parse_custom_id

INSTRUCTIONS = {"open": "Use the context.", "closed": "Answer briefly."}


def rows(n: int, kind: str) -> list[dict]:
    if kind == "open":
        return [{"dataset": "squad_v2", "id": f"o{i}", "context": f"C{i}", "question": f"Q{i}?", "answers": ["a"],
                 "is_unanswerable": False} for i in range(n)]
    return [{"dataset": "nq_open", "id": f"c{i}", "question": f"Q{i}?", "answers": ["a"]} for i in range(n)]


def test_line_format_is_the_originals() -> None:
    (line,) = build_lines(closed_rows=rows(1, "closed"), open_rows=[], condition="control", temp=0.7, samples=1,
                          system_prompt=" System.\n", instructions=INSTRUCTIONS)
    obj = json.loads(line.text)
    assert obj["custom_id"] == "nq_open|c0|control|0.7|0|closed"
    assert obj["body"] == {"messages": [{"role": "system", "content": "System."},
                                        {"role": "user", "content": "Answer briefly.\n\nQUESTION:\nQ0?"}]}


def test_open_book_user_text_and_order() -> None:
    lines = build_lines(closed_rows=rows(2, "closed"), open_rows=rows(1, "open"), condition="treatment", temp=0.0,
                        samples=2, system_prompt="S", instructions=INSTRUCTIONS, stop=["\n"], use_batch_api=False)
    ids = [line.custom_id for line in lines]
    assert ids == ["nq_open|c0|treatment|0.0|0|closed", "nq_open|c0|treatment|0.0|1|closed",
                   "nq_open|c1|treatment|0.0|0|closed", "nq_open|c1|treatment|0.0|1|closed",
                   "squad_v2|o0|treatment|0.0|0|open", "squad_v2|o0|treatment|0.0|1|open"]
    body = json.loads(lines[-1].text)["body"]
    assert body["messages"][1]["content"] == "Use the context.\n\nCONTEXT:\nC0\n\nQUESTION:\nQ0?"
    assert body["stop"] == ["\n"]


def test_no_row_limit_and_type_homogeneous_parts() -> None:
    lines = build_lines(closed_rows=rows(6000, "closed"), open_rows=rows(4500, "open"), condition="control",
                        temp=0.25, samples=1, system_prompt="S", instructions=INSTRUCTIONS)
    assert len(lines) == 10500
    assert len({line.custom_id for line in lines}) == 10500
    parts = split_parts(lines, 4000)
    assert [len(p) for p in parts] == [4000, 2000, 4000, 500]
    assert all(len({line.type for line in part}) == 1 for part in parts)
    assert sum(len(p) for p in parts) == len(lines)
    assert parse_custom_id(parts[-1][-1].custom_id).temp == "0.25"
    assert render(parts[0]).count(b"\n") == 4000


def test_byte_limited_parts_fit_with_their_wire_envelope_and_are_full() -> None:
    """Over contexts of random sizes and several limits: each part fits the limit (every line counted with the wire
    allowance), the next line would not have fitted (parts are as full as the limit allows), order and types kept."""
    import random

    from pipeline.batches import WIRE_LINE_OVERHEAD

    rng = random.Random(7)
    open_rows = [{**row, "context": "x" * rng.randint(0, 6000)} for row in rows(300, "open")]
    lines = build_lines(closed_rows=rows(200, "closed"), open_rows=open_rows, condition="control", temp=0.0,
                        samples=2, system_prompt="S", instructions=INSTRUCTIONS)

    def cost(line) -> int:  # noqa: ANN001
        return len(line.text.encode()) + 1 + WIRE_LINE_OVERHEAD

    for limit in (7_000, 50_000, 400_000):
        parts = split_parts(lines, 10_000, limit)
        assert [line for part in parts for line in part] == lines
        for part, following in zip(parts, [*parts[1:], None], strict=True):
            assert sum(map(cost, part)) <= limit and len({line.type for line in part}) == 1
            if following is not None and following[0].type == part[0].type:
                assert sum(map(cost, part)) + cost(following[0]) > limit


def test_a_line_larger_than_the_byte_limit_is_refused_naming_it() -> None:
    import pytest

    lines = build_lines(closed_rows=[], open_rows=[{**rows(1, "open")[0], "context": "x" * 5000}],
                        condition="control", temp=0.0, samples=1, system_prompt="S", instructions=INSTRUCTIONS)
    with pytest.raises(ValueError, match="squad_v2\\|o0"):
        split_parts(lines, 10, 4096)
