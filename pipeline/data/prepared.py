"""Reading and validating the prepared format (light: stdlib only).

open_book rows: `{"dataset","id","context","question","answers":[str],"is_unanswerable":bool}`;
closed_book rows: `{"dataset","id","question","answers":[str]}`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

MAX_LINE_BYTES = 10 * 1024 * 1024
REQUIRED = {
    "open_book": {"dataset": str, "id": str, "context": str, "question": str, "answers": list, "is_unanswerable": bool},
    "closed_book": {"dataset": str, "id": str, "question": str, "answers": list},
}


class DataFormatError(ValueError):
    """Input data that does not have the expected shape; names the file, the line and the fix."""


def read_prepared(path: Path, kind: Literal["open_book", "closed_book"], *, max_items: int | None = None) -> list[dict]:
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    fix = f"regenerate it with `python -m pipeline prepare-data` or fix the line by hand ({kind} format)"
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if max_items is not None and len(rows) >= max_items:
                break
            if len(raw) > MAX_LINE_BYTES:
                raise DataFormatError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; {fix}")
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc}); {fix}") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object; {fix}")
            for key, typ in REQUIRED[kind].items():
                if not isinstance(row.get(key), typ):
                    raise DataFormatError(f"{path}:{lineno}: field {key!r} must be {typ.__name__}; {fix}")
            if not all(isinstance(a, str) for a in row["answers"]):
                raise DataFormatError(f"{path}:{lineno}: every answer must be a string; {fix}")
            for key in ("dataset", "id"):
                if "|" in row[key] or not row[key]:
                    raise DataFormatError(f"{path}:{lineno}: {key} {row[key]!r} is empty or contains '|'; {fix}")
            ident = (row["dataset"], row["id"])
            if ident in seen:
                raise DataFormatError(f"{path}:{lineno}: duplicate item {ident[0]}|{ident[1]}; {fix}")
            seen.add(ident)
            rows.append(row)
    return rows


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
