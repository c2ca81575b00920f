"""Loaders for the published QA dataset formats, and `prepare_from_sources` which writes the prepared files.

Each loader returns prepared rows (see `pipeline.data.prepared`) in input order:
- `load_squad_v2`: official SQuAD JSON (`{"version","data":[…]}`) or Hugging Face `squad_v2` rows (JSON lines or a
  JSON list); `is_unanswerable` = is_impossible or no answers; answers cleaned and deduplicated, order kept.
- `load_triviaqa`: Hugging Face `trivia_qa` rc.nocontext rows (JSON lines or a JSON list) or the original unfiltered
  JSON (`{"Data":[…]}`); answers = sorted set of value + aliases, id = question_id (as the original).
- `load_nq_open`: NQ-Open JSON lines (`{"question","answer":[…]}`, or a JSON list); id = the row's `id` when present,
  else md5 of the raw question text (as the original); answers cleaned and deduplicated, order kept.
The format is detected from the content, not the file name. All text goes through `clean_text`.

Two rows with the same id (NQ-Open repeats some questions, and md5 ids then collide) are merged into the first when
their question (and context) agree, answers united; otherwise the file is rejected. Bad input raises
`DataFormatError` naming the file, the line (JSON lines) or the JSON path (documents), what was expected and the fix.
Files larger than `max_file_bytes` are refused before reading; JSON lines are bounded by `MAX_LINE_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pipeline.data.prepared import MAX_LINE_BYTES, DataFormatError, iter_lines, row_problem
from targets.atomic import write_bytes

log = logging.getLogger("pipeline")

MAX_FILE_BYTES = 2 * 1024**3
"""Default size limit for a source file: the largest published split used here (unfiltered TriviaQA) is well below."""

_SQUAD_FIX = ("pass SQuAD v2 as the official JSON (dev-v2.0.json / train-v2.0.json) or as Hugging Face squad_v2 "
              "rows exported to JSON lines (id, title, context, question, answers{text, answer_start})")
_TRIVIAQA_FIX = ("pass TriviaQA as Hugging Face trivia_qa rc.nocontext rows (JSON lines or a JSON list with question, "
                 "question_id, answer{value, aliases}) or the unfiltered JSON ({\"Data\": [{Question, QuestionId, "
                 "Answer{Value, Aliases}}]}); test files without answers cannot be used")
_NQ_FIX = ("pass NQ-Open as JSON lines with one {\"question\": str, \"answer\": [str]} object per line "
           "(NQ-open.dev.jsonl)")


def clean_text(text: str) -> str:
    """Whitespace collapsed to single spaces and stripped, as the original's `clean_text`."""
    return " ".join(text.split())


class _Loc:
    """Where a record sits in its file, for error messages: `file:LINE` or `file at $.json.path`."""

    def __init__(self, path: Path, fix: str, *, line: int | None = None, json_path: str = "$") -> None:
        self.path, self.fix, self.line, self.json_path = path, fix, line, json_path

    def child(self, suffix: str) -> _Loc:
        return _Loc(self.path, self.fix, line=self.line, json_path=self.json_path + suffix)

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}" + (f" at {self.json_path}" if self.json_path != "$" else "")
        return f"{self.path} at {self.json_path}"

    def error(self, problem: str, expected: str) -> DataFormatError:
        return DataFormatError(f"{self}: {problem}; expected {expected}. Fix: {self.fix}")


def _field(obj: dict[str, Any], key: str, types: type | tuple[type, ...], loc: _Loc, expected: str,
           *, required: bool = True) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise loc.error(f"missing or null field {key!r}", expected)
        return None
    value = obj[key]
    # bool is an int subclass; an id or a count given as true/false is a mistake, not a number.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise loc.error(f"field {key!r} is {type(value).__name__}", expected)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _obj(value: Any, loc: _Loc, expected: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise loc.error(f"found {type(value).__name__}", expected)
    return value


def _list(value: Any, loc: _Loc, expected: str) -> list[Any]:
    if not isinstance(value, list):
        raise loc.error(f"found {type(value).__name__}", expected)
    return value


def _texts(values: list[Any], loc: _Loc, expected: str) -> list[str]:
    """Cleaned, non-empty, deduplicated strings, order kept."""
    out: dict[str, None] = {}
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise loc.child(f"[{i}]").error(f"found {type(value).__name__}", expected)
        if text := clean_text(value):
            out.setdefault(text)
    return list(out)


def _ident(obj: dict[str, Any], key: str, loc: _Loc) -> str:
    value = _field(obj, key, (str, int), loc, f"{key!r} to be a non-empty string")
    text = str(value).strip()
    if not text:
        raise loc.error(f"field {key!r} is empty", f"{key!r} to be a non-empty string")
    return text


def _question(obj: dict[str, Any], key: str, loc: _Loc) -> str:
    text = clean_text(_field(obj, key, str, loc, f"{key!r} to be a string"))
    if not text:
        raise loc.error(f"field {key!r} is empty", f"{key!r} to be a non-empty string")
    return text


# ---------------------------------------------------------------------------------------------- reading sources


def _first_line(path: Path) -> bytes | None:
    """The first non-blank line (at most MAX_LINE_BYTES + 1 bytes of it), or None for a blank file."""
    with open(path, "rb") as fh:
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            if raw.strip():
                return raw
    return None


def _read_source(path: Path, fix: str, max_file_bytes: int) -> list[tuple[_Loc, Any]] | tuple[_Loc, Any]:
    """A JSON lines file as `[(loc, value) per non-blank line]`, or a JSON document as `(loc, value)`.

    A file is JSON lines when its first non-blank line parses on its own to an object that is not a whole dataset
    (no `data` / `Data` key); anything else (a pretty-printed or single-line document, a JSON list) is read whole.
    """
    size = path.stat().st_size
    if size > max_file_bytes:
        raise DataFormatError(f"{path}: file is {size} bytes, larger than the limit of {max_file_bytes}; expected a "
                              "single dataset split. Fix: pass a smaller split or raise max_file_bytes")
    first = _first_line(path)
    if first is None:
        raise DataFormatError(f"{path}: file is empty; expected JSON lines or a JSON document. Fix: {fix}")
    try:
        head = json.loads(first) if len(first) <= MAX_LINE_BYTES else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        head = None
    if isinstance(head, dict) and "data" not in head and "Data" not in head:
        records = []
        for lineno, raw in iter_lines(path, max_line_bytes=MAX_LINE_BYTES):
            if not raw.strip():
                continue
            try:
                records.append((_Loc(path, fix, line=lineno), json.loads(raw)))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc}); expected one JSON object per line. "
                                      f"Fix: {fix}") from None
        return records
    try:
        document = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f"{path}:{exc.lineno}:{exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(path)
        raise DataFormatError(f"{where}: not valid JSON ({exc}); expected a JSON document or one JSON object per "
                              f"line. Fix: {fix}") from None
    return _Loc(path, fix), document


def _rows_of(source: list[tuple[_Loc, Any]] | tuple[_Loc, Any], container: str,
             parse_row: Callable[[dict[str, Any], _Loc], dict[str, Any]],
             parse_container: Callable[[list[Any], _Loc], list[tuple[_Loc, dict[str, Any]]]] | None,
             expected_doc: str) -> list[tuple[_Loc, dict[str, Any]]]:
    """Dispatch a read source: JSON lines / a JSON list go row by row, a `{container: […]}` document whole."""
    if isinstance(source, list):
        records = source
    else:
        loc, document = source
        if isinstance(document, list):
            records = [(loc.child(f"[{i}]"), value) for i, value in enumerate(document)]
        elif isinstance(document, dict) and container in document and parse_container is not None:
            items = _list(document[container], loc.child(f".{container}"), "a list")
            return parse_container(items, loc.child(f".{container}"))
        else:
            raise loc.error(f"found a JSON {type(document).__name__} without a {container!r} list", expected_doc)
    return [(loc, parse_row(_obj(value, loc, "a JSON object (one dataset row)"), loc)) for loc, value in records]


def _merge_duplicates(records: list[tuple[_Loc, dict[str, Any]]], kind: Literal["open_book", "closed_book"],
                      same: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows in order, each id once: a repeated id with equal `same` fields is merged into the first (answers
    united, order kept); a repeated id with different content is an error. Every row is checked with row_problem."""
    first: dict[str, tuple[_Loc, dict[str, Any]]] = {}
    merged = 0
    for loc, row in records:
        problem = row_problem(row, kind)
        if problem:
            raise loc.error(problem, f"a valid {kind} item")
        seen = first.get(row["id"])
        if seen is None:
            first[row["id"]] = (loc, row)
            continue
        if any(seen[1][key] != row[key] for key in same):
            raise loc.error(f"id {row['id']!r} repeats the id of {seen[0]} with a different {'/'.join(same)}",
                            "unique ids")
        seen[1]["answers"] = list(dict.fromkeys(seen[1]["answers"] + row["answers"]))
        if kind == "open_book":
            seen[1]["is_unanswerable"] = not seen[1]["answers"]
        merged += 1
    if merged:
        log.info("%s: merged %d repeated items into their first occurrence", records[0][0].path, merged)
    return [row for _, row in first.values()]


# ---------------------------------------------------------------------------------------------- SQuAD v2


def _squad_row(item_id: str, context: str, question: str, answers: list[str], impossible: bool,
               loc: _Loc) -> dict[str, Any]:
    if impossible and answers:
        raise loc.error("is_impossible is true but answers are given", "no answers on an impossible question")
    return {"dataset": "squad_v2", "id": item_id, "context": context, "question": question, "answers": answers,
            "is_unanswerable": impossible or not answers}


def _squad_hf_row(obj: dict[str, Any], loc: _Loc) -> dict[str, Any]:
    answers = _field(obj, "answers", dict, loc, "'answers' to be {\"text\": [str], \"answer_start\": [int]}")
    texts = _field(answers, "text", list, loc.child(".answers"), "'text' to be a list of strings")
    impossible = _field(obj, "is_impossible", bool, loc, "'is_impossible' to be true or false", required=False)
    context = clean_text(_field(obj, "context", str, loc, "'context' to be a string"))
    return _squad_row(_ident(obj, "id", loc), context, _question(obj, "question", loc),
                      _texts(texts, loc.child(".answers.text"), "a string"), bool(impossible), loc)


def _squad_official(articles: list[Any], loc: _Loc) -> list[tuple[_Loc, dict[str, Any]]]:
    out: list[tuple[_Loc, dict[str, Any]]] = []
    for a, article in enumerate(articles):
        aloc = loc.child(f"[{a}]")
        paragraphs = _field(_obj(article, aloc, "an article object"), "paragraphs", list, aloc, "a list of paragraphs")
        for p, paragraph in enumerate(paragraphs):
            ploc = aloc.child(f".paragraphs[{p}]")
            paragraph = _obj(paragraph, ploc, "a paragraph object {context, qas}")
            context = clean_text(_field(paragraph, "context", str, ploc, "'context' to be a string"))
            for q, qa in enumerate(_field(paragraph, "qas", list, ploc, "'qas' to be a list")):
                qloc = ploc.child(f".qas[{q}]")
                qa = _obj(qa, qloc, "a question object {id, question, answers, is_impossible}")
                texts = []
                for n, answer in enumerate(_field(qa, "answers", list, qloc, "'answers' to be a list")):
                    nloc = qloc.child(f".answers[{n}]")
                    texts.append(_field(_obj(answer, nloc, "an answer object {text, answer_start}"), "text", str,
                                        nloc, "'text' to be a string"))
                impossible = _field(qa, "is_impossible", bool, qloc, "'is_impossible' to be true or false",
                                    required=False)
                row = _squad_row(_ident(qa, "id", qloc), context, _question(qa, "question", qloc),
                                 _texts(texts, qloc.child(".answers"), "a string"), bool(impossible), qloc)
                out.append((qloc, row))
    return out


def load_squad_v2(path: Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> list[dict]:
    """SQuAD v2 rows in file order, from the official JSON or Hugging Face rows (JSON lines or a JSON list)."""
    source = _read_source(Path(path), _SQUAD_FIX, max_file_bytes)
    records = _rows_of(source, "data", _squad_hf_row, _squad_official, "the official {\"version\", \"data\": [...]}")
    return _merge_duplicates(records, "open_book", ("context", "question"))


# ---------------------------------------------------------------------------------------------- TriviaQA


def _triviaqa_row(obj: dict[str, Any], loc: _Loc, keys: dict[str, str]) -> dict[str, Any]:
    question = _question(obj, keys["question"], loc)
    qid_key = next((k for k in (keys["id"], "id") if obj.get(k) not in (None, "")), None)
    # The original fell back to md5 of the question when a row has no id; kept for compatibility.
    item_id = (_ident(obj, qid_key, loc) if qid_key else
               hashlib.md5(obj[keys["question"]].encode("utf-8"), usedforsecurity=False).hexdigest())
    answer = _field(obj, keys["answer"], dict, loc, f"{keys['answer']!r} to be an object with "
                                                     f"{keys['value']!r} and {keys['aliases']!r}")
    aloc = loc.child(f".{keys['answer']}")
    value = _field(answer, keys["value"], str, aloc, f"{keys['value']!r} to be a string", required=False)
    aliases = _field(answer, keys["aliases"], list, aloc, f"{keys['aliases']!r} to be a list of strings",
                     required=False)
    alias_texts = _texts(aliases or [], aloc.child(f".{keys['aliases']}"), "a string")
    golds = sorted({clean_text(value or ""), *alias_texts} - {""})
    if not golds:
        raise aloc.error("no non-empty answer value or alias", "at least one gold answer")
    return {"dataset": "triviaqa", "id": item_id, "question": question, "answers": golds}


_TQA_HF = {"question": "question", "id": "question_id", "answer": "answer", "value": "value", "aliases": "aliases"}
_TQA_UNFILTERED = {"question": "Question", "id": "QuestionId", "answer": "Answer", "value": "Value",
                   "aliases": "Aliases"}


def _triviaqa_unfiltered(items: list[Any], loc: _Loc) -> list[tuple[_Loc, dict[str, Any]]]:
    out = []
    for i, value in enumerate(items):
        iloc = loc.child(f"[{i}]")
        out.append((iloc, _triviaqa_row(_obj(value, iloc, "a question object"), iloc, _TQA_UNFILTERED)))
    return out


def load_triviaqa(path: Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> list[dict]:
    """TriviaQA rows in file order, from Hugging Face rc.nocontext rows or the original unfiltered JSON."""
    source = _read_source(Path(path), _TRIVIAQA_FIX, max_file_bytes)
    records = _rows_of(source, "Data", lambda obj, loc: _triviaqa_row(obj, loc, _TQA_HF), _triviaqa_unfiltered,
                       "a JSON list of rows or the unfiltered {\"Data\": [...]}")
    return _merge_duplicates(records, "closed_book", ("question",))


# ---------------------------------------------------------------------------------------------- NQ-Open


def _nq_row(obj: dict[str, Any], loc: _Loc) -> dict[str, Any]:
    question = _question(obj, "question", loc)
    key = "answer" if "answer" in obj or "answers" not in obj else "answers"
    answers = _field(obj, key, (list, str), loc, f"{key!r} to be a list of strings")
    golds = _texts([answers] if isinstance(answers, str) else answers, loc.child(f".{key}"), "a string")
    if not golds:
        raise loc.error(f"field {key!r} has no non-empty answer", "at least one gold answer")
    item_id = (_ident(obj, "id", loc) if obj.get("id") not in (None, "") else
               hashlib.md5(obj["question"].encode("utf-8"), usedforsecurity=False).hexdigest())
    return {"dataset": "nq_open", "id": item_id, "question": question, "answers": golds}


def load_nq_open(path: Path, *, max_file_bytes: int = MAX_FILE_BYTES) -> list[dict]:
    """NQ-Open rows in file order from JSON lines (or a JSON list) of `{"question", "answer": [...]}`."""
    source = _read_source(Path(path), _NQ_FIX, max_file_bytes)
    records = _rows_of(source, "data", _nq_row, None, "one JSON object per line")
    return _merge_duplicates(records, "closed_book", ("question",))


# ---------------------------------------------------------------------------------------------- prepare


def _shuffled(rows: list[dict], seed: int, max_items: int | None) -> list[dict]:
    """The original's selection: shuffle with a fresh random.Random(seed) per dataset, then keep the first N."""
    random.Random(seed).shuffle(rows)
    return rows if max_items is None else rows[:max_items]


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows).encode("utf-8")


def prepare_from_sources(*, squad_v2: Path | None, triviaqa: Path | None, nq_open: Path | None, out_dir: Path,
                         seed: int = 2025, open_book_max_items: int | None = None,
                         triviaqa_max_items: int | None = None, nq_open_max_items: int | None = None,
                         max_file_bytes: int = MAX_FILE_BYTES) -> dict:
    """Write `out_dir/open_book.jsonl` (SQuAD v2) and `out_dir/closed_book.jsonl` (TriviaQA rows, then NQ-Open).

    Every source is loaded and validated before anything is written; each file is then replaced atomically and its
    bytes depend only on the inputs and the arguments. A source left out gives no rows (an empty file for
    open_book). Returns `{"open_book": {"items", "sha256"}, "closed_book": {"items", "sha256"}}`.
    """
    if squad_v2 is None and triviaqa is None and nq_open is None:
        raise ValueError("prepare_from_sources needs at least one of squad_v2, triviaqa, nq_open")
    caps = {"open_book_max_items": open_book_max_items, "triviaqa_max_items": triviaqa_max_items,
            "nq_open_max_items": nq_open_max_items}
    for name, cap in caps.items():
        if cap is not None and cap < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {cap}")
    open_rows = (_shuffled(load_squad_v2(squad_v2, max_file_bytes=max_file_bytes), seed, open_book_max_items)
                 if squad_v2 is not None else [])
    closed_rows: list[dict] = []
    if triviaqa is not None:
        closed_rows += _shuffled(load_triviaqa(triviaqa, max_file_bytes=max_file_bytes), seed, triviaqa_max_items)
    if nq_open is not None:
        closed_rows += _shuffled(load_nq_open(nq_open, max_file_bytes=max_file_bytes), seed, nq_open_max_items)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, Any]] = {}
    for kind, rows in (("open_book", open_rows), ("closed_book", closed_rows)):
        data = _jsonl_bytes(rows)
        write_bytes(out_dir / f"{kind}.jsonl", data)
        summary[kind] = {"items": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    return summary
