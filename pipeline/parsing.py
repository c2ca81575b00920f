"""Provider result lines → prediction rows, and the checks that make a part's results trustworthy.

Accepted line shapes (original_system.md §4 "Results line"): `{"custom_id"|"customId": id, "response": R}` with
`body = R.body or R`, text from `body.choices[0].message.content` (else `body.message.content`, else
`body.content`), plus error lines: any line with a custom_id but no usable response (e.g. `{"custom_id", "error"}`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np
import orjson

from pipeline.gcpause import gc_paused
from pipeline.naming import parse_custom_id

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "custom_id", "dataset", "item_id", "condition", "temp", "sample_index", "type", "request_id", "finish_reason",
    "response_text", "prompt_tokens", "completion_tokens", "total_tokens", "error", "cache_read_tokens",
    "cache_write_tokens",
)
"""predictions.csv columns, in order. The cache counts come last so every earlier column keeps its position (the
original system's 13 columns, then `error`, then what was added later)."""
MAX_LINE_BYTES = 16 * 1024 * 1024
_TAILS: dict[str, tuple[str, str, int, str]] = {}  # checked custom_id tails: (condition, temp, sample_index, type)
_TAILS_MAX = 1 << 16
_BLOCK_BYTES = 1 << 22
_loads = msgspec.json.Decoder().decode  # about 3x json.loads on result lines, with the same values (integers of
# any size); what it refuses (NaN, 1e400, lone surrogates, a BOM) is decided by json.loads


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


def _error_text(obj: dict) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or "provider error")[:500]
    if err:
        return str(err)[:500]
    return "no usable response in result line"


def _custom_id_fields(cid: str) -> tuple[str, str, str, str, int, str]:
    """`parse_custom_id` without building a CustomId (this runs once per result line); the same checks and errors.

    The tail `condition|temp|sample|type` repeats across a file, so each distinct tail is checked once.
    """
    fields = cid.split("|", 2)
    tail = _TAILS.get(fields[-1]) if len(fields) == 3 else None
    if tail is None:
        parts = parse_custom_id(cid)  # raises the error that names what is wrong
        tail = (parts.condition, parts.temp, parts.sample_index, parts.type)
        if len(_TAILS) < _TAILS_MAX:
            _TAILS[fields[-1]] = tail
    return fields[0], fields[1], *tail


def _cache_counts(usage: object) -> tuple[int, int]:
    """(cache_read_tokens, cache_write_tokens) of a usage dict: Anthropic's `cache_read_input_tokens` /
    `cache_creation_input_tokens`, else OpenAI's `prompt_tokens_details.cached_tokens` as reads; each is
    `int(float(value))`, 0 when absent, not a number or negative; anything but a dict counts as no usage."""
    if not isinstance(usage, dict):
        return 0, 0
    read = usage.get("cache_read_input_tokens")
    write = usage.get("cache_creation_input_tokens")
    if read is None:
        details = usage.get("prompt_tokens_details")
        read = details.get("cached_tokens") if isinstance(details, dict) else None
        if read is None and write is None:  # the usual usage dict (no cache counts): nothing to convert
            return 0, 0
    counts = []
    for value in (read, write):
        try:
            counts.append(max(int(float(value)), 0))  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            counts.append(0)
    return counts[0], counts[1]


def prediction_fields(obj: dict) -> tuple[str, str, str, str, str, int, str, str, str, str, int, int, int, str, int, int]:
    """One predictions.csv row, in `PREDICTION_COLUMNS` order, from a result line (which must carry a valid custom_id).

    Text and finish_reason come from `body.choices[0]` (text falls back to `body.message.content`, then
    `body.content`); usage from `response.usage`, else `body.usage`; request_id from `response.request_id`, else
    `response.id`, else `body.id`; tokens are `int(float(value))` (0 when not a number), total falls back to
    prompt + completion; the cache counts are `_cache_counts` of the usage (they are part of prompt_tokens, as
    every provider's canonical usage counts them). A line without text is an error row whose `error` says why.
    """
    cid = obj.get("custom_id", obj.get("customId"))
    if not isinstance(cid, str) or not cid:
        raise ValueError("result line has no custom_id")
    dataset, item_id, condition, temp, sample_index, type_ = _custom_id_fields(cid)
    response = obj.get("response")
    is_dict = isinstance(response, dict)
    body = response.get("body", response) if is_dict else None
    if not isinstance(body, dict):
        body = None
    text = None
    finish = ""
    if body:
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            first = choices[0]
            message = first.get("message")
            if isinstance(message, dict):
                content = message.get("content")
                text = content if isinstance(content, str) else None
            finish = str(first.get("finish_reason") or "")
        if text is None:
            text = _text(body)
    usage = (response.get("usage") if is_dict else None) or (body or {}).get("usage")
    request_id = str(response.get("request_id") or response.get("id") or (body or {}).get("id") or "") if is_dict else ""
    return (cid, dataset, item_id, condition, temp, sample_index, type_, request_id, finish, (text or "").strip(),
            *_usage_counts(usage), "" if text is not None else _error_text(obj), *_cache_counts(usage))


def _usage_counts(usage: object) -> tuple[int, int, int]:
    """(prompt, completion, total) tokens of a usage dict, each `int(float(value))`, 0 when that fails; total falls
    back to prompt + completion. Anything but a dict counts as no usage."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    # int(float(value)), 0 when that fails: inlined, this runs three times per result line
    try:
        prompt = int(float(usage.get("prompt_tokens")))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        prompt = 0
    try:
        completion = int(float(usage.get("completion_tokens")))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        completion = 0
    try:
        total = int(float(usage.get("total_tokens"))) or prompt + completion  # type: ignore[arg-type]
    except (TypeError, ValueError):
        total = prompt + completion
    return prompt, completion, total


_EXACT = 1 << 53  # token counts up to this are unchanged by int(float(n)); larger ones take the slow path


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    finish_reason: Any = None


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class _Body(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    id: Any = None


class _Response(msgspec.Struct):
    body: _Body | msgspec.UnsetType = msgspec.UNSET
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    id: Any = None
    request_id: Any = None


class _Line(msgspec.Struct):
    """The fields of a result line that an answer row reads, typed as the usual answer shape has them; msgspec
    skips the rest of the line undecoded."""

    custom_id: Any = msgspec.UNSET
    customId: Any = msgspec.UNSET  # noqa: N815 (the wire name)
    response: _Response | None = None


_decode_answer = msgspec.json.Decoder(_Line).decode


def _answer_fields(raw: bytes) -> tuple | None:
    """`prediction_fields` of a line in the usual answer shape, decoding only the fields it reads; None for any
    other line, which `prediction_fields` then decides. The usual shape: a valid custom_id,
    `choices[0].message.content` a string, token counts integers below 2**53, usage in one place, and
    every other field it reads of the type that shape has (tests/test_parsing.py compares the two on many shapes).

    msgspec refuses what json reads differently (NaN, 1e400, lone surrogates), so those lines take the slow path.
    """
    try:
        line = _decode_answer(raw)
    except msgspec.MsgspecError:
        return None
    response = line.response
    cid = line.custom_id if line.custom_id is not msgspec.UNSET else line.customId
    if response is None or not isinstance(cid, str) or not cid:
        return None
    body = response if response.body is msgspec.UNSET else response.body
    choices = body.choices
    if not choices:
        return None
    first = choices[0]
    message = first.message
    text = message.content if message is not None else None
    if text is None:
        return None
    try:
        id_fields = _custom_id_fields(cid)
    except ValueError:  # the general path reports it, naming the file and line
        return None
    usage = response.usage
    if usage is None:
        usage = body.usage
    elif body is not response and body.usage is not None:  # which one counts depends on emptiness: slow path
        return None
    if usage is None:
        prompt = completion = total = cache_read = cache_write = 0
    else:
        prompt, completion, total = usage.prompt_tokens or 0, usage.completion_tokens or 0, usage.total_tokens
        cache_read, cache_write = usage.cache_read_input_tokens, usage.cache_creation_input_tokens
        if cache_read is None and usage.prompt_tokens_details is not None:
            cache_read = usage.prompt_tokens_details.cached_tokens
        if not (-_EXACT < prompt < _EXACT and -_EXACT < completion < _EXACT and -_EXACT < (total or 0) < _EXACT
                and (cache_read or 0) < _EXACT and (cache_write or 0) < _EXACT):
            return None
        total = total or prompt + completion
        cache_read = max(cache_read or 0, 0)
        cache_write = max(cache_write or 0, 0)
    return (cid, *id_fields, str(response.request_id or response.id or body.id or ""),
            str(first.finish_reason or ""), text.strip(), prompt, completion, total, "", cache_read, cache_write)


_NOT_JSON = object()


class _DecodedByJson(dict):
    """A result object that only json could decode (NaN, 1e400, lone surrogates): `result_lines` writes it back
    with json, as orjson would write those values as null or refuse them."""


def _decode_line(raw: bytes) -> object:
    """`json.loads(raw)`, or `_NOT_JSON` when it fails; msgspec first (about 3x faster), json for what it refuses
    (NaN, 1e400, lone surrogates), so the accepted lines and their values are json's (an object only json could
    decode is a `_DecodedByJson`)."""
    try:
        return _loads(raw)
    except msgspec.MsgspecError:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _NOT_JSON
        return _DecodedByJson(obj) if type(obj) is dict else obj


def result_lines(objects: Iterable[dict]) -> bytes:
    """A part's results.jsonl: one object per line, keys sorted (the same bytes whatever order the provider sent
    the keys in). orjson writes UTF-8; what it cannot write exactly (a `_DecodedByJson` object, passed through as a
    dict subclass; an integer beyond 64 bits) json writes, in ASCII escapes, which json reads back exactly."""
    dumps, option = orjson.dumps, orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_APPEND_NEWLINE
    lines = []
    for obj in objects:
        try:
            lines.append(dumps(obj, option=option))
        except TypeError:  # orjson.JSONEncodeError
            lines.append(json.dumps(obj, sort_keys=True).encode("ascii") + b"\n")
    return b"".join(lines)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; raises ResultsError naming the file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if len(raw) > MAX_LINE_BYTES:
                raise ResultsError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; the file is not a results file")
            if not raw.strip():
                continue
            obj = _decode_line(raw)
            if obj is _NOT_JSON:
                _decode_with_json(raw, path, lineno)  # raises the ResultsError that names the failure
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
            obj = _decode_line(raw)
            if obj is _NOT_JSON:
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
    with gc_paused():  # every kept line is a few new acyclic dicts
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


def with_missing(found: list[dict], expected: list[str], reason: str) -> tuple[list[dict], list[str]]:
    """(`found` in `expected` order with a `missing_result` for each request it has no line for, those requests);
    `found` as it is when it answers every request (as `merge_results` returns it: in input order)."""
    answered = {line_custom_id(o) for o in found}
    missing = [c for c in expected if c not in answered]
    if not missing:
        return found, missing
    by_id = {line_custom_id(o): o for o in found}
    return [by_id.get(c) or missing_result(c, reason) for c in expected], missing


class _CsvLines:
    """predictions.csv lines exactly as `csv.writer(quoting=QUOTE_MINIMAL, lineterminator="\\n")` writes them.

    A row whose fields hold no comma, quote or line break needs no quoting, so it is formatted directly (`%s` is
    `str`, as for the csv module); any other row goes through the csv module.
    """

    _FORMAT = ",".join(["%s"] * len(PREDICTION_COLUMNS)) + "\n"
    _COMMAS = len(PREDICTION_COLUMNS) - 1

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")

    def line(self, fields: tuple) -> str:
        line = self._FORMAT % fields
        if line.count(",") == self._COMMAS and '"' not in line and "\r" not in line and line.count("\n") == 1:
            return line
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(fields)
        return self._buffer.getvalue()


class PredictionColumns:
    """The predictions.csv fields scoring reads, kept columnar while `write_predictions` writes the CSV.

    Per row: `cell` (code of its distinct `(dataset, item_id, type, condition, temp)`), `status` (index into
    `STATUSES`: `provider_error` when the error text is not blank, else `truncated` when the finish_reason is
    "length", else `ok`: the rule scoring applies to the CSV) and `response` (code of its distinct response text).
    Each distinct value is stored once, so memory is a few bytes per row plus the distinct texts.
    """

    STATUSES = ("ok", "provider_error", "truncated")

    def __init__(self) -> None:
        self.cells: dict[str, int] = {}  # "dataset|item_id|type|condition|temp": no field holds a "|"
        self.responses: dict[str, int] = {}
        self.cell = array("i")
        self.status = array("b")
        self.response = array("i")

    def arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no pickled objects): what `save` writes and `load_prediction_columns` reads back."""
        cells = [key.split("|") for key in self.cells]
        out = {"cell": np.frombuffer(self.cell, dtype=np.int32), "status": np.frombuffer(self.status, dtype=np.int8),
               "response": np.frombuffer(self.response, dtype=np.int32)}
        for k, name in enumerate(CELL_FIELDS):
            out[f"{name}_bytes"], out[f"{name}_offsets"] = _pack([c[k] for c in cells])
        out["responses_bytes"], out["responses_offsets"] = _pack(list(self.responses))
        return out

    def save(self, fh: IO[bytes]) -> None:
        np.savez(fh, **self.arrays())


CELL_FIELDS = ("dataset", "item_id", "type", "condition", "temp")


def _pack(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of `texts` back to back, and the offsets where each starts (plus the end)."""
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The texts `_pack` packed; equal texts are one object (cell fields repeat: a million cells, a few datasets)."""
    raw = data.tobytes()
    bounds = offsets.tolist()
    shared: dict[str, str] = {}
    return [shared.setdefault(text, text)
            for text in (raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(bounds[:-1], bounds[1:], strict=True))]


class PackedTexts:
    """Texts as UTF-8 bytes back to back with their offsets (a few bytes each instead of a Python str); indexing
    with an array of positions decodes those texts into an object array."""

    def __init__(self, data: bytes, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        raw = self.data
        starts, ends = self.offsets[index].tolist(), self.offsets[np.asarray(index) + 1].tolist()
        return np.array([raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(starts, ends, strict=True)],
                        dtype=object)


@dataclass
class LoadedColumns:
    """`PredictionColumns` read back: per-row codes and the distinct values they index."""

    cell: np.ndarray
    status: np.ndarray
    response: np.ndarray
    cells: dict[str, list[str]]
    responses: PackedTexts

    def __len__(self) -> int:
        return len(self.cell)


def _valid_offsets(offsets: np.ndarray, size: int) -> bool:
    return len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == size and bool((np.diff(offsets) >= 0).all())


def load_prediction_columns(path: Path) -> LoadedColumns:
    """The file `PredictionColumns.save` wrote; ValueError when it is not one (missing arrays, codes out of range)."""
    with np.load(path, allow_pickle=False) as z:
        try:
            arrays = {name: z[name] for name in z.files}
            cells = {name: _unpack(arrays[f"{name}_bytes"], arrays[f"{name}_offsets"]) for name in CELL_FIELDS}
            responses = PackedTexts(arrays.pop("responses_bytes").tobytes(), arrays["responses_offsets"])
            loaded = LoadedColumns(arrays["cell"], arrays["status"], arrays["response"], cells, responses)
        except KeyError as exc:
            raise ValueError(f"{path}: not a predictions columns file ({exc})") from None
    n_cells = len(loaded.cells["dataset"])
    if (len({len(v) for v in loaded.cells.values()}) != 1 or not len(loaded.cell) == len(loaded.status) == len(loaded.response)
            or (len(loaded) and (loaded.cell.min() < 0 or loaded.cell.max() >= n_cells
                                 or loaded.response.min() < 0 or loaded.response.max() >= len(loaded.responses)
                                 or loaded.status.min() < 0 or loaded.status.max() >= len(PredictionColumns.STATUSES)))
            or not _valid_offsets(loaded.responses.offsets, len(loaded.responses.data))):
        raise ValueError(f"{path}: inconsistent predictions columns")
    return loaded


@dataclass
class ParsedResults:
    """What `write_predictions` wrote: one prediction row per result line, `errors` of them without an answer."""

    rows: int = 0
    errors: int = 0


def _decode_with_json(raw: bytes, path: Path, lineno: int) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}:{lineno}: not valid JSON ({exc.__class__.__name__}); "
                           "delete the file to download the part again") from None


def _too_long(path: Path, lineno: int) -> ResultsError:
    return ResultsError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES} bytes; the file is not a results file")


def _chunks(path: Path) -> Iterator[tuple[bytes, int]]:
    """(bytes, number of its first line) of newline-aligned pieces of about `_BLOCK_BYTES` (the last one may end
    without a newline); ResultsError for a line longer than `MAX_LINE_BYTES`."""
    lineno = 1
    carry = b""
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK_BYTES):
            data = carry + block if carry else block
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield data[:cut], lineno
                lineno += data.count(b"\n", 0, cut)
            if len(carry) > MAX_LINE_BYTES:
                raise _too_long(path, lineno)
    if carry:
        yield carry, lineno


def _chunk_rows(path: Path, data: bytes, first_line: int, ids: set[str] | array,
                columns: PredictionColumns | None = None, hash_id: Callable[[str], int] = hash) -> tuple[str, int]:
    """predictions.csv text of the non-blank result lines in `data` (see `_chunks`) and how many are error rows;
    their rows go to `columns` when given. `ids` is either the set of custom_ids seen so far (a repeated one raises
    here) or an `array("q")` that collects `hash_id(custom_id)` per row, for `_check_unique` to check afterwards.

    Lines are as `iter_jsonl` reads them: split on "\\n", at most `MAX_LINE_BYTES` long counting the newline,
    whitespace-only lines skipped. Raises ResultsError / ValueError naming the file and line, for the first bad line.
    """
    csv_lines = _CsvLines()
    text: list[str] = []
    errors = 0
    lines = data.split(b"\n")
    last = len(lines) - 1  # the only one without a newline (empty when `data` ends with one)
    add_hash = ids.append if isinstance(ids, array) else None
    if columns is not None:  # locals: this runs once per result line
        cells, responses = columns.cells, columns.responses
        add_cell, add_status, add_response = columns.cell.append, columns.status.append, columns.response.append
    for k, raw in enumerate(lines):
        if len(raw) >= MAX_LINE_BYTES and (k < last or len(raw) > MAX_LINE_BYTES):
            raise _too_long(path, first_line + k)
        if not raw or raw.isspace():
            continue
        fields = _answer_fields(raw)
        if fields is None:
            fields = _line_fields(path, raw, first_line + k)
        cid = fields[0]
        if add_hash is not None:
            add_hash(hash_id(cid))
        elif cid in ids:
            raise ValueError(f"{path}:{first_line + k}: custom_id {cid} appears twice in the results")
        else:
            ids.add(cid)  # type: ignore[union-attr]
        errors += fields[13] != ""
        text.append(csv_lines.line(fields))
        if columns is not None:
            add_cell(cells.setdefault(f"{fields[1]}|{fields[2]}|{fields[6]}|{fields[3]}|{fields[4]}", len(cells)))
            add_status(1 if fields[13].strip() else 2 if fields[8].strip() == "length" else 0)
            add_response(responses.setdefault(fields[9], len(responses)))
    return "".join(text), errors


def _line_fields(path: Path, raw: bytes, lineno: int) -> tuple:
    """`prediction_fields` of any result line; ResultsError / ValueError naming the file and line."""
    try:
        obj = _loads(raw)
    except msgspec.MsgspecError:  # msgspec is stricter than json (NaN, 1e400, lone surrogates): json decides
        obj = _decode_with_json(raw, path, lineno)
    if not isinstance(obj, dict):
        raise ResultsError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    try:
        return prediction_fields(obj)
    except ValueError as exc:
        raise ValueError(f"{path}:{lineno}: {exc}") from None


def combine_results(sources: Iterable[Path], out: IO[bytes]) -> None:
    """Append each source's bytes, as they are, to the binary file `out` (in the kernel where it can)."""
    for path in sources:
        out.flush()
        with open(path, "rb") as src:
            try:
                while os.sendfile(out.fileno(), src.fileno(), None, _BLOCK_BYTES * 16):
                    pass
            except OSError:  # no sendfile between these files: copy in user space from where it stopped
                shutil.copyfileobj(src, out, _BLOCK_BYTES)


def _check_rows(sources: list[Path]) -> None:
    """Read `sources` as `write_predictions` does, keeping every custom_id: raises the first error in file order."""
    seen: set[str] = set()
    for path in sources:
        for data, first_line in _chunks(path):
            _chunk_rows(path, data, first_line, seen)


def _check_unique(hashes: array, sources: list[Path]) -> None:
    """ValueError naming the first repeated custom_id when two rows' custom_id hashes are equal (a repeat, or in a
    few per billion files a collision, which the exact re-read then clears)."""
    ordered = np.sort(np.frombuffer(hashes, dtype=np.int64))
    if len(ordered) > 1 and not (ordered[1:] != ordered[:-1]).all():
        _check_rows(sources)


def write_predictions(sources: Iterable[Path], out: IO[str], progress: Callable[[int], None] | None = None,
                      columns: PredictionColumns | None = None, workers: int | None = None) -> ParsedResults:
    """predictions.csv (header + one row per result line, `prediction_fields`) from the result files in order;
    the same rows go to `columns` when given (the columnar hand-off to scoring).

    Streamed in pieces of about `_BLOCK_BYTES`: only a 64-bit hash per custom_id is kept to find repeats (8 bytes a
    row instead of the string in a set; a repeat found at the end, or any error, is reported as a read that keeps
    every custom_id reports it: the first problem in file order). `progress(n)` is told after each of the n first
    files. With `workers` > 1 (default: `parse_workers` of the input size) the pieces are parsed in that many
    processes and written in order: the same bytes, rows and columns as one process writes.
    Raises ResultsError naming the file and line for an unreadable line, ValueError for a line without a valid
    custom_id and for a custom_id seen twice.
    """
    sources = list(sources)
    if workers is None:
        workers = parse_workers(sum(path.stat().st_size for path in sources))
    hashes = array("q")
    parsed = ParsedResults()
    out.write(",".join(PREDICTION_COLUMNS) + "\n")
    try:
        if workers > 1:
            _write_in_processes(sources, out, progress, columns, workers, hashes, parsed)
        else:
            for done, path in enumerate(sources, 1):
                for data, first_line in _chunks(path):
                    text, errors = _chunk_rows(path, data, first_line, hashes, columns)
                    parsed.errors += errors
                    out.write(text)
                if progress:
                    progress(done)
    except ValueError:  # ResultsError too: a repeated custom_id before the bad line is the first problem
        _check_unique(hashes, sources)
        raise
    _check_unique(hashes, sources)
    parsed.rows = len(hashes)
    return parsed


_PARALLEL_MIN_BYTES = 64 << 20  # below this, starting processes costs more than they save
_SPAN_BYTES = 8 << 20


def parse_workers(total_bytes: int) -> int:
    """How many processes `write_predictions` parses `total_bytes` of results in: one per usable core (at most 4)
    for 64 MiB and more, else 1."""
    if total_bytes < _PARALLEL_MIN_BYTES or multiprocessing.current_process().daemon:  # daemons have no children
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _spans(path: Path) -> Iterator[tuple[int, int]]:
    """(start, end) byte offsets of newline-aligned pieces of `path` of about `_SPAN_BYTES` (the last one may end
    without a newline)."""
    size = path.stat().st_size
    start = 0
    with open(path, "rb") as fh:
        while start < size:
            end = min(start + _SPAN_BYTES, size)
            fh.seek(end)
            while end < size:
                piece = fh.read(1 << 16)
                cut = piece.find(b"\n")
                end = min(end + (cut + 1 if cut >= 0 else len(piece)), size)
                if cut >= 0 or not piece:
                    break
            yield start, end
            start = end


def _span_rows(path: Path, start: int, end: int, with_columns: bool) -> tuple:
    """`_chunk_rows` of bytes `start:end` of `path`, in a worker process: the CSV text, error count, custom_id
    hashes (`_stable_hash`: comparable across processes) and (with_columns) the span's own `PredictionColumns` as
    plain lists and bytes."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    hashes = array("q")
    columns = PredictionColumns() if with_columns else None
    text, errors = _chunk_rows(path, data, 1, hashes, columns, _stable_hash)
    if columns is None:
        return text, errors, hashes.tobytes(), None
    return text, errors, hashes.tobytes(), (list(columns.cells), columns.cell.tobytes(), columns.status.tobytes(),
                                            list(columns.responses), columns.response.tobytes())


def _stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (`hash` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                          signed=True)


def _global_codes(table: dict[str, int], keys: list[str]) -> np.ndarray:
    """The codes of distinct `keys` in `table`, new keys added in their order with the next codes (as
    `table.setdefault(key, len(table))` for each, with the loops in C: a span has about one key per row)."""
    fresh = set(keys).difference(table)
    if fresh:
        start = len(table)
        table.update(zip(filter(fresh.__contains__, keys), range(start, start + len(fresh)), strict=True))
    return np.fromiter(map(table.__getitem__, keys), dtype=np.int32, count=len(keys))


def _add_span_columns(columns: PredictionColumns, span: tuple) -> None:
    """Append a span's rows to `columns`, its codes mapped to the global ones (first appearance stays first)."""
    cells, cell_codes, status, responses, response_codes = span
    cell_map, response_map = _global_codes(columns.cells, cells), _global_codes(columns.responses, responses)
    columns.cell.frombytes(cell_map[np.frombuffer(cell_codes, dtype=np.int32)].tobytes())
    columns.status.frombytes(status)
    columns.response.frombytes(response_map[np.frombuffer(response_codes, dtype=np.int32)].tobytes())


def _write_in_processes(sources: list[Path], out: IO[str], progress: Callable[[int], None] | None,
                        columns: PredictionColumns | None, workers: int, hashes: array, parsed: ParsedResults) -> None:
    """The pieces of `sources` parsed by `workers` processes, at most two per process in flight (bounded memory),
    merged in file order. Any bad line is reported as the one-process read reports it (`_check_rows`).

    The processes are spawned (no fork of a process that may run threads: luigi's, our thread pools), so they
    import the main module as multiprocessing does; when they cannot start (a main script without the
    `if __name__ == "__main__":` guard, no process slots) the rest is parsed in this process, with one log line.
    """
    pending: deque[tuple[tuple, Future | None, int | None]] = deque()  # (span args, its job, file done after it)
    pool: ProcessPoolExecutor | None = worker_pool(workers)

    def merge_oldest() -> None:
        nonlocal pool
        args, job, done = pending[0]
        try:
            result = job.result() if job is not None else _span_rows(*args)
        except BrokenProcessPool as exc:
            log.warning("parse: worker processes stopped (%s); parsing the rest in this process", exc)
            _stop(pool)
            pool = None
            for k, (waiting, _, last) in enumerate(list(pending)):
                pending[k] = (waiting, None, last)
            return merge_oldest()
        except ValueError:
            _check_rows(sources)  # raises the first problem in file order
            raise
        pending.popleft()
        text, errors, span_hashes, span_columns = result
        out.write(text)
        parsed.errors += errors
        hashes.frombytes(span_hashes)
        if columns is not None:
            _add_span_columns(columns, span_columns)
        if progress and done is not None:
            progress(done)

    try:
        for done, path in enumerate(sources, 1):
            spans = list(_spans(path)) or [(0, 0)]  # an empty file still counts as done in its turn
            for k, (start, end) in enumerate(spans):
                args = (path, start, end, columns is not None)
                pending.append((args, pool.submit(_span_rows, *args) if pool is not None and end else None,
                                done if k == len(spans) - 1 else None))
                if len(pending) >= 2 * workers:
                    merge_oldest()
        while pending:
            merge_oldest()
    finally:
        _stop(pool)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that exit when this process is gone, however it ends."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    """In a worker process: exit once `parent` is gone (killed with -9, it cannot stop its workers, which would
    otherwise wait for work forever)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _stop(pool: ProcessPoolExecutor | None) -> None:
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
