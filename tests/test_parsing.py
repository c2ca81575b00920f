"""Result lines → predictions.csv: the streamed writer against a plain reference, line handling, the combine copy."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import parsing
from pipeline.naming import parse_custom_id
from pipeline.parsing import PREDICTION_COLUMNS, ResultsError, combine_results, write_predictions


# --- reference: one dict per line through csv.DictWriter, the contract spelled out plainly ---------------------------
def ref_int(value: object) -> int:
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def ref_count(value: object) -> int:
    """A cache count: `ref_int`, never negative."""
    return max(ref_int(value), 0)


def ref_row(obj: dict) -> dict[str, object]:
    cid = obj.get("custom_id", obj.get("customId"))
    assert isinstance(cid, str) and cid
    parts = parse_custom_id(cid)
    response = obj.get("response")
    body = response.get("body", response) if isinstance(response, dict) else None
    body = body if isinstance(body, dict) else None
    text = None
    if body:
        choices = body.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            message = choices[0].get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                text = message["content"]
        if text is None and isinstance(body.get("message"), dict) and isinstance(body["message"].get("content"), str):
            text = body["message"]["content"]
        if text is None and isinstance(body.get("content"), str):
            text = body["content"]
    usage = (response.get("usage") if isinstance(response, dict) else None) or (body or {}).get("usage") or {}
    usage = usage if isinstance(usage, dict) else {}
    finish = ""
    if body and isinstance(body.get("choices"), list) and body["choices"] and isinstance(body["choices"][0], dict):
        finish = str(body["choices"][0].get("finish_reason") or "")
    request_id = ""
    if isinstance(response, dict):
        request_id = str(response.get("request_id") or response.get("id") or (body or {}).get("id") or "")
    prompt, completion = ref_int(usage.get("prompt_tokens")), ref_int(usage.get("completion_tokens"))
    cache_read = usage.get("cache_read_input_tokens")
    if cache_read is None and isinstance(usage.get("prompt_tokens_details"), dict):
        cache_read = usage["prompt_tokens_details"].get("cached_tokens")
    cache_write = usage.get("cache_creation_input_tokens")
    error = ""
    if text is None:
        err = obj.get("error")
        if isinstance(err, dict):
            error = str(err.get("message") or err.get("code") or "provider error")[:500]
        else:
            error = str(err)[:500] if err else "no usable response in result line"
    return {"custom_id": cid, "dataset": parts.dataset, "item_id": parts.item_id, "condition": parts.condition,
            "temp": parts.temp, "sample_index": parts.sample_index, "type": parts.type, "request_id": request_id,
            "finish_reason": finish, "response_text": (text or "").strip(), "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": ref_int(usage.get("total_tokens")) or prompt + completion,
            "error": error, "cache_read_tokens": ref_count(cache_read), "cache_write_tokens": ref_count(cache_write)}


def ref_csv(lines: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=PREDICTION_COLUMNS, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        if line.strip():
            writer.writerow(ref_row(json.loads(line)))
    return out.getvalue()


def ours(paths: list[Path]) -> tuple[str, parsing.ParsedResults]:
    out = io.StringIO()
    parsed = write_predictions(paths, out)
    return out.getvalue(), parsed


def cid(i: int, item: str = "q") -> str:
    return f"squad_v2|{item}{i}|{'control' if i % 2 else 'treatment'}|0.7|{i % 3}|open"


def line(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


SHAPES: list[object] = [
    {"custom_id": cid(0), "response": {"id": "r0", "choices": [{"message": {"content": " Paris \n"},
                                                                "finish_reason": "stop"}],
                                       "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}},
    {"customId": cid(1), "response": {"body": {"id": "b1", "choices": [{"message": {"content": 'say "hi", then\nbye'},
                                                                        "finish_reason": "length"}],
                                               "usage": {"prompt_tokens": "7", "completion_tokens": 2.9}}}},
    {"custom_id": cid(2), "response": {"request_id": "rq", "id": "x", "message": {"content": "from message"},
                                       "usage": {"prompt_tokens": None, "completion_tokens": True, "total_tokens": 0}}},
    {"custom_id": cid(3), "response": {"content": "bare content, with comma", "usage": "not a dict"}},
    {"custom_id": cid(4), "response": {"choices": [{"message": {"content": None}, "finish_reason": None}]}},
    {"custom_id": cid(5), "error": {"code": 500, "message": "internal, error"}},
    {"custom_id": cid(6), "error": "plain error text"},
    {"custom_id": cid(7), "response": {}},
    {"custom_id": cid(8), "response": {"choices": [], "body": None}},
    {"custom_id": cid(9), "response": "a string", "error": {"code": "missing"}},
    {"custom_id": cid(10), "response": {"choices": [{"message": {"content": "Théâtre «Odéon» – 北京 \r ok"}}],
                                        "usage": {"prompt_tokens": 1e3, "completion_tokens": "x"}}},
    {"custom_id": "trivia,qa|it\"em|control|0.0|07|closed", "response": {"choices": [{"message": {"content": "x"}}]}},
    {"custom_id": cid(12), "response": {"choices": ["not a dict"], "message": {"content": "fallback"}}},
    # cache counts: Anthropic's canonical usage, OpenAI's cached_tokens, and values that are not counts
    {"custom_id": cid(13), "response": {"body": {"choices": [{"message": {"content": "cached"}}], "usage": {
        "prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32, "cache_read_input_tokens": 20,
        "cache_creation_input_tokens": 5}}}},
    {"custom_id": cid(14), "response": {"body": {"choices": [{"message": {"content": "oa"}}], "usage": {
        "prompt_tokens": 40, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": "16"}}}}},
    {"custom_id": cid(15), "response": {"choices": [{"message": {"content": "odd"}}], "usage": {
        "prompt_tokens": 9, "cache_read_input_tokens": -3, "cache_creation_input_tokens": "x",
        "prompt_tokens_details": {"cached_tokens": 4}}}},
    {"custom_id": cid(16), "response": {"choices": [{"message": {"content": "odd2"}}], "usage": {
        "prompt_tokens": 9, "cache_creation_input_tokens": 2.7, "prompt_tokens_details": ["not a dict"]}}},
]


def test_rows_match_the_reference_for_every_line_shape(tmp_path: Path) -> None:
    lines = [line(obj) for obj in SHAPES]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    text, parsed = ours([path])
    assert text == ref_csv(lines)
    assert parsed.rows == len(SHAPES)
    assert parsed.errors == sum(row["error"] != "" for row in map(ref_row, SHAPES))


VARIANTS: list[object] = [None, 0, 7, -3, 2**53 - 1, 2**53, 2**60 + 1, 3.0, 2.9, 1e3, "12", "x", "", True, False, [],
                           [1], {}, {"content": "c"}, {"cached_tokens": 5}, {"cached_tokens": "5"}]
ABSENT = object()


def mutated_lines(rnd: random.Random, n: int, first: int = 100) -> list[str]:
    """Result lines in the usual shapes (Fireworks: usage in `response`; OpenAI: in `response.body`) with random
    fields removed, nulled or given a value of another type, plus usage in both places; custom_ids from `first` on."""
    out = []
    for i in range(first, first + n):
        usage: dict[str, object] = {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42,
                                    "prompt_tokens_details": {"cached_tokens": 8}, "cache_read_input_tokens": 3,
                                    "cache_creation_input_tokens": 4}
        choice: dict[str, object] = {"message": {"role": "assistant", "content": f" answer {i} "}, "finish_reason": "stop"}
        body: dict[str, object] = {"id": f"b{i}", "choices": [choice, {"message": {"content": "n=2"}}], "usage": usage}
        obj: dict[str, object] = {"custom_id": cid(i), "response": body if i % 2 else {"request_id": f"r{i}", "body": body}}
        slots = [(usage, key) for key in list(usage)] + [(choice, "message"), (choice, "finish_reason"),
                                                         (body, "id"), (body, "choices"), (body, "usage"), (obj, "response"),
                                                         (body["choices"][1], "message")]
        for target, key in rnd.sample(slots, rnd.randint(0, 3)):
            value = rnd.choice([ABSENT, *VARIANTS])
            if value is ABSENT:
                target.pop(key, None)
            else:
                target[key] = value
        if rnd.random() < 0.1:
            response = obj.get("response")
            if isinstance(response, dict):
                response["usage"] = rnd.choice([{}, {"prompt_tokens": 1}, None])
        if rnd.random() < 0.05:
            obj["customId"] = obj.pop("custom_id")
        out.append(line(obj))
    return out


def test_the_fast_path_gives_the_reference_rows_for_every_field_mutation(tmp_path: Path) -> None:
    """The msgspec fast path (usual answer shapes) and the general path give the reference's rows, whichever field
    is missing, null or of another type; the usual shapes do take the fast path."""
    lines = mutated_lines(random.Random(11), 4000)
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert ours([path])[0] == ref_csv(lines)
    fast = [parsing._answer_fields(text.encode()) for text in lines]
    assert all(row == parsing.prediction_fields(json.loads(text)) for row, text in zip(fast, lines, strict=True) if row)
    assert 0.3 < sum(row is not None for row in fast) / len(lines) < 1, "both paths are exercised"


def test_cache_counts_are_the_last_columns(tmp_path: Path) -> None:
    assert PREDICTION_COLUMNS[:14] == ("custom_id", "dataset", "item_id", "condition", "temp", "sample_index", "type",
                                       "request_id", "finish_reason", "response_text", "prompt_tokens",
                                       "completion_tokens", "total_tokens", "error")
    assert PREDICTION_COLUMNS[14:] == ("cache_read_tokens", "cache_write_tokens")
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(line(obj) for obj in SHAPES[13:]) + "\n", encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(ours([path])[0])))
    assert [(r["cache_read_tokens"], r["cache_write_tokens"]) for r in rows] == [
        ("20", "5"), ("16", "0"), ("0", "0"), ("0", "2")]


def test_json_that_the_fast_decoder_refuses_goes_through_json(tmp_path: Path) -> None:
    lines = ['{"custom_id": "' + cid(0) + '", "response": {"content": "nan", "usage": {"prompt_tokens": NaN}}}',
             '{"custom_id": "' + cid(1) + '", "response": {"content": "big", "usage": {"prompt_tokens": ' + str(2**70) + "}}}",
             '{"custom_id": "' + cid(2) + '", "response": {"content": "lone \\ud800 surrogate"}}']
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    assert ours([path])[0] == ref_csv(lines)


def test_csv_lines_equal_the_csv_module_on_awkward_fields() -> None:
    alphabet = ['a', 'Z', '0', ' ', ',', '"', "'", '\n', '\r', '\t', '\\', '|', 'é', '\u2028', '\x00', '\x1c', ';']
    rnd = random.Random(5)
    lines = parsing._CsvLines()
    for _ in range(3000):
        fields = tuple("".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 6))) if k % 4 else rnd.randint(0, 99)
                       for k in range(len(PREDICTION_COLUMNS)))
        out = io.StringIO()
        csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerow(fields)
        assert lines.line(fields) == out.getvalue(), fields


def test_blank_lines_crlf_and_block_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [line(obj) for obj in SHAPES]
    raw = "\n\n".join(lines[:4]) + "\n   \n" + "\r\n".join(lines[4:]) + "\r\n\n"
    path = tmp_path / "results.jsonl"
    path.write_bytes(raw.encode())
    expected = ours([path])[0]
    assert expected == ref_csv(lines)
    for block in (1, 7, 64, 333):  # lines split across reads in every possible way
        monkeypatch.setattr(parsing, "_BLOCK_BYTES", block)
        assert ours([path])[0] == expected


def test_bad_lines_name_their_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = line(SHAPES[0])
    cases = [("{nope", ResultsError, "not valid JSON"), ("[1, 2]", ResultsError, "expected a JSON object"),
             ('{"response": {}}', ValueError, "no custom_id"), ('{"custom_id": ""}', ValueError, "no custom_id"),
             ('{"custom_id": "a|b|control|0.0|x|open"}', ValueError, "not numbers"),
             ('{"custom_id": "a|b|sideways|0.0|1|open"}', ValueError, "condition"),
             ('{"custom_id": "a|b|c"}', ValueError, "fields"), (good, ValueError, "appears twice")]
    for number, (bad, error, message) in enumerate(cases):
        path = tmp_path / f"r{number}.jsonl"
        path.write_text(f"{good}\n\n{bad}\n", encoding="utf-8")
        with pytest.raises(error, match=rf"{path}:3: .*{message}"):
            ours([path])
    long = tmp_path / "long.jsonl"
    long.write_text(f"{good}\n", encoding="utf-8")
    monkeypatch.setattr(parsing, "_BLOCK_BYTES", 5)
    monkeypatch.setattr(parsing, "MAX_LINE_BYTES", len(good) + 1)  # iter_jsonl's limit counts the newline
    assert ours([long])[1].rows == 1
    monkeypatch.setattr(parsing, "MAX_LINE_BYTES", len(good))
    with pytest.raises(ResultsError, match=rf"{long}:1: line longer than"):
        ours([long])
    long.write_text(good, encoding="utf-8")  # a last line without newline may be exactly the limit
    assert ours([long])[1].rows == 1
    long.write_text(f"{good}\n{good} ", encoding="utf-8")
    with pytest.raises(ResultsError, match=rf"{long}:1: line longer than"):
        ours([long])


def test_the_first_bad_line_is_the_one_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = line(SHAPES[0])
    path = tmp_path / "r.jsonl"
    path.write_text(f"{good}\n{good}\n{{nope\n" + "x" * 50 + "\n", encoding="utf-8")
    monkeypatch.setattr(parsing, "MAX_LINE_BYTES", 40)
    monkeypatch.setattr(parsing, "_BLOCK_BYTES", 1 << 20)  # one piece: lines are still judged in file order
    with pytest.raises(ResultsError, match=rf"{path}:1: line longer"):
        ours([path])
    monkeypatch.setattr(parsing, "MAX_LINE_BYTES", len(good) + 1)
    with pytest.raises(ValueError, match=rf"{path}:2: custom_id .* appears twice"):
        ours([path])
    path.write_text(f"{good}\n{{nope\n" + "x" * (len(good) + 5), encoding="utf-8")
    monkeypatch.setattr(parsing, "_BLOCK_BYTES", 8)
    with pytest.raises(ResultsError, match=rf"{path}:2: not valid JSON"):
        ours([path])


def test_duplicates_across_files_and_files_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(line(SHAPES[0]) + "\n" + line(SHAPES[1]) + "\n", encoding="utf-8")
    second.write_text(line(SHAPES[2]) + "\n", encoding="utf-8")
    text, parsed = ours([first, second])
    assert text == ref_csv([line(SHAPES[0]), line(SHAPES[1]), line(SHAPES[2])]) and parsed.rows == 3
    with pytest.raises(ValueError, match=rf"{second}:1: custom_id .* appears twice"):
        ours([first, second, second])


def test_combine_copies_the_bytes_as_they_are(tmp_path: Path) -> None:
    parts = [tmp_path / "p1.jsonl", tmp_path / "p2.jsonl", tmp_path / "p3.jsonl"]
    parts[0].write_bytes(b'{"a": 1}\r\n{"b": "\xc3\xa9"}')  # no final newline, CRLF, UTF-8
    parts[1].write_bytes(b"")
    parts[2].write_bytes(b'\n{"c": 3}\n' * 50_000)
    target = tmp_path / "combined.jsonl"
    with open(target, "wb") as out:
        out.write(b"head:")
        combine_results(parts, out)
        out.write(b":tail")
    assert target.read_bytes() == b"head:" + b"".join(p.read_bytes() for p in parts) + b":tail"


def parsed_with(paths: list[Path], workers: int) -> tuple[str, parsing.ParsedResults, dict, list[int]]:
    out, columns, told = io.StringIO(), parsing.PredictionColumns(), []
    result = write_predictions(paths, out, told.append, columns, workers=workers)
    return out.getvalue(), result, columns.arrays(), told


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in a)


def test_worker_processes_write_what_one_process_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed in pieces by two processes: the same CSV bytes, rows, error count, columns (codes in first-appearance
    order) and progress calls as one process, over several files (one empty, one without a final newline)."""
    rnd = random.Random(3)
    lines = mutated_lines(rnd, 3000) + [line(obj) for obj in SHAPES]
    paths = [tmp_path / f"p{k}.jsonl" for k in range(4)]
    paths[0].write_text("\n".join(lines[:1700]) + "\n", encoding="utf-8")
    paths[1].write_text("", encoding="utf-8")
    paths[2].write_text("\n".join(lines[1700:2900]) + "\n\n", encoding="utf-8")
    paths[3].write_text("\n".join(lines[2900:]), encoding="utf-8")
    monkeypatch.setattr(parsing, "_SPAN_BYTES", 20_000)  # many pieces, cut inside lines
    one = parsed_with(paths, 1)
    two = parsed_with(paths, 2)
    assert one[0] == two[0] == ref_csv(lines)
    assert one[1] == two[1] and one[3] == two[3] == [1, 2, 3, 4]
    assert same_arrays(one[2], two[2])


def test_worker_processes_report_the_first_bad_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = [line(obj) for obj in SHAPES]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(good * 1) + "\n" + "\n".join(mutated_lines(random.Random(1), 400)) + "\n{nope\n",
                    encoding="utf-8")
    monkeypatch.setattr(parsing, "_SPAN_BYTES", 5_000)
    with pytest.raises(ResultsError, match=rf"{path}:{len(good) + 401}: not valid JSON"):
        parsed_with([path], 2)
    path.write_text("\n".join(mutated_lines(random.Random(1), 300) + good + good[:1]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:{301 + len(good)}: custom_id .* appears twice"):
        parsed_with([path], 2)


class _BrokenPool:
    """A process pool whose processes die: every job ends in BrokenProcessPool."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def submit(self, *args: object) -> parsing.Future:
        future: parsing.Future = parsing.Future()
        future.set_exception(parsing.BrokenProcessPool("a worker died"))
        return future

    def shutdown(self, **kwargs: object) -> None:
        pass


def test_when_worker_processes_die_the_rest_is_parsed_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    lines = mutated_lines(random.Random(4), 500)
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(parsing, "_SPAN_BYTES", 10_000)
    expected = parsed_with([path], 1)
    monkeypatch.setattr(parsing, "ProcessPoolExecutor", _BrokenPool)
    with caplog.at_level("WARNING", logger="pipeline.parsing"):
        got = parsed_with([path], 2)
    assert got[0] == expected[0] and got[1] == expected[1] and same_arrays(got[2], expected[2])
    assert [r.getMessage() for r in caplog.records if "parsing the rest in this process" in r.getMessage()] != []
    assert len(caplog.records) == 1, "one line, not one per piece"


def test_parse_workers_only_for_large_inputs() -> None:
    assert parsing.parse_workers(1 << 20) == 1
    assert 1 <= parsing.parse_workers(1 << 30) <= 4


def test_worker_processes_exit_when_the_parser_is_killed(tmp_path: Path) -> None:
    script = ("import os, sys\n"
              "from pipeline.parsing import worker_pool\n"
              "if __name__ == '__main__':\n"
              "    pool = worker_pool(2)\n"
              "    pids = {pool.submit(os.getpid).result() for _ in range(8)}\n"
              "    print(' '.join(map(str, pids)), flush=True)\n"
              "    sys.stdin.read()\n")
    (tmp_path / "hold.py").write_text(script, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "hold.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).resolve().parents[1])
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert pids and all(_alive(pid) for pid in pids)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling for the condition under test, with a deadline
    assert not any(_alive(pid) for pid in pids), "orphaned parse workers"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ")[-1][:1] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_result_lines_write_back_exactly_what_was_read() -> None:
    """results.jsonl lines: json reads back the values of the line they came from (NaN, 1e400, integers beyond 64 bits,
    lone surrogates, non-ASCII text included), with sorted keys, so the provider's key order does not matter."""
    raw = [b'{"b": 1, "a": {"z": NaN, "y": [1e400, -0.0]}}', b'{"custom_id": "x", "n": 123456789012345678901234567890}',
           b'{"n": -9223372036854775809, "s": "lone \\ud800 surrogate"}',
           json.dumps({"t": "Théâtre «Odéon» 北京 \u2028 \"q\" \\", "f": 1.5e-07, "i": 2**64 - 1},
                      ensure_ascii=False).encode(),
           b'{"nested": {"b": [{"d": 1, "c": 2}], "a": null}, "e": true}']
    objects = [parsing._decode_line(line) for line in raw]
    written = parsing.result_lines(objects).splitlines()
    assert len(written) == len(raw)
    for line, out in zip(raw, written, strict=True):
        canonical = [json.dumps(json.loads(text), sort_keys=True) for text in (out, line)]  # NaN equals itself
        assert canonical[0] == canonical[1], out
        assert list(json.loads(out)) == sorted(json.loads(line)), "keys sorted"
    reordered = [parsing._decode_line(json.dumps(dict(reversed(json.loads(line).items()))).encode()) for line in raw]
    assert parsing.result_lines(reordered) == parsing.result_lines(objects)
