"""The Fireworks batch-inference semantics of the emulator, independent of HTTP, with fault injection.

`Emulator` methods take parsed inputs and return JSON-able dicts (or a `Payload` for file downloads), raising
`wire.ApiError` for error responses. Datasets: create (client-chosen id, 409 on a taken one), multipart upload or
signed-URL upload + validate, download endpoint with signed URLs (`/signed/<token>/<path>`, valid
`SIGNED_URL_TTL_S`). Jobs: create (`?batchInferenceJobId=`, 409 on a taken id), get, list, delete. A job's state
follows the clock (`wire.phase`); the first request that sees a job due runs it once under the store lock: its
output dataset gets `BIJOutputSet.jsonl` (rows shuffled, seeded by job id) and `error-data`. Answers come from
`pipeline.emulator.model`, keyed by the answer-key directory.

Faults (plan and rule semantics: `pipeline.emulator.faults`) act at these points:
- job create: `job_state` / `job_latency` are bound to the new job (stored in its record, so later plan changes
  do not alter it); `times` counts jobs.
- job run: `error_rows` moves a fraction of the rows to `error-data` (`times` counts output datasets); a
  `job_state` end state of FAILED / CANCELLED writes no output, EXPIRED / EARLY_STOPPED keep a fraction.
- any request touching an output dataset (GET, `:getDownloadEndpoint`, file GET): `output_deleted` deletes it.
- GET of an output dataset: `file_url` sets its `externalUrl` (`times` counts those GETs).
- GET of an output dataset's `BIJOutputSet.jsonl`: the file kinds shape that one response (`times` counts them).
Every fired rule is counted in `/emulator/calls` under `faults_fired` by kind; file GETs under `downloads`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.emulator import model, payloads
from pipeline.emulator.faults import (
    DELETE_KINDS,
    FILE_KINDS,
    HTTP_KINDS,
    JOB_KINDS,
    URL_KINDS,
    WRITE_KINDS,
    FaultBook,
    Rule,
    pick,
    rng,
)
from pipeline.emulator.payloads import Payload
from pipeline.emulator.store import AnswerKey, Store
from pipeline.emulator.wire import (
    ApiError,
    check_id,
    dataset_ref,
    fields,
    int64,
    invalid,
    not_found,
    page,
    phase,
    precondition,
    render_dataset,
    render_job,
    request_line,
)
from pipeline.naming import parse_custom_id
from targets.atomic import write_bytes

log = logging.getLogger(__name__)

SIGNED_URL_TTL_S = 600
OUTPUT_FILE = "BIJOutputSet.jsonl"
ERROR_FILE = "error-data"
FORMATS = ("FORMAT_UNSPECIFIED", "CHAT", "COMPLETION", "RL")
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
END_STATUS = {"JOB_STATE_FAILED": "INVALID_ARGUMENT", "JOB_STATE_CANCELLED": "CANCELLED",
              "JOB_STATE_EXPIRED": "DEADLINE_EXCEEDED", "JOB_STATE_EARLY_STOPPED": "ABORTED"}
"""status.code of a job that a `job_state` fault ends in each state."""


class Emulator:
    """The API semantics; see the module docstring. `faults` (a plan) is installed at startup when given."""

    def __init__(self, state_dir: Path, *, latency_s: float, answer_key: Path | None, clock: Callable[[], int],
                 faults: dict[str, Any] | None = None) -> None:
        self.store = Store(state_dir)
        self.faults = FaultBook(state_dir / "faults.json")
        if faults is not None:
            self.faults.install(faults)
        self.latency_s = latency_s
        self.answers = AnswerKey(answer_key)
        self.clock = clock
        self.base_url = ""

    # ---- faults

    def fire(self, kinds: frozenset[str], subject: str, method: str | None = None) -> Rule | None:
        """The fault rule that fires for `subject` now (counted in /emulator/calls), or None."""
        rule = self.faults.fire(kinds, subject, method)
        if rule is not None:
            log.info("fault %s (rule %d) fires on %s", rule.fault, rule.index, subject)
            self.store.count_call("faults_fired", rule.fault)
        return rule

    def http_fault(self, method: str, path: str) -> Rule | None:
        return self.fire(HTTP_KINDS, path, method)

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
            raise not_found(f"dataset {acct}/{dataset_id}")
        return record

    def _live_dataset(self, acct: str, dataset_id: str) -> dict[str, Any]:
        """The dataset record, after an `output_deleted` rule had its chance to delete an output dataset."""
        with self.store.lock:
            record = self.dataset_record(acct, dataset_id)
            if record.get("sourceJobName") and self.fire(DELETE_KINDS, dataset_id):
                self._remove_dataset(acct, record)
                raise not_found(f"dataset {acct}/{dataset_id} (deleted by a fault)")
            return record

    def get_dataset(self, acct: str, dataset_id: str) -> dict[str, Any]:
        record = self._live_dataset(acct, dataset_id)
        rule = self.fire(URL_KINDS, dataset_id) if record.get("sourceJobName") else None
        return render_dataset(record, external_url=rule.params["url"] if rule else "")

    def create_dataset(self, acct: str, body: Any) -> dict[str, Any]:
        req = fields(body, DATASET_CREATE_FIELDS, "request")
        dataset_id = req.get("datasetId")
        if not isinstance(dataset_id, str) or not dataset_id:
            raise invalid("dataset_id is required")
        check_id(dataset_id, "dataset")
        if "dataset" not in req:
            raise invalid("dataset is required")
        spec = fields(req["dataset"], DATASET_FIELDS, "dataset")
        if spec.get("exampleCount") in (None, "", 0, "0"):
            raise invalid("example_count is required for uploaded datasets")
        count = int64(spec["exampleCount"], "exampleCount")
        fmt = spec.get("format") or "FORMAT_UNSPECIFIED"
        if fmt not in FORMATS:
            raise invalid(f"invalid value for enum field format: {fmt!r}")
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
            self._remove_dataset(acct, self.dataset_record(acct, dataset_id))
        return {}

    def _remove_dataset(self, acct: str, record: dict[str, Any]) -> None:
        self.store.delete(acct, "datasets", record["id"])
        for name in record.get("files") or {}:
            (self.store.files_dir(acct, record["id"]) / name).unlink(missing_ok=True)

    def _uploadable(self, acct: str, dataset_id: str) -> dict[str, Any]:
        record = self.dataset_record(acct, dataset_id)
        if not record.get("userUploaded"):
            raise precondition(f"dataset {record['name']} is not an uploaded dataset")
        if record["state"] != "UPLOADING":
            raise precondition(f"dataset {record['name']} is {record['state']}, uploads are closed")
        return record

    def upload(self, acct: str, dataset_id: str, filename: str, data: bytes) -> dict[str, Any]:
        with self.store.lock:
            record = self._uploadable(acct, dataset_id)
            write_bytes(self.store.files_dir(acct, dataset_id) / filename, data)
            record.update(files={filename: len(data)}, pending={}, state="READY", update_ns=self.clock())
            self.store.put(acct, "datasets", record)
            self.store.count_call("uploads", dataset_id)
        return {"bytes": len(data), "created_at": self.clock() // 10**9, "filename": filename, "id": record["name"],
                "object": "file", "purpose": "dataset"}

    def upload_endpoint(self, acct: str, dataset_id: str, body: Any) -> dict[str, Any]:
        req = fields(body, UPLOAD_ENDPOINT_FIELDS, "request")
        sizes = req.get("filenameToSize")
        if not isinstance(sizes, dict) or not sizes:
            raise invalid("filename_to_size is required")
        with self.store.lock:
            record = self._uploadable(acct, dataset_id)
            pending = {}
            for name, size in sizes.items():
                if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
                    raise invalid(f"invalid file name {name!r}")
                pending[name] = int64(size, "filenameToSize")
            record["pending"] = pending
            self.store.put(acct, "datasets", record)
        urls = {name: self.sign("PUT", f"upload/{acct}/{dataset_id}/{name}", str(size))
                for name, size in pending.items()}
        return {"filenameToSignedUrls": urls}

    def signed_put(self, token: str, path: str, headers: Any, data: bytes) -> None:
        match = re.fullmatch(r"upload/([^/]+)/([^/]+)/([^/]+)", path)
        if match is None:
            raise not_found(path)
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
                raise ApiError(400, 3, f"MalformedSecurityHeader: x-goog-content-length-range must be {size},{size}")
            if len(data) != size:
                raise ApiError(400, 3, f"EntityTooSmall/Large: got {len(data)} bytes, signed for {size}")
            write_bytes(self.store.files_dir(acct, dataset_id) / name, data)
            record["files"] = {**(record.get("files") or {}), name: size}
            record["pending"] = {k: v for k, v in record["pending"].items() if k != name}
            record["update_ns"] = self.clock()
            self.store.put(acct, "datasets", record)
            self.store.count_call("uploads", dataset_id)

    def validate_upload(self, acct: str, dataset_id: str, body: Any) -> dict[str, Any]:
        fields(body if body is not None else {}, set(), "request")
        with self.store.lock:
            record = self._uploadable(acct, dataset_id)
            if record.get("pending"):
                raise precondition(f"upload of {sorted(record['pending'])} has not completed")
            if not record.get("files"):
                raise precondition("nothing was uploaded")
            record.update(state="READY", update_ns=self.clock())
            self.store.put(acct, "datasets", record)
        return {}

    def download_endpoint(self, acct: str, dataset_id: str) -> dict[str, Any]:
        record = self._live_dataset(acct, dataset_id)
        urls = {f"dataset/{dataset_id}/{name}": self.sign("GET", f"download/{acct}/{dataset_id}/{name}")
                for name in sorted(record.get("files") or {})}
        return {"filenameToSignedUrls": urls}

    def signed_file(self, token: str, path: str) -> Payload:
        """The body of a signed file GET: the stored file, or its variant shaped by a file fault."""
        self.verify("GET", token, path)
        match = re.fullmatch(r"download/([^/]+)/([^/]+)/([^/]+)", path)
        if match is None:
            raise not_found(path)
        acct, dataset_id, name = match.groups()
        record = self._live_dataset(acct, dataset_id)
        if name not in (record.get("files") or {}):
            raise not_found(path)
        self.store.count_call("downloads", dataset_id)
        file = self.store.files_dir(acct, dataset_id) / name
        rule = self.fire(FILE_KINDS, dataset_id) if record.get("sourceJobName") and name == OUTPUT_FILE else None
        return payloads.file_payload(file) if rule is None else _shaped(rule, dataset_id, file.read_bytes())

    def list_datasets(self, acct: str, query: dict[str, list[str]]) -> dict[str, Any]:
        records = sorted(self.store.all(acct, "datasets"), key=lambda r: r["name"])
        return page([render_dataset(r) for r in records], query, "datasets")

    # ---- jobs

    def create_job(self, acct: str, job_id: str | None, body: Any) -> dict[str, Any]:
        job_id = check_id(job_id, "batch inference job") if job_id else f"job-{secrets.token_hex(4)}"
        spec = fields(body, JOB_FIELDS, "batch_inference_job")
        params = fields(spec.get("inferenceParameters") or {}, INFERENCE_FIELDS, "inference_parameters")
        if not isinstance(spec.get("model"), str) or not spec["model"]:
            raise invalid("model is required")
        input_id = dataset_ref(acct, spec.get("inputDatasetId"), "input_dataset_id")
        output_ref = spec.get("outputDatasetId")
        output_id = dataset_ref(acct, output_ref, "output_dataset_id") if output_ref else None
        with self.store.lock:
            if self.store.get(acct, "jobs", job_id) is not None:
                self.store.count_call("job_create_conflicts", job_id)
                raise ApiError(409, 6, f'batch inference job "accounts/{acct}/batchInferenceJobs/{job_id}" '
                                       "already exists")
            source = self.store.get(acct, "datasets", input_id)
            if source is None or source["state"] != "READY":
                state = "missing" if source is None else source["state"]
                raise precondition(f"input dataset accounts/{acct}/datasets/{input_id} is not READY ({state})")
            if output_id is None:
                output_id = self._free_output_id(acct)
            elif self.store.get(acct, "datasets", output_id) is not None:
                raise precondition(f"output dataset accounts/{acct}/datasets/{output_id} already exists")
            record = {"id": job_id, "name": f"accounts/{acct}/batchInferenceJobs/{job_id}",
                      "displayName": str(spec.get("displayName") or ""), "model": spec["model"],
                      "inputDatasetId": f"accounts/{acct}/datasets/{input_id}",
                      "outputDatasetId": f"accounts/{acct}/datasets/{output_id}", "inferenceParameters": params,
                      "precision": spec.get("precision") or "PRECISION_UNSPECIFIED",
                      "declared_count": int(source.get("exampleCount", 0)), "latency_s": self.latency_s,
                      "create_ns": self.clock(), "final_state": None, "fault": None, "stuck": False}
            self.bind_job_fault(record, job_id)
            self.store.put(acct, "jobs", record)
            self.store.count_call("job_creates", job_id)
        return render_job(record, "JOB_STATE_VALIDATING", record["create_ns"])

    def bind_job_fault(self, record: dict[str, Any], subject: str) -> None:
        """Bind the job fault that fires for `subject` to a new job's `record` (kept in it, so later plan changes do
        not alter the job): its end state, or its latency (`stuck`: never ends). Shared by every wire format."""
        rule = self.fire(JOB_KINDS, subject)
        if rule is None:
            return
        record["fault"] = {"rule": rule.index, "fault": rule.fault, **rule.params}
        if rule.fault == "job_latency":
            record["stuck"] = rule.params["stuck"]
            if rule.params["seconds"] is not None:
                record["latency_s"] = rule.params["seconds"]

    def _free_output_id(self, acct: str) -> str:
        """A fresh `bij-xxxxxxxx` dataset id, as the real service allocates when outputDatasetId is omitted."""
        while True:
            candidate = f"bij-{''.join(random.choices('abcdefghijklmnopqrstuvwxyz0123456789', k=8))}"
            if self.store.get(acct, "datasets", candidate) is None:
                return candidate

    def get_job(self, acct: str, job_id: str) -> dict[str, Any]:
        record = self.store.get(acct, "jobs", job_id)
        if record is None:
            raise not_found(f"job {acct}/{job_id}")
        return self._view(acct, record)

    def _view(self, acct: str, record: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        state = phase(record, now)
        if state == "JOB_STATE_COMPLETED" and not record.get("final_state"):
            record = self._finish(acct, record["id"]) or record
            state = phase(record, now)
        return render_job(record, state, now)

    def list_jobs(self, acct: str, query: dict[str, list[str]]) -> dict[str, Any]:
        records = sorted(self.store.all(acct, "jobs"), key=lambda r: (r["create_ns"], r["name"]))
        return page([self._view(acct, r) for r in records], query, "batchInferenceJobs")

    def delete_job(self, acct: str, job_id: str) -> dict[str, Any]:
        with self.store.lock:
            if self.store.get(acct, "jobs", job_id) is None:
                raise not_found(f"job {acct}/{job_id}")
            self.store.delete(acct, "jobs", job_id)
        return {}

    def _finish(self, acct: str, job_id: str) -> dict[str, Any] | None:
        """Run a due job once: write its output dataset and persist the final state (None if it was deleted)."""
        with self.store.lock:
            record = self.store.get(acct, "jobs", job_id)
            if record is None or record.get("final_state"):
                return record
            fault = record.get("fault") or {}
            end_state = fault["state"] if fault.get("fault") == "job_state" else "JOB_STATE_COMPLETED"
            end_ns = record["create_ns"] + int(record["latency_s"] * 1e9)
            if end_state in ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
                record.update(final_state=end_state, status={"code": END_STATUS[end_state], "message": fault["message"]})
            else:
                try:
                    outputs = self._run(acct, record, end_ns)
                except ApiError as exc:
                    record.update(final_state="JOB_STATE_FAILED", status={"code": "INVALID_ARGUMENT",
                                                                          "message": exc.message})
                else:
                    total = len(outputs)
                    if end_state != "JOB_STATE_COMPLETED":
                        kept = pick([o["custom_id"] for o in outputs], fault["partial"], job_id, fault["rule"])
                        outputs = [o for o in outputs if o["custom_id"] in kept]
                        record["status"] = {"code": END_STATUS[end_state], "message": fault["message"]}
                    results, errors = self._split_errors(record, outputs)
                    self._write_output(acct, record, results, errors, end_ns)
                    record.update(final_state=end_state, progress=_progress(record, total, results, errors))
            self.store.put(acct, "jobs", record)
            return record

    def _split_errors(self, record: dict[str, Any], outputs: list[dict[str, Any]]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(results, error-data rows): an `error_rows` rule on the output dataset moves a fraction to the errors."""
        output_id = record["outputDatasetId"].rsplit("/", 1)[-1]
        rule = self.fire(WRITE_KINDS, output_id)
        if rule is None:
            return outputs, []
        failed = pick([o["custom_id"] for o in outputs], rule.params["fraction"], output_id, rule.index)
        error = {"code": rule.params["code"], "message": rule.params["message"]}
        return ([o for o in outputs if o["custom_id"] not in failed],
                [{"custom_id": o["custom_id"], "error": error} for o in outputs if o["custom_id"] in failed])

    def _run(self, acct: str, record: dict[str, Any], end_ns: int) -> list[dict[str, Any]]:
        """The job's result rows (shuffled, seeded by job id); ApiError if the input is bad."""
        input_id = record["inputDatasetId"].rsplit("/", 1)[-1]
        source = self.store.get(acct, "datasets", input_id)
        if source is None:
            raise precondition(f"input dataset {record['inputDatasetId']} no longer exists")
        existing = self.store.get(acct, "datasets", record["outputDatasetId"].rsplit("/", 1)[-1])
        if existing is not None and existing.get("sourceJobName") != record["name"]:
            raise precondition(f"output dataset {record['outputDatasetId']} was created by someone else")
        outputs: list[dict[str, Any]] = []
        seen: set[str] = set()
        for name in sorted(source.get("files") or {}):
            path = self.store.files_dir(acct, input_id) / name
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        custom_id, messages = request_line(line, f"{name}:{lineno}", seen)
                        outputs.append(self._respond(record, custom_id, messages, end_ns))
        random.Random(record["id"]).shuffle(outputs)
        return outputs

    def _respond(self, record: dict[str, Any], custom_id: str, messages: list[dict[str, Any]],
                 end_ns: int) -> dict[str, Any]:
        content, finish_reason, usage = self.answer(custom_id, messages)
        digest = hashlib.sha256(f"{record['name']}\n{custom_id}".encode()).hexdigest()[:32]
        return {"custom_id": custom_id, "response": {
            "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": end_ns // 10**9,
            "model": record["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason}],
            "usage": usage}}

    def answer(self, custom_id: str, messages: list[dict[str, Any]]) -> tuple[str, str, dict[str, int]]:
        """The simulated model's answer to one request, with its answer-key row when `custom_id` is one of ours
        (every wire format answers through here, so they all give the same answers)."""
        try:
            cid = parse_custom_id(custom_id)
        except ValueError:
            cid = None
        key = self.answers.lookup(cid.dataset, cid.item_id) if cid is not None else None
        return model.answer(custom_id, messages, key)

    def _write_output(self, acct: str, record: dict[str, Any], results: list[dict[str, Any]],
                      errors: list[dict[str, Any]], end_ns: int) -> None:
        output_id = record["outputDatasetId"].rsplit("/", 1)[-1]
        files_dir = self.store.files_dir(acct, output_id)
        files = {}
        for name, rows in ((OUTPUT_FILE, results), (ERROR_FILE, errors)):
            data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
            write_bytes(files_dir / name, data)
            files[name] = len(data)
        self.store.put(acct, "datasets", output_dataset_record(record["outputDatasetId"], record["name"], files,
                                                               example_count=len(results), end_ns=end_ns))


def output_dataset_record(name: str, job_name: str, files: dict[str, int], *, example_count: int,
                          end_ns: int) -> dict[str, Any]:
    """The stored record of job `job_name`'s output dataset `name` (`accounts/<acct>/datasets/<id>`): READY, holding
    `files` ({file name: bytes}, already under `Store.files_dir`). Public so that a benchmark can serve outputs of
    its own making exactly as a job's (bench/bench_download_scale.py)."""
    return {"id": name.rsplit("/", 1)[-1], "name": name, "displayName": "", "exampleCount": example_count,
            "format": "FORMAT_UNSPECIFIED", "userUploaded": False, "state": "READY", "sourceJobName": job_name,
            "files": files, "pending": {}, "create_ns": end_ns, "update_ns": end_ns}


def _progress(record: dict[str, Any], total: int, results: list[dict[str, Any]],
              errors: list[dict[str, Any]]) -> dict[str, Any]:
    """jobProgress of a finished job: rows cut by an early end count as failed, like rows moved to error-data."""
    processed = len(results) + len(errors)
    return {"percent": 100 * processed // total if total else 100, "epoch": 0,
            "totalInputRequests": record["declared_count"], "totalProcessedRequests": processed,
            "successfullyProcessedRequests": len(results), "failedRequests": total - len(results),
            "outputRows": len(results),
            "inputTokens": sum(r["response"]["usage"]["prompt_tokens"] for r in results),
            "outputTokens": sum(r["response"]["usage"]["completion_tokens"] for r in results),
            "cachedInputTokenCount": 0}


def _shaped(rule: Rule, dataset_id: str, data: bytes) -> Payload:
    """The results file `data` as a file fault serves it (see `pipeline.emulator.faults.PARAMS`)."""
    params = rule.params
    if rule.fault == "truncated":
        return payloads.truncated(data, params["mode"])
    if rule.fault == "garbage":
        return payloads.garbage(rng(dataset_id, rule.index), params["bytes"])
    if rule.fault == "oversized":
        return payloads.oversized(data, params["bytes"])
    if rule.fault == "zip_bomb":
        return payloads.zip_bomb(params["bytes"])
    if rule.fault == "path_traversal":
        return payloads.traversal(data, params["archive"], params["member"])
    if rule.fault == "gzip_bomb":
        return payloads.gzip_bomb(params["inflated_bytes"])
    if rule.fault == "endless":
        return payloads.endless(data, params["chunk_bytes"])
    if rule.fault == "lying_length":
        return payloads.lying_length(data, params["direction"], params["extra_bytes"])
    if rule.fault == "tar_bomb":
        return payloads.tar_bomb(params["members"], params["depth"], params["member_bytes"], gzip=params["gzip"])
    if rule.fault == "slow_drip":
        return payloads.slow_drip(data, params["interval_s"])
    if rule.fault == "duplicate_lines":
        return payloads.bytes_payload(payloads.duplicated(data, identical=params["identical"]))
    assert rule.fault == "missing_results", rule.fault
    missing = pick(payloads.custom_ids(data), params["fraction"], dataset_id, rule.index)
    return payloads.bytes_payload(payloads.without(data, missing))
