"""Batch request lines in the original's format, and their split into parts.

A line is `{"custom_id": "dataset|id|condition|temp|k|type", "body": {"messages": [system, user]}}`
(`stop` is added only when the batch API is not used, as the original did). Rows go closed-book first,
then open-book; for each row, samples k = 0..K-1. There is no row limit (the original dropped rows past 9,999).

Parts are type-homogeneous (a part holds closed-book or open-book lines, never both) so that each job can
carry the trial's own `max_new_tokens` for that type as its job-level `maxTokens`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.naming import make_custom_id


@dataclass(frozen=True)
class RequestLine:
    custom_id: str
    type: str
    text: str


def user_message(row: dict, kind: str, instructions: str) -> str:
    if kind == "open":
        return f"{instructions}\n\nCONTEXT:\n{row['context']}\n\nQUESTION:\n{row['question']}"
    return f"{instructions}\n\nQUESTION:\n{row['question']}"


def build_lines(*, closed_rows: Sequence[dict], open_rows: Sequence[dict], condition: str, temp: float, samples: int,
                system_prompt: str, instructions: dict[str, str], stop: Sequence[str] = (),
                use_batch_api: bool = True) -> list[RequestLine]:
    """Every request line of one shard (one condition at one temperature)."""
    out: list[RequestLine] = []
    system = system_prompt.strip()
    for kind, rows in (("closed", closed_rows), ("open", open_rows)):
        for row in rows:
            user = user_message(row, kind, instructions[kind].strip())
            for k in range(samples):
                cid = make_custom_id(row["dataset"], row["id"], condition, temp, k, kind)
                body: dict = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
                if stop and not use_batch_api:
                    body["stop"] = list(stop)
                line = json.dumps({"custom_id": cid, "body": body}, ensure_ascii=False)
                out.append(RequestLine(cid, kind, line))
    return out


WIRE_LINE_OVERHEAD = 512
"""Bytes a provider's wire format may add to a request line (model, url, method, parameters), counted against a
part's byte limit so that the converted batch file stays under the provider's limit too."""


def split_parts(lines: Iterable[RequestLine], lines_per_part: int,
                max_bytes: int | None = None) -> list[list[RequestLine]]:
    """Consecutive chunks of at most `lines_per_part` lines (and, with `max_bytes`, at most that many bytes once each
    line is counted with `WIRE_LINE_OVERHEAD`), starting a new part when the type changes."""
    parts: list[list[RequestLine]] = []
    size = 0
    for line in lines:
        cost = len(line.text.encode("utf-8")) + 1 + WIRE_LINE_OVERHEAD
        if max_bytes is not None and cost > max_bytes:
            raise ValueError(f"request {line.custom_id} alone is {cost:,} bytes with its wire envelope, over the "
                             f"limit of {max_bytes:,} bytes per batch part")
        if (not parts or len(parts[-1]) >= lines_per_part or parts[-1][-1].type != line.type
                or (max_bytes is not None and size + cost > max_bytes)):
            parts.append([])
            size = 0
        parts[-1].append(line)
        size += cost
    return parts


def render(lines: Sequence[RequestLine]) -> bytes:
    return "".join(line.text + "\n" for line in lines).encode("utf-8")
