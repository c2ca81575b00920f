"""Fireworks wire format for the emulator: errors, request-body checks and resource rendering (pure functions).

Follows shared/reference/batch_apis.md §1: protojson bodies (camelCase out, snake_case accepted in, unknown field
→ 400), int64 as strings, RFC3339 timestamps with ns, gRPC-style errors `{code, message, details}`, pageToken
paging. A job's displayed state is a function of wall-clock time since its persisted createTime (see `phase`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """An error response: HTTP status + gRPC code + message (rendered as `{code, message, details}`)."""

    def __init__(self, http_status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message


def not_found(what: str) -> ApiError:
    log.debug("not found: %s", what)
    return ApiError(404, 5, "resource not found")


def invalid(message: str) -> ApiError:
    return ApiError(400, 3, message)


def precondition(message: str) -> ApiError:
    return ApiError(400, 9, message)


def rfc3339(ns: int) -> str:
    """RFC3339 UTC with nanoseconds, as the real service prints timestamps."""
    sec, frac = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


# ---------------------------------------------------------------------------------------------- request bodies


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def fields(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """camelCase copy of a protojson object; snake_case keys are accepted, unknown keys are a 400."""
    if not isinstance(obj, dict):
        raise invalid(f"invalid value for {where}: expected a JSON object")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = _camel(key)
        if name not in allowed:
            raise invalid(f'unknown field "{key}"')
        out[name] = value
    return out


def int64(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise invalid(f"invalid value for int64 field {field}: {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise invalid(f"invalid value for int64 field {field}: {value!r}") from exc


def check_id(rid: str, what: str) -> str:
    if not ID_RE.match(rid):
        raise invalid(f"invalid {what} id {rid!r}: must match {ID_RE.pattern}")
    return rid


def dataset_ref(acct: str, ref: Any, field: str) -> str:
    """Bare id of `accounts/{acct}/datasets/{id}` (or a bare id) named in a job body."""
    if not isinstance(ref, str) or not ref:
        raise invalid(f"{field} is required")
    match = re.fullmatch(r"accounts/([^/]+)/datasets/([^/]+)", ref)
    if match is None:
        return check_id(ref, field)
    if match.group(1) != acct:
        raise precondition(f"{field} {ref!r} belongs to another account")
    return check_id(match.group(2), field)


def multipart_fields(content_type: str, body: bytes, error: Callable[[str], Exception] = invalid
                     ) -> dict[str, tuple[str | None, bytes]]:
    """`{name: (filename or None, bytes)}` of a multipart/form-data body (the first of a repeated name);
    `error(message)` is raised for a body that is not one."""
    header = HeaderParser().parsestr(f"Content-Type: {content_type}\r\n\r\n")
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise error("expected a multipart/form-data body with a boundary")
    out: dict[str, tuple[str | None, bytes]] = {}
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    for section in (b"\r\n" + body).split(delimiter)[1:]:
        if section.startswith(b"--"):
            break
        head, sep, data = section.partition(b"\r\n\r\n")
        if not sep:
            raise error("malformed multipart section")
        part = HeaderParser().parsestr(head.decode("latin-1").lstrip("\r\n"))
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            out.setdefault(name, (part.get_filename(), data))
    return out


def parse_multipart_file(content_type: str, body: bytes) -> tuple[str, bytes]:
    """(filename, bytes) of the `file` field of a multipart/form-data body."""
    fields = multipart_fields(content_type, body)
    if "file" not in fields:
        raise invalid('multipart body has no "file" field')
    filename = Path(fields["file"][0] or "input.jsonl").name
    if not filename or filename.startswith("."):
        raise invalid(f"invalid file name {filename!r}")
    return filename, fields["file"][1]


def request_line(line: str, where: str, seen: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """(custom_id, messages) of one input line; ApiError naming file:line when it fails validation."""
    prefix = f"Dataset has a syntax error: chat dataset validation failed on {where}"
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise invalid(f"{prefix}: invalid JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise invalid(f"{prefix}: line is not a JSON object")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise invalid(f"{prefix}: custom_id is required")
    if custom_id in seen:
        raise invalid(f"{prefix}: duplicate custom_id {custom_id!r}")
    seen.add(custom_id)
    body = row.get("body")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise invalid(f"{prefix}: body.messages must be a non-empty list")
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise invalid(f"{prefix}: invalid role {role}")
    return custom_id, messages


# ---------------------------------------------------------------------------------------------- rendering


def render_dataset(record: dict[str, Any], *, external_url: str = "") -> dict[str, Any]:
    out = {
        "name": record["name"], "displayName": record.get("displayName", ""),
        "createTime": rfc3339(record["create_ns"]), "createdBy": "emulator@localhost",
        "state": record["state"], "status": {"code": "OK", "message": ""},
        "exampleCount": str(record.get("exampleCount", 0)), "estimatedTokenCount": "0", "averageTurnCount": 0,
        "externalUrl": external_url, "format": record.get("format", "FORMAT_UNSPECIFIED"),
        "sourceJobName": record.get("sourceJobName", ""), "encryptionState": "ENCRYPTION_STATE_PLAINTEXT",
        "updateTime": rfc3339(record["update_ns"]),
    }
    if record.get("userUploaded"):
        out["userUploaded"] = {}
    return out


def phase(record: dict[str, Any], now_ns: int) -> str:
    """The job's state now: its persisted final state, else VALIDATING, PENDING, RUNNING over its latency.

    COMPLETED here means "due": the caller runs the job (which may end in another terminal state). A `stuck`
    job stays PENDING after validation, whatever the time.
    """
    if record.get("final_state"):
        return record["final_state"]
    latency_ns = int(record["latency_s"] * 1e9)
    elapsed = now_ns - record["create_ns"]
    if elapsed < latency_ns // 4:
        return "JOB_STATE_VALIDATING"
    if record.get("stuck"):
        return "JOB_STATE_PENDING"
    if elapsed >= latency_ns:
        return "JOB_STATE_COMPLETED"
    if elapsed < latency_ns // 2:
        return "JOB_STATE_PENDING"
    return "JOB_STATE_RUNNING"


def render_job(record: dict[str, Any], state: str, now_ns: int) -> dict[str, Any]:
    create_ns = record["create_ns"]
    latency_ns = int(record["latency_s"] * 1e9)
    marks = {"validatedTime": create_ns + latency_ns // 4, "runStartTime": create_ns + latency_ns // 2,
             "endTime": create_ns + latency_ns}
    if record.get("stuck"):
        marks = {"validatedTime": marks["validatedTime"]}
    reached = {k: v for k, v in marks.items() if v <= now_ns or record.get("final_state")}
    progress = record.get("progress")
    if progress is None and state == "JOB_STATE_RUNNING":
        done = (now_ns - marks["runStartTime"]) / max(latency_ns // 2, 1)
        progress = {"percent": min(99, int(100 * done)), "epoch": 0,
                    "totalInputRequests": record["declared_count"], "totalProcessedRequests": 0,
                    "successfullyProcessedRequests": 0, "failedRequests": 0, "outputRows": 0, "inputTokens": 0,
                    "outputTokens": 0, "cachedInputTokenCount": 0}
    return {
        "name": record["name"], "displayName": record.get("displayName", ""), "createdBy": "emulator@localhost",
        "createTime": rfc3339(create_ns), "expireTime": rfc3339(create_ns + 24 * 3600 * 10**9),
        "state": state, "status": record.get("status") or {"code": "OK", "message": ""},
        "model": record["model"], "inputDatasetId": record["inputDatasetId"],
        "outputDatasetId": record["outputDatasetId"], "inferenceParameters": record.get("inferenceParameters") or {},
        "precision": record.get("precision") or "PRECISION_UNSPECIFIED", "jobProgress": progress,
        "lifecycle": {k: rfc3339(v) for k, v in reached.items()} or None, "placement": None, "maxJobDuration": None,
        "systemPrompt": "", "continuedFromJobName": "", "waitingOnCapacity": False,
        "updateTime": rfc3339(max([create_ns, *reached.values()])),
    }


def page(items: list[dict[str, Any]], query: dict[str, list[str]], key: str) -> dict[str, Any]:
    try:
        size = int((query.get("pageSize") or query.get("page_size") or ["0"])[0])
    except ValueError as exc:
        raise invalid("pageSize must be an integer") from exc
    size = DEFAULT_PAGE_SIZE if size <= 0 else min(size, MAX_PAGE_SIZE)
    token = (query.get("pageToken") or query.get("page_token") or [""])[0]
    offset = 0
    if token:
        try:
            offset = int(base64.urlsafe_b64decode(token.encode()).decode())
        except (ValueError, binascii.Error) as exc:
            raise invalid("invalid page token") from exc
    end = offset + size
    next_token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return {key: items[offset:end], "nextPageToken": next_token, "totalSize": len(items)}
