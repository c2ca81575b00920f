"""Reading and validating the prepared format (light: stdlib only).

open_book rows: `{"dataset","id","context","question","answers":[str],"is_unanswerable":bool}`;
closed_book rows: `{"dataset","id","question","answers":[str]}`. Extra keys are allowed and kept.

Contract of a valid row (checked by :func:`row_problem`, enforced by :func:`read_prepared`):
- the required keys are present with those types; answers are non-empty strings;
- dataset and id are non-empty and contain no `|` (custom_ids are `|`-joined without escaping);
- open_book: `is_unanswerable` is true exactly when `answers` is empty; closed_book: at least one answer;
- (dataset, id) is unique within a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

MAX_LINE_BYTES = 10 * 1024 * 1024
KINDS = ("open_book", "closed_book")
REQUIRED: dict[str, dict[str, type]] = {
    "open_book": {"dataset": str, "id": str, "context": str, "question": str, "answers": list, "is_unanswerable": bool},
    "closed_book": {"dataset": str, "id": str, "question": str, "answers": list},
}


class DataFormatError(ValueError):
    """Input data that does not have the expected shape; the message names the file, the place and the fix."""


def iter_lines(path: Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """`(line number, raw line)` for every line of `path`; a line longer than `max_line_bytes` is an error.

    Reads with a bounded `readline` so one runaway line (a whole JSON document on one line, a binary file)
    cannot pull gigabytes into memory before being rejected.
    """
    with open(path, "rb") as fh:
        lineno = 0
        while raw := fh.readline(max_line_bytes + 1):
            lineno += 1
            if len(raw) > max_line_bytes:
                raise DataFormatError(f"{path}:{lineno}: line longer than {max_line_bytes} bytes; expected one JSON "
                                      "object per line. Fix: check that this is a JSON lines file, not a single "
                                      "JSON document or a binary file")
            yield lineno, raw


def row_problem(row: object, kind: Literal["open_book", "closed_book"]) -> str | None:
    """What is wrong with one prepared row (a sentence), or None when it is valid. Uniqueness is not checked here."""
    if kind not in REQUIRED:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key, typ in REQUIRED[kind].items():
        if key not in row:
            return f"missing field {key!r}"
        if not isinstance(row[key], typ):
            return f"field {key!r} must be {typ.__name__}, got {type(row[key]).__name__}"
    if not all(isinstance(a, str) and a.strip() for a in row["answers"]):
        return "every entry of 'answers' must be a non-empty string"
    for key in ("dataset", "id"):
        if not row[key] or "|" in row[key]:
            return f"{key} {row[key]!r} is empty or contains '|' (custom_ids use '|' as separator)"
    if kind == "open_book" and row["is_unanswerable"] != (not row["answers"]):
        return ("is_unanswerable must be true exactly when answers is empty "
                f"(is_unanswerable={row['is_unanswerable']}, {len(row['answers'])} answers)")
    if kind == "closed_book" and not row["answers"]:
        return "closed-book items need at least one gold answer"
    return None


def read_prepared(path: Path, kind: Literal["open_book", "closed_book"], *, max_items: int | None = None) -> list[dict]:
    """Every row of a prepared JSON lines file, validated; `max_items` keeps the first N rows (only those are read).

    Blank lines are skipped. Raises DataFormatError naming `path:line`, the problem and the fix.
    """
    if kind not in REQUIRED:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if max_items is not None and max_items < 0:
        raise ValueError(f"max_items must be >= 0 or None, got {max_items}")
    fix = (f"Fix: correct that line ({kind} format: {', '.join(REQUIRED[kind])}) "
           "or regenerate the file with `python -m pipeline prepare-data`")
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    if max_items == 0:
        return rows
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataFormatError(f"{path}:{lineno}: not valid UTF-8 JSON ({exc}). {fix}") from None
        problem = row_problem(row, kind)
        if problem:
            raise DataFormatError(f"{path}:{lineno}: {problem}. {fix}")
        ident = (row["dataset"], row["id"])
        if ident in seen:
            raise DataFormatError(f"{path}:{lineno}: duplicate item {ident[0]}|{ident[1]}; (dataset, id) must be "
                                  f"unique. {fix}")
        seen.add(ident)
        rows.append(row)
        if max_items is not None and len(rows) >= max_items:
            break
    return rows
