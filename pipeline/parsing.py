"""Provider result lines → prediction rows, and the checks that make a part's results trustworthy.

Accepted line shapes (original_system.md §4 "Results line"): `{"custom_id"|"customId": id, "response": R}` with
`body = R.body or R`, text from `body.choices[0].message.content` (else `body.message.content`, else
`body.content`), plus error lines: any line with a custom_id but no usable response (e.g. `{"custom_id", "error"}`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.naming import parse_custom_id

PREDICTION_COLUMNS = (
    "custom_id", "dataset", "item_id", "condition", "temp", "sample_index", "type", "request_id", "finish_reason",
    "response_text", "prompt_tokens", "completion_tokens", "total_tokens", "error",
)
MAX_LINE_BYTES = 16 * 1024 * 1024


class ResultsError(ValueError):
    """A results file that cannot be used as is; the message names the file, the line and the fix."""


def line_custom_id(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return None
    cid = obj.get("custom_id", obj.get("customId"))
    return cid if isinstance(cid, str) and cid else None


def _body(response: object) -> dict | None:
    if not isinstance(response, dict):
        return None
    body = response.get("body", response)
    return body if isinstance(body, dict) else None


def _text(body: dict) -> str | None:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return message["content"]
    message = body.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return message["content"]
    return body["content"] if isinstance(body.get("content"), str) else None


def _int(value: object) -> int:
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def _error_text(obj: dict) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or "provider error")[:500]
    if err:
        return str(err)[:500]
    return "no usable response in result line"


def prediction_row(obj: dict) -> dict[str, object]:
    """One predictions.csv row from a result line (which must carry a valid custom_id)."""
    cid = line_custom_id(obj)
    if cid is None:
        raise ValueError("result line has no custom_id")
    parts = parse_custom_id(cid)
    response = obj.get("response")
    body = _body(response)
    text = _text(body) if body else None
    usage = (response.get("usage") if isinstance(response, dict) else None) or (body or {}).get("usage") or {}
    usage = usage if isinstance(usage, dict) else {}
    finish = ""
    if body and isinstance(body.get("choices"), list) and body["choices"] and isinstance(body["choices"][0], dict):
        finish = str(body["choices"][0].get("finish_reason") or "")
    request_id = ""
    if isinstance(response, dict):
        request_id = str(response.get("request_id") or response.get("id") or (body or {}).get("id") or "")
    prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    total = _int(usage.get("total_tokens")) or prompt + completion
    return {
        "custom_id": cid, "dataset": parts.dataset, "item_id": parts.item_id, "condition": parts.condition,
        "temp": parts.temp, "sample_index": parts.sample_index, "type": parts.type, "request_id": request_id,
        "finish_reason": finish, "response_text": (text or "").strip(), "prompt_tokens": prompt,
        "completion_tokens": completion, "total_tokens": total, "error": "" if text is not None else _error_text(obj),
    }


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; raises ResultsError naming the file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise ResultsError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; the file is not a results file")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ResultsError(f"{path}:{lineno}: not valid JSON ({exc.__class__.__name__}); "
                                   "delete the file to download the part again") from None
            if not isinstance(obj, dict):
                raise ResultsError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


@dataclass
class PartCheck:
    """The outcome of checking one part's results against the custom_ids of its input."""

    rows: int = 0
    ok: int = 0
    errors: int = 0
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems and not self.missing


def check_part_results(path: Path, expected: list[str]) -> PartCheck:
    """Every line parses, carries a custom_id of the part's input (no duplicates), and every input id is accounted for."""
    check = PartCheck()
    wanted = set(expected)
    seen: set[str] = set()
    try:
        for lineno, obj in iter_jsonl(path):
            cid = line_custom_id(obj)
            if cid is None:
                check.problems.append(f"{path}:{lineno}: no custom_id")
                continue
            if cid not in wanted:
                check.problems.append(f"{path}:{lineno}: custom_id {cid!r} is not in this part's input")
                continue
            if cid in seen:
                check.problems.append(f"{path}:{lineno}: duplicate custom_id {cid!r}")
                continue
            seen.add(cid)
            check.rows += 1
            if not has_answer(obj):
                check.errors += 1
            else:
                check.ok += 1
    except (OSError, ResultsError) as exc:
        check.problems.append(str(exc))
    check.missing = [c for c in expected if c not in seen]
    return check


def input_custom_ids(path: Path) -> list[str]:
    ids: list[str] = []
    for lineno, obj in iter_jsonl(path):
        cid = line_custom_id(obj)
        if cid is None:
            raise ResultsError(f"{path}:{lineno}: request line without custom_id")
        ids.append(cid)
    return ids


def iter_jsonl_lenient(path: Path, problems: list[str]) -> Iterator[tuple[int, dict]]:
    """Like `iter_jsonl`, but a bad line is recorded in `problems` and skipped instead of ending the file."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            if len(raw) > MAX_LINE_BYTES:
                problems.append(f"{path.name}:{lineno}: line longer than {MAX_LINE_BYTES} bytes")
                continue
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                problems.append(f"{path.name}:{lineno}: not valid JSON")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path.name}:{lineno}: not a JSON object")
                continue
            yield lineno, obj


def has_answer(obj: dict) -> bool:
    return _text(_body(obj.get("response")) or {}) is not None


def merge_results(sources: Iterable[Path], expected: list[str]) -> tuple[list[dict], list[str]]:
    """Result objects in input order and the problems seen; for each expected id an answer beats an error line,
    and the first copy wins among equals. Lines with unknown custom_ids are dropped, so a provider cannot inject rows.
    """
    wanted = set(expected)
    found: dict[str, dict] = {}
    problems: list[str] = []
    for source in sources:
        for lineno, obj in iter_jsonl_lenient(source, problems):
            cid = line_custom_id(obj)
            if cid is None or cid not in wanted:
                problems.append(f"{source.name}:{lineno}: custom_id {cid!r} is not in this part's input; dropped")
                continue
            prior = found.get(cid)
            if prior is None or (not has_answer(prior) and has_answer(obj)):
                found[cid] = obj
    return [found[c] for c in expected if c in found], problems


def missing_result(custom_id: str, reason: str) -> dict:
    """The line that accounts for a request the provider returned nothing for."""
    return {"custom_id": custom_id, "error": {"code": "missing", "message": reason}}


def predictions_writer(out: IO[str]) -> csv.DictWriter:
    """A CSV writer of prediction rows (fixed column order) that has already written the header."""
    writer = csv.DictWriter(out, fieldnames=PREDICTION_COLUMNS, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writeheader()
    return writer
