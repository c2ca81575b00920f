"""A Fireworks-compatible batch-inference HTTP server for offline runs and tests (stdlib only, loopback).

Wire format follows shared/reference/batch_apis.md §1: routes under `/v1/accounts/{acct}/` for datasets (create, get,
list, delete, `:upload`, `:getUploadEndpoint`, `:validateUpload`, `:getDownloadEndpoint`) and batchInferenceJobs
(create with `?batchInferenceJobId=`, get, list, delete); camelCase out, snake_case accepted in, int64 as strings,
gRPC-style errors, 403 OpenAI-style envelope without a Bearer key (any non-empty key is accepted).
Signed URLs (`/signed/<token>/<path>`, valid `SIGNED_URL_TTL_S`) stand in for cloud storage.

State is JSON files under the state dir (atomic writes), so a restarted server knows every dataset and job.
A job's state is a function of wall-clock time since its persisted createTime: VALIDATING, PENDING, RUNNING over
`latency_s`, then COMPLETED; the output dataset is written lazily by the first request that sees the job done
(under a lock, exactly once). Answers come from `pipeline.emulator.model`, keyed by the answer-key directory.

Inspection routes (no auth): `GET /healthz`, `GET /emulator/calls`, `POST /emulator/reset-calls`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from email.parser import HeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pipeline.emulator import model
from pipeline.naming import parse_custom_id

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
SIGNED_URL_TTL_S = 600
MAX_MULTIPART_BYTES = 150 * 1024**2
MAX_BODY_BYTES = 512 * 1024**2
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
OUTPUT_FILE = "BIJOutputSet.jsonl"
ERROR_FILE = "error-data"
CALL_KINDS = ("dataset_creates", "job_creates", "dataset_create_conflicts", "job_create_conflicts", "uploads")
FORMATS = ("FORMAT_UNSPECIFIED", "CHAT", "COMPLETION", "RL")
ROLES = ("system", "user", "assistant", "tool")

DATASET_CREATE_FIELDS = {"datasetId", "dataset", "parent"}
DATASET_FIELDS = {"name", "displayName", "createTime", "state", "status", "exampleCount", "userUploaded",
                  "evaluationResult", "transformed", "splitted", "evalProtocol", "externalUrl", "format", "createdBy",
                  "updateTime", "sourceJobName", "estimatedTokenCount", "averageTurnCount", "encryptionState"}
JOB_FIELDS = {"name", "displayName", "createTime", "createdBy", "state", "status", "model", "inputDatasetId",
              "outputDatasetId", "inferenceParameters", "updateTime", "precision", "jobProgress",
              "continuedFromJobName", "expireTime", "lifecycle", "placement", "maxJobDuration", "systemPrompt",
              "waitingOnCapacity"}
INFERENCE_FIELDS = {"maxTokens", "temperature", "topP", "topK", "n", "extraBody"}
UPLOAD_ENDPOINT_FIELDS = {"filenameToSize", "readMask"}


class ApiError(Exception):
    """An error response: HTTP status + gRPC code + message (rendered as `{code, message, details}`)."""

    def __init__(self, http_status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.code = code
        self.message = message


def _not_found(what: str) -> ApiError:
    log.debug("not found: %s", what)
    return ApiError(404, 5, "resource not found")


def _invalid(message: str) -> ApiError:
    return ApiError(400, 3, message)


def _precondition(message: str) -> ApiError:
    return ApiError(400, 9, message)


def rfc3339(ns: int) -> str:
    """RFC3339 UTC with nanoseconds, as the real service prints timestamps."""
    sec, frac = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- state


class Store:
    """Datasets, jobs, uploaded files and call counters as files under `root` (one JSON file per resource)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        root.mkdir(parents=True, exist_ok=True)
        secret_path = root / "secret.key"
        with self.lock:
            if not secret_path.exists():
                write_bytes_atomic(secret_path, secrets.token_bytes(32))
        self.secret = secret_path.read_bytes()

    def _dir(self, acct: str, kind: str) -> Path:
        return self.root / "accounts" / acct / kind

    def files_dir(self, acct: str, dataset_id: str) -> Path:
        return self._dir(acct, "files") / dataset_id

    def get(self, acct: str, kind: str, rid: str) -> dict[str, Any] | None:
        return _read_json(self._dir(acct, kind) / f"{rid}.json")

    def put(self, acct: str, kind: str, record: dict[str, Any]) -> None:
        write_json_atomic(self._dir(acct, kind) / f"{record['id']}.json", record)

    def delete(self, acct: str, kind: str, rid: str) -> None:
        (self._dir(acct, kind) / f"{rid}.json").unlink(missing_ok=True)

    def all(self, acct: str, kind: str) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self._dir(acct, kind).glob("*.json")):
            record = _read_json(path)
            if record is not None:
                records.append(record)
        return records

    def calls(self) -> dict[str, dict[str, int]]:
        data = _read_json(self.root / "calls.json") or {}
        return {kind: dict(data.get(kind) or {}) for kind in CALL_KINDS}

    def count_call(self, kind: str, rid: str) -> None:
        with self.lock:
            data = self.calls()
            data[kind][rid] = data[kind].get(rid, 0) + 1
            write_json_atomic(self.root / "calls.json", data)

    def reset_calls(self) -> None:
        with self.lock:
            write_json_atomic(self.root / "calls.json", {kind: {} for kind in CALL_KINDS})


class AnswerKey:
    """Prepared-data rows (`open_book.jsonl`, `closed_book.jsonl`) by (dataset, id), reloaded when files change."""

    FILES = ("open_book.jsonl", "closed_book.jsonl")

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._stamp: tuple[Any, ...] = ()
        self._lock = threading.Lock()

    def lookup(self, dataset: str, item_id: str) -> dict[str, Any] | None:
        if self.directory is None:
            return None
        with self._lock:
            paths = [self.directory / name for name in self.FILES]
            stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in paths)
            if stamp != self._stamp:
                self._rows = self._load(paths)
                self._stamp = stamp
            return self._rows.get((dataset, item_id))

    @staticmethod
    def _load(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for path in paths:
            if not path.exists():
                continue
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        rows[(str(row["dataset"]), str(row["id"]))] = row
                    except (ValueError, KeyError, TypeError):
                        log.warning("answer key %s:%d is not a prepared row, ignored", path, lineno)
        return rows


# ---------------------------------------------------------------------------------------------- request bodies


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _fields(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """camelCase copy of a protojson object; snake_case keys are accepted, unknown keys are a 400."""
    if not isinstance(obj, dict):
        raise _invalid(f"invalid value for {where}: expected a JSON object")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = _camel(key)
        if name not in allowed:
            raise _invalid(f'unknown field "{key}"')
        out[name] = value
    return out


def _int64(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _invalid(f"invalid value for int64 field {field}: {value!r}")
    try:
        return int(value)
    except ValueError as exc:
        raise _invalid(f"invalid value for int64 field {field}: {value!r}") from exc


def _check_id(rid: str, what: str) -> str:
    if not ID_RE.match(rid):
        raise _invalid(f"invalid {what} id {rid!r}: must match {ID_RE.pattern}")
    return rid


def _dataset_ref(acct: str, ref: Any, field: str) -> str:
    """Bare id of `accounts/{acct}/datasets/{id}` (or a bare id) named in a job body."""
    if not isinstance(ref, str) or not ref:
        raise _invalid(f"{field} is required")
    match = re.fullmatch(r"accounts/([^/]+)/datasets/([^/]+)", ref)
    if match is None:
        return _check_id(ref, field)
    if match.group(1) != acct:
        raise _precondition(f"{field} {ref!r} belongs to another account")
    return _check_id(match.group(2), field)


def _parse_multipart_file(content_type: str, body: bytes) -> tuple[str, bytes]:
    """(filename, bytes) of the `file` field of a multipart/form-data body."""
    header = HeaderParser().parsestr(f"Content-Type: {content_type}\r\n\r\n")
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise _invalid("expected a multipart/form-data body with a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    for section in (b"\r\n" + body).split(delimiter)[1:]:
        if section.startswith(b"--"):
            break
        head, sep, data = section.partition(b"\r\n\r\n")
        if not sep:
            raise _invalid("malformed multipart section")
        part = HeaderParser().parsestr(head.decode("latin-1").lstrip("\r\n"))
        if part.get_param("name", header="content-disposition") == "file":
            filename = Path(part.get_filename() or "input.jsonl").name
            if not filename or filename.startswith("."):
                raise _invalid(f"invalid file name {filename!r}")
            return filename, data
    raise _invalid('multipart body has no "file" field')


# ---------------------------------------------------------------------------------------------- rendering


def render_dataset(record: dict[str, Any]) -> dict[str, Any]:
    out = {
        "name": record["name"], "displayName": record.get("displayName", ""),
        "createTime": rfc3339(record["create_ns"]), "createdBy": "emulator@localhost",
        "state": record["state"], "status": {"code": "OK", "message": ""},
        "exampleCount": str(record.get("exampleCount", 0)), "estimatedTokenCount": "0", "averageTurnCount": 0,
        "externalUrl": "", "format": record.get("format", "FORMAT_UNSPECIFIED"),
        "sourceJobName": record.get("sourceJobName", ""), "encryptionState": "ENCRYPTION_STATE_PLAINTEXT",
        "updateTime": rfc3339(record["update_ns"]),
    }
    if record.get("userUploaded"):
        out["userUploaded"] = {}
    return out


def _phase(record: dict[str, Any], now_ns: int) -> str:
    if record.get("final_state"):
        return record["final_state"]
    latency_ns = int(record["latency_s"] * 1e9)
    elapsed = now_ns - record["create_ns"]
    if elapsed >= latency_ns:
        return "JOB_STATE_COMPLETED"
    if elapsed < latency_ns // 4:
        return "JOB_STATE_VALIDATING"
    if elapsed < latency_ns // 2:
        return "JOB_STATE_PENDING"
    return "JOB_STATE_RUNNING"


def render_job(record: dict[str, Any], state: str, now_ns: int) -> dict[str, Any]:
    create_ns = record["create_ns"]
    latency_ns = int(record["latency_s"] * 1e9)
    marks = {"validatedTime": create_ns + latency_ns // 4, "runStartTime": create_ns + latency_ns // 2,
             "endTime": create_ns + latency_ns}
    lifecycle = {k: rfc3339(v) for k, v in marks.items() if v <= now_ns or record.get("final_state")} or None
    progress = record.get("progress")
    if progress is None and state == "JOB_STATE_RUNNING":
        done = (now_ns - marks["runStartTime"]) / max(latency_ns // 2, 1)
        progress = {"percent": min(99, int(100 * done)), "epoch": 0,
                    "totalInputRequests": record["declared_count"], "totalProcessedRequests": 0,
                    "successfullyProcessedRequests": 0, "failedRequests": 0, "outputRows": 0, "inputTokens": 0,
                    "outputTokens": 0, "cachedInputTokenCount": 0}
    updated = max([create_ns] + [v for v in marks.values() if v <= now_ns])
    return {
        "name": record["name"], "displayName": record.get("displayName", ""), "createdBy": "emulator@localhost",
        "createTime": rfc3339(create_ns), "expireTime": rfc3339(create_ns + 24 * 3600 * 10**9),
        "state": state, "status": record.get("status") or {"code": "OK", "message": ""},
        "model": record["model"], "inputDatasetId": record["inputDatasetId"],
        "outputDatasetId": record["outputDatasetId"], "inferenceParameters": record.get("inferenceParameters") or {},
        "precision": record.get("precision") or "PRECISION_UNSPECIFIED", "jobProgress": progress,
        "lifecycle": lifecycle, "placement": None, "maxJobDuration": None, "systemPrompt": "",
        "continuedFromJobName": "", "waitingOnCapacity": False, "updateTime": rfc3339(updated),
    }


def _page(items: list[dict[str, Any]], query: dict[str, list[str]], key: str) -> dict[str, Any]:
    try:
        size = int((query.get("pageSize") or query.get("page_size") or ["0"])[0])
    except ValueError as exc:
        raise _invalid("pageSize must be an integer") from exc
    size = DEFAULT_PAGE_SIZE if size <= 0 else min(size, MAX_PAGE_SIZE)
    token = (query.get("pageToken") or query.get("page_token") or [""])[0]
    offset = 0
    if token:
        try:
            offset = int(base64.urlsafe_b64decode(token.encode()).decode())
        except (ValueError, binascii.Error) as exc:
            raise _invalid("invalid page token") from exc
    end = offset + size
    next_token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return {key: items[offset:end], "nextPageToken": next_token, "totalSize": len(items)}


# ---------------------------------------------------------------------------------------------- the service


class Emulator:
    """The API semantics, independent of HTTP: every method takes parsed inputs and returns a JSON-able dict."""

    def __init__(self, state_dir: Path, *, latency_s: float, answer_key: Path | None,
                 clock: Callable[[], int]) -> None:
        self.store = Store(state_dir)
        self.latency_s = latency_s
        self.answers = AnswerKey(answer_key)
        self.clock = clock
        self.base_url = ""

    # ---- signed URLs

    def _signature(self, method: str, path: str, expires: int, extra: str) -> str:
        message = f"{method}\n{path}\n{expires}\n{extra}".encode()
        return hmac.new(self.store.secret, message, hashlib.sha256).hexdigest()[:32]

    def sign(self, method: str, path: str, extra: str = "") -> str:
        expires = self.clock() // 10**9 + SIGNED_URL_TTL_S
        token = f"{expires}.{self._signature(method, path, expires, extra)}"
        return f"{self.base_url}/signed/{token}/{quote(path)}"

    def verify(self, method: str, token: str, path: str, extra: str = "") -> None:
        expires_text, _, signature = token.partition(".")
        try:
            expires = int(expires_text)
        except ValueError as exc:
            raise ApiError(403, 7, "malformed signed URL") from exc
        if not hmac.compare_digest(signature, self._signature(method, path, expires, extra)):
            raise ApiError(403, 7, "signature does not match")
        if self.clock() // 10**9 > expires:
            raise ApiError(403, 7, "signed URL expired")

    # ---- datasets

    def dataset_record(self, acct: str, dataset_id: str) -> dict[str, Any]:
        record = self.store.get(acct, "datasets", dataset_id)
        if record is None:
            raise _not_found(f"dataset {acct}/{dataset_id}")
        return record

    def create_dataset(self, acct: str, body: Any) -> dict[str, Any]:
        req = _fields(body, DATASET_CREATE_FIELDS, "request")
        dataset_id = req.get("datasetId")
        if not isinstance(dataset_id, str) or not dataset_id:
            raise _invalid("dataset_id is required")
        _check_id(dataset_id, "dataset")
        if "dataset" not in req:
            raise _invalid("dataset is required")
        spec = _fields(req["dataset"], DATASET_FIELDS, "dataset")
        if spec.get("exampleCount") in (None, "", 0, "0"):
            raise _invalid("example_count is required for uploaded datasets")
        count = _int64(spec["exampleCount"], "exampleCount")
        fmt = spec.get("format") or "FORMAT_UNSPECIFIED"
        if fmt not in FORMATS:
            raise _invalid(f"invalid value for enum field format: {fmt!r}")
        with self.store.lock:
            if self.store.get(acct, "datasets", dataset_id) is not None:
                self.store.count_call("dataset_create_conflicts", dataset_id)
                raise ApiError(409, 6, f'dataset "accounts/{acct}/datasets/{dataset_id}" already exists')
            now = self.clock()
            record = {"id": dataset_id, "name": f"accounts/{acct}/datasets/{dataset_id}",
                      "displayName": str(spec.get("displayName") or ""), "exampleCount": count, "format": fmt,
                      "userUploaded": True, "state": "UPLOADING", "files": {}, "pending": {},
                      "create_ns": now, "update_ns": now}
            self.store.put(acct, "datasets", record)
            self.store.count_call("dataset_creates", dataset_id)
        return render_dataset(record)

    def delete_dataset(self, acct: str, dataset_id: str) -> dict[str, Any]:
        with self.store.lock:
            record = self.dataset_record(acct, dataset_id)
            self.store.delete(acct, "datasets", dataset_id)
            for name in record.get("files") or {}:
                (self.store.files_dir(acct, dataset_id) / name).unlink(missing_ok=True)
        return {}

    def _uploadable(self, acct: str, dataset_id: str) -> dict[str, Any]:
        record = self.dataset_record(acct, dataset_id)
        if not record.get("userUploaded"):
            raise _precondition(f"dataset {record['name']} is not an uploaded dataset")
        if record["state"] != "UPLOADING":
            raise _precondition(f"dataset {record['name']} is {record['state']}, uploads are closed")
        return record

    def upload(self, acct: str, dataset_id: str, filename: str, data: bytes) -> dict[str, Any]:
        with self.store.lock:
            record = self._uploadable(acct, dataset_id)
            write_bytes_atomic(self.store.files_dir(acct, dataset_id) / filename, data)
            record.update(files={filename: len(data)}, pending={}, state="READY", update_ns=self.clock())
            self.store.put(acct, "datasets", record)
            self.store.count_call("uploads", dataset_id)
        return {"bytes": len(data), "created_at": self.clock() // 10**9, "filename": filename, "id": record["name"],
                "object": "file", "purpose": "dataset"}

    def upload_endpoint(self, acct: str, dataset_id: str, body: Any) -> dict[str, Any]:
        req = _fields(body, UPLOAD_ENDPOINT_FIELDS, "request")
        sizes = req.get("filenameToSize")
        if not isinstance(sizes, dict) or not sizes:
            raise _invalid("filename_to_size is required")
        with self.store.lock:
            record = self._uploadable(acct, dataset_id)
            pending = {}
            for name, size in sizes.items():
                if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                    raise _invalid(f"invalid file name {name!r}")
                pending[name] = _int64(size, "filenameToSize")
            record["pending"] = pending
            self.store.put(acct, "datasets", record)
        urls = {name: self.sign("PUT", f"upload/{acct}/{dataset_id}/{name}", str(size))
                for name, size in pending.items()}
        return {"filenameToSignedUrls": urls}

    def signed_put(self, token: str, path: str, headers: Any, data: bytes) -> None:
        match = re.fullmatch(r"upload/([^/]+)/([^/]+)/([^/]+)", path)
        if match is None:
            raise _not_found(path)
        acct, dataset_id, name = match.groups()
        with self.store.lock:
            record = self.dataset_record(acct, dataset_id)
            size = (record.get("pending") or {}).get(name)
            if size is None:
                raise ApiError(403, 7, "no upload pending for this URL")
            self.verify("PUT", token, path, str(size))
            if headers.get("Content-Type") != "application/octet-stream":
                raise ApiError(400, 3, "MalformedSecurityHeader: Content-Type must be application/octet-stream")
            if headers.get("x-goog-content-length-range") != f"{size},{size}":
                raise ApiError(400, 3, "MalformedSecurityHeader: x-goog-content-length-range must be "
                                       f"{size},{size}")
            if len(data) != size:
                raise ApiError(400, 3, f"EntityTooSmall/Large: got {len(data)} bytes, signed for {size}")
            write_bytes_atomic(self.store.files_dir(acct, dataset_id) / name, data)
            record["files"] = {**(record.get("files") or {}), name: size}
            record["pending"] = {k: v for k, v in record["pending"].items() if k != name}
            record["update_ns"] = self.clock()
            self.store.put(acct, "datasets", record)
            self.store.count_call("uploads", dataset_id)

    def validate_upload(self, acct: str, dataset_id: str, body: Any) -> dict[str, Any]:
        _fields(body if body is not None else {}, set(), "request")
        with self.store.lock:
            record = self._uploadable(acct, dataset_id)
            if record.get("pending"):
                raise _precondition(f"upload of {sorted(record['pending'])} has not completed")
            if not record.get("files"):
                raise _precondition("nothing was uploaded")
            record.update(state="READY", update_ns=self.clock())
            self.store.put(acct, "datasets", record)
        return {}

    def download_endpoint(self, acct: str, dataset_id: str) -> dict[str, Any]:
        record = self.dataset_record(acct, dataset_id)
        urls = {f"dataset/{dataset_id}/{name}": self.sign("GET", f"download/{acct}/{dataset_id}/{name}")
                for name in sorted(record.get("files") or {})}
        return {"filenameToSignedUrls": urls}

    def signed_file(self, token: str, path: str) -> Path:
        self.verify("GET", token, path)
        match = re.fullmatch(r"download/([^/]+)/([^/]+)/([^/]+)", path)
        if match is None:
            raise _not_found(path)
        acct, dataset_id, name = match.groups()
        record = self.dataset_record(acct, dataset_id)
        if name not in (record.get("files") or {}):
            raise _not_found(path)
        return self.store.files_dir(acct, dataset_id) / name

    def list_datasets(self, acct: str, query: dict[str, list[str]]) -> dict[str, Any]:
        records = sorted(self.store.all(acct, "datasets"), key=lambda r: r["name"])
        return _page([render_dataset(r) for r in records], query, "datasets")

    # ---- jobs

    def create_job(self, acct: str, job_id: str | None, body: Any) -> dict[str, Any]:
        job_id = _check_id(job_id, "batch inference job") if job_id else f"job-{secrets.token_hex(4)}"
        spec = _fields(body, JOB_FIELDS, "batch_inference_job")
        params = _fields(spec.get("inferenceParameters") or {}, INFERENCE_FIELDS, "inference_parameters")
        if not isinstance(spec.get("model"), str) or not spec["model"]:
            raise _invalid("model is required")
        input_id = _dataset_ref(acct, spec.get("inputDatasetId"), "input_dataset_id")
        output_ref = spec.get("outputDatasetId")
        output_id = _dataset_ref(acct, output_ref, "output_dataset_id") if output_ref else None
        with self.store.lock:
            if self.store.get(acct, "jobs", job_id) is not None:
                self.store.count_call("job_create_conflicts", job_id)
                raise ApiError(409, 6, f'batch inference job "accounts/{acct}/batchInferenceJobs/{job_id}" '
                                       "already exists")
            source = self.store.get(acct, "datasets", input_id)
            if source is None or source["state"] != "READY":
                state = "missing" if source is None else source["state"]
                raise _precondition(f"input dataset accounts/{acct}/datasets/{input_id} is not READY ({state})")
            if output_id is None:
                output_id = self._free_output_id(acct)
            elif self.store.get(acct, "datasets", output_id) is not None:
                raise _precondition(f"output dataset accounts/{acct}/datasets/{output_id} already exists")
            record = {"id": job_id, "name": f"accounts/{acct}/batchInferenceJobs/{job_id}",
                      "displayName": str(spec.get("displayName") or ""), "model": spec["model"],
                      "inputDatasetId": f"accounts/{acct}/datasets/{input_id}",
                      "outputDatasetId": f"accounts/{acct}/datasets/{output_id}", "inferenceParameters": params,
                      "precision": spec.get("precision") or "PRECISION_UNSPECIFIED",
                      "declared_count": int(source.get("exampleCount", 0)), "latency_s": self.latency_s,
                      "create_ns": self.clock(), "final_state": None}
            self.store.put(acct, "jobs", record)
            self.store.count_call("job_creates", job_id)
        return render_job(record, "JOB_STATE_VALIDATING", record["create_ns"])

    def _free_output_id(self, acct: str) -> str:
        """A fresh `bij-xxxxxxxx` dataset id, as the real service allocates when outputDatasetId is omitted."""
        while True:
            candidate = f"bij-{''.join(random.choices('abcdefghijklmnopqrstuvwxyz0123456789', k=8))}"
            if self.store.get(acct, "datasets", candidate) is None:
                return candidate

    def get_job(self, acct: str, job_id: str) -> dict[str, Any]:
        record = self.store.get(acct, "jobs", job_id)
        if record is None:
            raise _not_found(f"job {acct}/{job_id}")
        return self._view(acct, record)

    def _view(self, acct: str, record: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        state = _phase(record, now)
        if state == "JOB_STATE_COMPLETED" and not record.get("final_state"):
            record = self._finish(acct, record["id"]) or record
            state = _phase(record, now)
        return render_job(record, state, now)

    def list_jobs(self, acct: str, query: dict[str, list[str]]) -> dict[str, Any]:
        records = sorted(self.store.all(acct, "jobs"), key=lambda r: (r["create_ns"], r["name"]))
        return _page([self._view(acct, r) for r in records], query, "batchInferenceJobs")

    def delete_job(self, acct: str, job_id: str) -> dict[str, Any]:
        with self.store.lock:
            if self.store.get(acct, "jobs", job_id) is None:
                raise _not_found(f"job {acct}/{job_id}")
            self.store.delete(acct, "jobs", job_id)
        return {}

    def _finish(self, acct: str, job_id: str) -> dict[str, Any] | None:
        """Run a due job once: write its output dataset and persist the final state (None if it was deleted)."""
        with self.store.lock:
            record = self.store.get(acct, "jobs", job_id)
            if record is None or record.get("final_state"):
                return record
            end_ns = record["create_ns"] + int(record["latency_s"] * 1e9)
            try:
                rows, progress = self._run(acct, record, end_ns)
            except ApiError as exc:
                record.update(final_state="JOB_STATE_FAILED", status={"code": "INVALID_ARGUMENT",
                                                                      "message": exc.message})
            else:
                self._write_output(acct, record, rows, end_ns)
                record.update(final_state="JOB_STATE_COMPLETED", progress=progress)
            self.store.put(acct, "jobs", record)
            return record

    def _run(self, acct: str, record: dict[str, Any], end_ns: int) -> tuple[list[str], dict[str, Any]]:
        """The job's result lines (shuffled, seeded by job id) and its jobProgress; ApiError if the input is bad."""
        input_id = record["inputDatasetId"].rsplit("/", 1)[-1]
        source = self.store.get(acct, "datasets", input_id)
        if source is None:
            raise _precondition(f"input dataset {record['inputDatasetId']} no longer exists")
        existing = self.store.get(acct, "datasets", record["outputDatasetId"].rsplit("/", 1)[-1])
        if existing is not None and existing.get("sourceJobName") != record["name"]:
            raise _precondition(f"output dataset {record['outputDatasetId']} was created by someone else")
        outputs: list[dict[str, Any]] = []
        seen: set[str] = set()
        for name in sorted(source.get("files") or {}):
            path = self.store.files_dir(acct, input_id) / name
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        custom_id, messages = _request_line(line, f"{name}:{lineno}", seen)
                        outputs.append(self._respond(record, custom_id, messages, end_ns))
        random.Random(record["id"]).shuffle(outputs)
        input_tokens = sum(o["response"]["usage"]["prompt_tokens"] for o in outputs)
        output_tokens = sum(o["response"]["usage"]["completion_tokens"] for o in outputs)
        progress = {"percent": 100, "epoch": 0, "totalInputRequests": record["declared_count"],
                    "totalProcessedRequests": len(outputs), "successfullyProcessedRequests": len(outputs),
                    "failedRequests": 0, "outputRows": len(outputs), "inputTokens": input_tokens,
                    "outputTokens": output_tokens, "cachedInputTokenCount": 0}
        return [json.dumps(o, ensure_ascii=False) for o in outputs], progress

    def _respond(self, record: dict[str, Any], custom_id: str, messages: list[dict[str, Any]],
                 end_ns: int) -> dict[str, Any]:
        key = None
        try:
            cid = parse_custom_id(custom_id)
        except ValueError:
            cid = None
        if cid is not None:
            key = self.answers.lookup(cid.dataset, cid.item_id)
        content, finish_reason, usage = model.answer(custom_id, messages, key)
        digest = hashlib.sha256(f"{record['name']}\n{custom_id}".encode()).hexdigest()[:32]
        return {"custom_id": custom_id, "response": {
            "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": end_ns // 10**9,
            "model": record["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason}],
            "usage": usage}}

    def _write_output(self, acct: str, record: dict[str, Any], lines: list[str], end_ns: int) -> None:
        output_id = record["outputDatasetId"].rsplit("/", 1)[-1]
        files_dir = self.store.files_dir(acct, output_id)
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        write_bytes_atomic(files_dir / OUTPUT_FILE, data)
        write_bytes_atomic(files_dir / ERROR_FILE, b"")
        self.store.put(acct, "datasets", {
            "id": output_id, "name": record["outputDatasetId"], "displayName": "", "exampleCount": len(lines),
            "format": "FORMAT_UNSPECIFIED", "userUploaded": False, "state": "READY", "sourceJobName": record["name"],
            "files": {OUTPUT_FILE: len(data), ERROR_FILE: 0}, "pending": {}, "create_ns": end_ns,
            "update_ns": end_ns})


def _request_line(line: str, where: str, seen: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """(custom_id, messages) of one input line; ApiError naming file:line when it fails validation."""
    prefix = f"Dataset has a syntax error: chat dataset validation failed on {where}"
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise _invalid(f"{prefix}: invalid JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise _invalid(f"{prefix}: line is not a JSON object")
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _invalid(f"{prefix}: custom_id is required")
    if custom_id in seen:
        raise _invalid(f"{prefix}: duplicate custom_id {custom_id!r}")
    seen.add(custom_id)
    body = row.get("body")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise _invalid(f"{prefix}: body.messages must be a non-empty list")
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise _invalid(f"{prefix}: invalid role {role}")
    return custom_id, messages


# ---------------------------------------------------------------------------------------------- HTTP


class EmulatorServer(ThreadingHTTPServer):
    """The HTTP front of an `Emulator`; shuts itself down after `idle_exit_s` without requests."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], emulator: Emulator, idle_exit_s: float | None) -> None:
        super().__init__(address, _Handler)
        self.emulator = emulator
        self.idle_exit_s = idle_exit_s
        self.last_request = time.monotonic()
        self._closing = threading.Event()
        host, port = self.server_address[:2]
        shown_host = f"[{host}]" if ":" in str(host) else host
        self.base_url = f"http://{shown_host}:{port}"
        emulator.base_url = self.base_url

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self.idle_exit_s is not None:
            threading.Thread(target=self._idle_watch, name="emulator-idle", daemon=True).start()
        super().serve_forever(poll_interval)

    def _idle_watch(self) -> None:
        assert self.idle_exit_s is not None
        step = min(1.0, max(self.idle_exit_s / 4, 0.05))
        while not self._closing.wait(step):
            if time.monotonic() - self.last_request >= self.idle_exit_s:
                log.info("no requests for %.0f s, shutting down", self.idle_exit_s)
                self.shutdown()
                return

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EmulatorServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle + delayed ACK add ~40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        log.debug("%s " + format, self.address_string(), *args)

    # ---- plumbing

    def _dispatch(self, method: str) -> None:
        self.server.last_request = time.monotonic()
        try:
            body = self._read_body()
            self._route(method, body)
        except ApiError as exc:
            self._send_json(exc.http_status, {"code": exc.code, "message": exc.message, "details": []})
        except Exception:
            log.exception("internal error on %s %s", method, urlsplit(self.path).path)
            self._send_json(500, {"code": 13, "message": "internal error", "details": []})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, 8, f"request body of {length} bytes is too large")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        total = 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise ApiError(413, 8, "request body is too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_file(self, path: Path) -> None:
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 16):
                self.wfile.write(chunk)

    def _json(self, body: bytes) -> Any:
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _invalid(f"request body is not valid JSON: {exc}") from exc

    def _authorized(self) -> bool:
        scheme, _, key = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return True
        self._send_json(403, {"error": {"message": "The API key you provided is invalid.", "param": None,
                                        "code": "UNAUTHORIZED", "type": "error"}, "request_id": uuid.uuid4().hex})
        return False

    # ---- routes

    def _route(self, method: str, body: bytes) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        emu = self.server.emulator
        if path == "/healthz" and method == "GET":
            self._send_json(200, {"ok": True, "pid": os.getpid()})
        elif path == "/emulator/calls" and method == "GET":
            self._send_json(200, emu.store.calls())
        elif path == "/emulator/reset-calls" and method == "POST":
            emu.store.reset_calls()
            self._send_json(200, {})
        elif path.startswith("/signed/"):
            self._route_signed(method, path, body)
        elif (match := re.fullmatch(r"/v1/accounts/([^/]+)/(datasets|batchInferenceJobs)(?:/([^/:]+)(?::(\w+))?)?",
                                    path)) is None:
            raise _not_found(path)
        elif self._authorized():
            acct, collection, rid, verb = match.groups()
            _check_id(acct, "account")
            if rid is not None:
                _check_id(rid, "resource")
            if collection == "datasets":
                self._route_datasets(method, acct, rid, verb, query, body)
            else:
                self._route_jobs(method, acct, rid, verb, query, body)

    def _route_signed(self, method: str, path: str, body: bytes) -> None:
        token, _, rest = path[len("/signed/"):].partition("/")
        emu = self.server.emulator
        if method == "GET":
            self._send_file(emu.signed_file(token, rest))
        elif method == "PUT":
            emu.signed_put(token, rest, self.headers, body)
            self._send_json(200, {})
        else:
            raise ApiError(405, 12, "Method Not Allowed")

    def _route_datasets(self, method: str, acct: str, rid: str | None, verb: str | None,
                        query: dict[str, list[str]], body: bytes) -> None:
        emu = self.server.emulator
        key = (method, rid is not None, verb)
        if key == ("POST", False, None):
            self._send_json(200, emu.create_dataset(acct, self._json(body)))
        elif key == ("GET", False, None):
            self._send_json(200, emu.list_datasets(acct, query))
        elif rid is None:
            raise ApiError(405, 12, "Method Not Allowed")
        elif key == ("GET", True, None):
            self._send_json(200, render_dataset(emu.dataset_record(acct, rid)))
        elif key == ("DELETE", True, None):
            self._send_json(200, emu.delete_dataset(acct, rid))
        elif key == ("POST", True, "upload"):
            if len(body) > MAX_MULTIPART_BYTES:
                raise _invalid(f"upload of {len(body)} bytes exceeds {MAX_MULTIPART_BYTES}; use getUploadEndpoint")
            filename, data = _parse_multipart_file(self.headers.get("Content-Type", ""), body)
            self._send_json(200, emu.upload(acct, rid, filename, data))
        elif key == ("POST", True, "getUploadEndpoint"):
            self._send_json(200, emu.upload_endpoint(acct, rid, self._json(body)))
        elif key == ("POST", True, "validateUpload"):
            self._send_json(200, emu.validate_upload(acct, rid, self._json(body)))
        elif key == ("GET", True, "getDownloadEndpoint"):
            if body or self.headers.get("Transfer-Encoding"):
                raise _invalid("GET :getDownloadEndpoint must not have a request body")
            self._send_json(200, emu.download_endpoint(acct, rid))
        elif verb in (None, "upload", "getUploadEndpoint", "validateUpload", "getDownloadEndpoint"):
            raise ApiError(405, 12, "Method Not Allowed")
        else:
            raise _not_found(f"verb {verb}")

    def _route_jobs(self, method: str, acct: str, rid: str | None, verb: str | None,
                    query: dict[str, list[str]], body: bytes) -> None:
        emu = self.server.emulator
        if verb is not None:
            raise _not_found(f"verb {verb}")
        if method == "POST" and rid is None:
            job_id = (query.get("batchInferenceJobId") or query.get("batch_inference_job_id") or [""])[0]
            self._send_json(200, emu.create_job(acct, job_id or None, self._json(body)))
        elif method == "GET" and rid is None:
            self._send_json(200, emu.list_jobs(acct, query))
        elif method == "GET" and rid is not None:
            self._send_json(200, emu.get_job(acct, rid))
        elif method == "DELETE" and rid is not None:
            self._send_json(200, emu.delete_job(acct, rid))
        else:
            raise ApiError(405, 12, "Method Not Allowed")


# ---------------------------------------------------------------------------------------------- entry points


def make_server(host: str, port: int, state_dir: Path, *, latency_s: float = 1.0, answer_key: Path | None = None,
                idle_exit_s: float | None = None, clock: Callable[[], int] = time.time_ns) -> EmulatorServer:
    """A bound (not yet serving) emulator; `port=0` picks a free port. `clock` returns ns since the epoch."""
    emulator = Emulator(Path(state_dir), latency_s=latency_s, answer_key=answer_key, clock=clock)
    return EmulatorServer((host, port), emulator, idle_exit_s)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds from job create to COMPLETED")
    parser.add_argument("--answer-key", type=Path, default=None,
                        help="directory holding open_book.jsonl and closed_book.jsonl")
    parser.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until SIGTERM / Ctrl-C / idle exit; writes `<state_dir>/server.json` while it runs."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(args.host, args.port, args.state_dir, latency_s=args.latency, answer_key=args.answer_key,
                         idle_exit_s=args.idle_exit)
    info_path = args.state_dir / "server.json"
    host, port = server.server_address[:2]
    write_json_atomic(info_path, {"pid": os.getpid(), "host": host, "port": port, "base_url": server.base_url})

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d received, shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    log.info("emulator listening on %s (state dir %s)", server.base_url, args.state_dir)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        current = _read_json(info_path) if info_path.exists() else None
        if isinstance(current, dict) and current.get("pid") == os.getpid():
            info_path.unlink(missing_ok=True)
    return 0
