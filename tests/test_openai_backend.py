"""OpenAIBackend and OpenAIClient against the emulator's OpenAI Batch API routes (loopback, in-process)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.emulator.server import EmulatorServer
from pipeline.naming import make_custom_id
from pipeline.parsing import has_answer, merge_results
from pipeline.providers import openai as openai_mod
from pipeline.providers.backend import PartSpec
from pipeline.providers.download import fetch_url
from pipeline.providers.errors import NotFound
from pipeline.providers.limits import Deadline
from pipeline.providers.openai import OpenAIBackend, OpenAIClient, convert_requests
from targets.manifest import PartRecord
from tests.conftest import Clock, start_emulator, stop_emulator_server, tiny_data

KEY = "sk-openai-secret-test-key"
CLIENT_KEY = "run1-abc123-g0"
PARAMS = {"maxTokens": 32, "temperature": 0.0, "n": 1, "topP": 0.9, "extraBody": json.dumps({"stop": ["\n\n"]})}


class Harness:
    """One emulator, a client on it, a part of six requests, and fakes for `save` and `reserve`."""

    def __init__(self, tmp_path: Path, **emulator: Any) -> None:
        self.clock = emulator.pop("clock", None) or Clock()
        self.server: EmulatorServer = start_emulator(tmp_path / "emu", answer_key=tiny_data(tmp_path / "data"),
                                                     clock=self.clock, **emulator)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.sleeps: list[float] = []
        self.client = OpenAIClient(self.base + "/v1", KEY, allow_loopback_http=True, sleep=self.sleeps.append)
        self.backend = OpenAIBackend(self.client)
        self.saves: list[PartRecord] = []
        self.reserves = 0
        self.part = make_part(tmp_path)
        self.record = new_record(self.part)

    def save(self, record: PartRecord) -> None:
        self.saves.append(record.model_copy(deep=True))

    def reserve(self) -> None:
        self.reserves += 1

    def calls(self) -> dict[str, dict[str, int]]:
        return requests.get(self.base + "/emulator/calls", timeout=5).json()

    def faults(self, *rules: dict[str, Any]) -> None:
        requests.post(self.base + "/emulator/faults", json={"rules": list(rules)}, timeout=5).raise_for_status()

    def batches(self) -> list[dict[str, Any]]:
        return list(self.client.list_batches())

    def submitted(self) -> None:
        self.backend.upload(self.part, self.record, self.save)
        self.backend.submit(self.part, self.record, self.save, self.reserve)

    def close(self) -> None:
        self.client.close()
        stop_emulator_server(self.server)


def make_part(tmp_path: Path, params: dict[str, Any] | None = None, n: int = 6) -> PartSpec:
    """A part of `n` open-book requests in the build's line shape."""
    ids = [make_custom_id("squad_v2", f"o{i}", "control", 0.0, 0, "open") for i in range(n)]
    lines = [json.dumps({"custom_id": cid, "body": {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"Which river feeds Lake Miro{i}?"}]}}) for i, cid in enumerate(ids)]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return PartSpec(jkey="t0_control_p01", requests_path=path, lines=n, model="gpt-4o-mini",
                    inference_parameters=dict(PARAMS if params is None else params), request_sha256="0" * 64,
                    client_key=CLIENT_KEY, input_name="run1-t0-control-p01-in", output_name="run1-t0-control-p01-out",
                    display_name="t0_control_p01", work_dir=work)


def new_record(part: PartSpec) -> PartRecord:
    return PartRecord(group="t0_control", index=1, type="open", input_path=str(part.requests_path),
                      input_sha256="0" * 64, lines=part.lines, model=part.model,
                      inference_parameters=part.inference_parameters, dataset_id="", job_id="", output_dataset_id="")


def expected_ids(part: PartSpec) -> list[str]:
    return [json.loads(line)["custom_id"] for line in part.requests_path.read_text().splitlines()]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, latency_s=60.0)
    yield harness
    harness.close()


def _download(h: Harness, dest: Path, max_bytes: int = 10 * 1024**2) -> dict[str, Path]:
    return h.backend.download(h.part, h.record, dest, max_bytes=max_bytes, deadline=Deadline(30, "test download"))


# ---------------------------------------------------------------------------------------------- full cycle


def test_full_cycle_upload_submit_poll_download(h: Harness, tmp_path: Path) -> None:
    h.backend.upload(h.part, h.record, h.save)
    file_id = h.record.remote["input_file_id"]
    assert file_id.startswith("file-") and h.saves[-1].remote == {"input_file_id": file_id}

    first = h.backend.submit(h.part, h.record, h.save, h.reserve)
    assert h.reserves == 1 and first.job_id.startswith("batch_") and h.record.job_id == first.job_id
    assert h.saves[-1].job_id == first.job_id
    assert (first.state, first.decided) == ("validating", "in_progress")

    seen = []
    for _ in range(6):
        status = h.backend.status(h.part, h.record)
        assert status is not None
        seen.append(status.state)
        if status.decided == "completed":
            break
        h.clock.advance(16)
    assert seen == ["validating", "in_progress", "in_progress", "finalizing", "completed"]
    assert status.progress == {"total": 6, "completed": 6, "failed": 0, "percent": 100}
    assert status.output and status.snapshot and status.snapshot["metadata"]["client_key"] == CLIENT_KEY

    files = _download(h, tmp_path / "dest")
    assert set(files) == {"output.jsonl"}
    rows, problems = merge_results(files.values(), expected_ids(h.part))
    assert problems == [] and len(rows) == 6 and all(has_answer(r) for r in rows)
    assert set(rows[0]) == {"custom_id", "response"} and "usage" in rows[0]["response"]["body"]
    assert not list((h.part.work_dir).glob("download-*")), "raw downloads are removed after conversion"


def test_request_conversion_is_deterministic_and_complete(tmp_path: Path) -> None:
    part = make_part(tmp_path)
    data = convert_requests(part)
    assert data == convert_requests(part)
    first = json.loads(data.splitlines()[0])
    assert first["method"] == "POST" and first["url"] == "/v1/chat/completions"
    assert first["body"] == {"model": "gpt-4o-mini", "messages": first["body"]["messages"], "max_tokens": 32,
                             "temperature": 0.0, "n": 1, "top_p": 0.9, "stop": ["\n\n"]}
    assert data.splitlines()[0] == json.dumps(first, sort_keys=True, separators=(",", ":")).encode()
    backend = OpenAIBackend.__new__(OpenAIBackend)
    path, size = backend.input_file(part)
    mtime = path.stat().st_mtime_ns
    assert backend.input_file(part) == (path, size) and path.stat().st_mtime_ns == mtime, "unchanged bytes: no rewrite"


def test_top_k_is_refused(tmp_path: Path) -> None:
    part = make_part(tmp_path, params={**PARAMS, "topK": 40})
    with pytest.raises(ValueError, match="topK"):
        convert_requests(part)


def test_batch_limits_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = make_part(tmp_path)
    monkeypatch.setattr(openai_mod, "MAX_INPUT_LINES", 5)
    with pytest.raises(ValueError, match="more than 5 requests"):
        convert_requests(part)
    monkeypatch.setattr(openai_mod, "MAX_INPUT_LINES", 50_000)
    monkeypatch.setattr(openai_mod, "MAX_INPUT_BYTES", 100)
    with pytest.raises(ValueError, match="exceeds 100 bytes"):
        convert_requests(part)


# ---------------------------------------------------------------------------------------------- exactly once


def test_upload_reattaches_instead_of_uploading_again(h: Harness) -> None:
    h.backend.upload(h.part, h.record, h.save)
    h.backend.upload(h.part, h.record, h.save)
    fresh = new_record(h.part)  # the recorded file id was lost: found by name and size in the list
    h.backend.upload(h.part, fresh, h.save)
    assert fresh.remote["input_file_id"] == h.record.remote["input_file_id"]
    assert h.calls()["uploads"] == {f"{h.part.input_name}.jsonl": 1}


def test_submit_twice_makes_one_batch(h: Harness) -> None:
    h.submitted()
    again = h.backend.submit(h.part, h.record, h.save, h.reserve)
    fresh = new_record(h.part)  # the job id was lost: found by client_key in the batch list
    fresh.remote = dict(h.record.remote)
    found = h.backend.submit(h.part, fresh, h.save, h.reserve)
    assert again.job_id == found.job_id == h.record.job_id
    assert h.reserves == 1
    assert h.calls()["job_creates"] == {CLIENT_KEY: 1}
    assert len(h.batches()) == 1


def test_lost_create_response_is_reconciled_not_repeated(h: Harness) -> None:
    h.backend.upload(h.part, h.record, h.save)
    h.faults({"fault": "drop_after_commit", "match": "^/v1/batches$", "method": "POST"})
    status = h.backend.submit(h.part, h.record, h.save, h.reserve)
    assert status.job_id.startswith("batch_") and h.record.job_id == status.job_id
    assert h.reserves == 1
    assert h.calls()["job_creates"] == {CLIENT_KEY: 1}
    assert [b["id"] for b in h.batches()] == [status.job_id]
    # A crash before the id was saved: the next submit finds the batch by its client_key.
    fresh = new_record(h.part)
    fresh.remote = dict(h.record.remote)
    assert h.backend.submit(h.part, fresh, h.save, h.reserve).job_id == status.job_id
    assert h.reserves == 1 and h.calls()["job_creates"] == {CLIENT_KEY: 1}


def test_lost_upload_response_is_found_not_repeated(h: Harness) -> None:
    h.faults({"fault": "drop_after_commit", "match": "^/v1/files$", "method": "POST"})
    h.backend.upload(h.part, h.record, h.save)
    assert h.record.remote["input_file_id"].startswith("file-")
    assert h.calls()["uploads"] == {f"{h.part.input_name}.jsonl": 1}


def test_create_refused_by_a_5xx_is_retried_once_and_a_refused_reserve_creates_nothing(h: Harness) -> None:
    h.backend.upload(h.part, h.record, h.save)

    def refuse() -> None:
        raise RuntimeError("stop requested")

    with pytest.raises(RuntimeError, match="stop requested"):
        h.backend.submit(h.part, h.record, h.save, refuse)
    assert h.batches() == [] and h.record.job_id == ""
    h.faults({"fault": "status", "status": 503, "match": "^/v1/batches$", "method": "POST"})
    status = h.backend.submit(h.part, h.record, h.save, h.reserve)
    assert h.reserves == 1 and len(h.sleeps) == 1
    assert h.calls()["job_creates"] == {CLIENT_KEY: 1} and [b["id"] for b in h.batches()] == [status.job_id]


def test_rate_limit_with_retry_after_is_retried(h: Harness) -> None:
    h.submitted()
    h.faults({"fault": "status", "status": 429, "retry_after": 7, "match": "^/v1/batches/batch_", "times": 2})
    status = h.backend.status(h.part, h.record)
    assert status is not None and status.job_id == h.record.job_id
    assert h.sleeps == [7, 7]


def test_batch_pagination_follows_after(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h.backend.upload(h.part, h.record, h.save)
    file_id = h.record.remote["input_file_id"]
    made = [h.client.create_batch(file_id, {"client_key": f"k{i}"}, lookup=lambda: None)[0]["id"] for i in range(5)]
    monkeypatch.setattr(openai_mod, "MAX_LIST_PAGE", 2)
    assert [b["id"] for b in OpenAIClient.list_batches(h.client)] == made[::-1]


# ---------------------------------------------------------------------------------------------- outcomes


def test_expired_batch_keeps_partial_output(h: Harness, tmp_path: Path) -> None:
    h.faults({"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5, "match": CLIENT_KEY})
    h.submitted()
    h.clock.advance(61)
    status = h.backend.status(h.part, h.record)
    assert status is not None and (status.state, status.decided) == ("expired", "expired")
    assert status.progress == {"total": 6, "completed": 3, "failed": 3, "percent": 100}
    files = _download(h, tmp_path / "dest")
    rows, problems = merge_results(files.values(), expected_ids(h.part))
    assert problems == []
    assert len(rows) == 3 and all(has_answer(r) for r in rows), "rows never run get no line: the caller counts them"


def test_cancelled_without_output_and_failed(tmp_path: Path) -> None:
    h = Harness(tmp_path, latency_s=60.0)
    try:
        h.faults({"fault": "job_state", "state": "JOB_STATE_FAILED", "message": "token_limit_exceeded here",
                  "match": CLIENT_KEY})
        h.submitted()
        h.clock.advance(61)
        status = h.backend.status(h.part, h.record)
        assert status is not None and status.decided == "failed" and "token_limit_exceeded here" in status.message
        assert status.output == ""
    finally:
        h.close()


def test_error_file_rows_become_error_lines(h: Harness, tmp_path: Path) -> None:
    h.faults({"fault": "error_rows", "fraction": 0.5, "code": 503, "message": "overloaded", "match": CLIENT_KEY})
    h.submitted()
    h.clock.advance(61)
    status = h.backend.status(h.part, h.record)
    assert status is not None and status.decided == "completed"
    files = _download(h, tmp_path / "dest")
    assert set(files) == {"output.jsonl", "errors.jsonl"}
    errors = [json.loads(line) for line in files["errors.jsonl"].read_text().splitlines()]
    assert len(errors) == 3 and all(e["error"] == {"code": 503, "message": "overloaded"} for e in errors)
    rows, _ = merge_results(files.values(), expected_ids(h.part))
    assert len(rows) == 6 and sum(has_answer(r) for r in rows) == 3


def test_corrupt_output_is_refused_naming_file_and_line(h: Harness, tmp_path: Path) -> None:
    h.submitted()
    h.clock.advance(61)
    h.faults({"fault": "garbage", "match": CLIENT_KEY})
    with pytest.raises(ValueError, match=r"output_file file-\w+ of part t0_control_p01 line 1: not valid JSON"):
        _download(h, tmp_path / "dest")
    assert not (tmp_path / "dest" / "output.jsonl").exists()


def test_oversized_output_is_refused(h: Harness, tmp_path: Path) -> None:
    h.submitted()
    h.clock.advance(61)
    with pytest.raises(ValueError, match="exceeds the limit of 100 bytes"):
        _download(h, tmp_path / "dest", max_bytes=100)


@pytest.mark.parametrize(("rule", "max_bytes", "deadline_s", "error"), [
    ({"fault": "endless", "chunk_bytes": 4096}, 200_000, 30, "exceeds the limit of 200000 bytes"),
    ({"fault": "oversized", "bytes": 300_000}, 200_000, 30, "exceeds the limit of 200000 bytes"),
    ({"fault": "slow_drip", "interval_s": 0.05}, 10 * 1024**2, 0.5, "deadline"),
    ({"fault": "zip_bomb", "bytes": 10**6}, 10 * 1024**2, 30, "not valid JSON"),
    ({"fault": "truncated", "mode": "short_body"}, 10 * 1024**2, 30, "not valid JSON"),
])
def test_hostile_output_bodies_are_refused(h: Harness, tmp_path: Path, rule: dict[str, Any], max_bytes: int,
                                           deadline_s: float, error: str) -> None:
    h.submitted()
    h.clock.advance(61)
    h.faults({**rule, "match": CLIENT_KEY})
    with pytest.raises(ValueError, match=error):
        h.backend.download(h.part, h.record, tmp_path / "dest", max_bytes=max_bytes,
                           deadline=Deadline(deadline_s, "test download"))
    assert not (tmp_path / "dest").exists() or not list((tmp_path / "dest").iterdir())


@pytest.mark.parametrize("rule", [{"fault": "truncated", "mode": "cut_connection"},
                                  {"fault": "lying_length", "direction": "over"}])
def test_cut_output_body_is_fetched_again(h: Harness, tmp_path: Path, rule: dict[str, Any]) -> None:
    h.submitted()
    h.clock.advance(61)
    h.faults({**rule, "match": CLIENT_KEY})
    files = _download(h, tmp_path / "dest")
    rows, problems = merge_results(files.values(), expected_ids(h.part))
    assert problems == [] and len(rows) == 6 and len(h.sleeps) == 1
    assert h.calls()["faults_fired"] == {rule["fault"]: 1}


def test_cancelled_batch_with_partial_results_is_collected(h: Harness, tmp_path: Path) -> None:
    h.submitted()
    h.clock.advance(30)  # half of the running time: half the rows done
    assert h.client.cancel_batch(h.record.job_id)["status"] == "cancelling"
    h.clock.advance(15)
    status = h.backend.status(h.part, h.record)
    assert status is not None and (status.state, status.decided) == ("cancelled", "expired")
    rows, _ = merge_results(_download(h, tmp_path / "dest").values(), expected_ids(h.part))
    assert len(rows) == 3 and all(has_answer(r) for r in rows)
    resp = requests.post(f"{h.base}/v1/batches/{h.record.job_id}/cancel", headers={"Authorization": f"Bearer {KEY}"},
                         timeout=5)
    assert resp.status_code == 409 and "cancelled" in resp.json()["error"]["message"]


def test_deleted_output_is_not_found(h: Harness, tmp_path: Path) -> None:
    h.faults({"fault": "output_deleted", "match": CLIENT_KEY})
    h.submitted()
    h.clock.advance(61)
    with pytest.raises(NotFound):
        _download(h, tmp_path / "dest")


def test_status_of_unknown_batch_is_none(h: Harness) -> None:
    assert h.backend.status(h.part, h.record) is None
    h.record.job_id = "batch_doesnotexist"
    assert h.backend.status(h.part, h.record) is None


def test_emulator_validates_lines_and_answers_openai_envelopes(h: Harness, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                               "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}) + "\n")
    uploaded = h.client.upload_file(bad, "bad.jsonl")
    batch, created = h.client.create_batch(uploaded["id"], {}, lookup=lambda: None)
    assert created and batch["status"] == "validating"
    h.clock.advance(20)
    failed = h.client.get_batch(batch["id"])
    assert failed is not None and failed["status"] == "failed"
    assert failed["errors"]["data"][0]["line"] == 1 and failed["errors"]["data"][0]["code"] == "mismatched_endpoint"
    assert requests.get(h.base + "/v1/files", timeout=5).status_code == 403
    resp = requests.get(h.base + "/v1/batches/batch_nope", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = requests.post(h.base + "/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
                                                       "completion_window": "24h"},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_file_id"


def test_fetch_url_sends_headers_only_to_the_origin_of_the_url(tmp_path: Path) -> None:
    seen: dict[str, str | None] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            seen[self.path] = self.headers.get("Authorization")
            if self.path == "/start":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/end")
                self.send_header("Content-Length", "0")
            else:
                self.send_response(200)
                self.send_header("Content-Length", "3")
            self.end_headers()
            if self.path != "/start":
                self.wfile.write(b"ok\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        fetch_url(f"http://127.0.0.1:{server.server_address[1]}/start", tmp_path / "out", max_bytes=100,
                  timeout=(5, 5), allow_loopback_http=True, headers={"Authorization": f"Bearer {KEY}"})
    finally:
        server.shutdown()
        server.server_close()
    assert seen == {"/start": f"Bearer {KEY}", "/end": None}
    assert (tmp_path / "out").read_bytes() == b"ok\n"


# ---------------------------------------------------------------------------------------------- environment


def test_missing_env_and_from_env() -> None:
    assert OpenAIClient.missing_env({}) == ["OPENAI_API_KEY"]
    assert OpenAIClient.missing_env({"OPENAI_API_KEY": "k"}) == []
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIClient.from_env({})
    client = OpenAIClient.from_env({"OPENAI_API_KEY": KEY, "OPENAI_ORGANIZATION": "org-1", "OPENAI_PROJECT": "proj-1"})
    assert client.base_url == "https://api.openai.com/v1"
    assert client.auth_headers() == {"Authorization": f"Bearer {KEY}", "OpenAI-Organization": "org-1",
                                     "OpenAI-Project": "proj-1"}
    assert KEY not in repr(client)
    local = OpenAIClient.from_env({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert local.allow_loopback_http and "OpenAI-Project" not in local.auth_headers()
    with pytest.raises(ValueError, match="refusing http URL"):
        OpenAIClient.from_env({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "http://example.com/v1"})
