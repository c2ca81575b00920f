"""The Fireworks emulator over raw HTTP: wire format, validation, job progression, persistence, process helper."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from pipeline.emulator.process import ensure_emulator, stop_emulator
from pipeline.emulator.server import EmulatorServer, make_server
from pipeline.naming import make_custom_id
from tests.conftest import Clock, start_emulator, stop_emulator_server

AUTH = {"Authorization": "Bearer test-key"}
ACCT = "/v1/accounts/acme"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(tmp_path: Path, clock: Clock) -> Iterator[EmulatorServer]:
    server = start_emulator(tmp_path / "state", latency_s=8.0, clock=clock, answer_key=_answer_key(tmp_path / "key"))
    yield server
    stop_emulator_server(server)


def _answer_key(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"dataset": "squad_v2", "id": f"q{i}", "context": "Paris is the capital of France.",
             "question": "What is the capital of France?", "answers": ["Paris"], "is_unanswerable": False}
            for i in range(5)]
    (directory / "open_book.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "closed_book.jsonl").write_text("")
    return directory


def _lines(n: int, role: str = "user") -> bytes:
    rows = [{"custom_id": make_custom_id("squad_v2", f"q{i}", "control", 0.0, 0, "open"),
             "body": {"messages": [{"role": role, "content": "What is the capital of France?"}], "max_tokens": 20}}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _create_ready_dataset(base: str, dataset_id: str, data: bytes, declared: int) -> None:
    body = {"datasetId": dataset_id, "dataset": {"userUploaded": {}, "exampleCount": str(declared), "format": "CHAT"}}
    assert requests.post(f"{base}{ACCT}/datasets", json=body, headers=AUTH).status_code == 200
    resp = requests.post(f"{base}{ACCT}/datasets/{dataset_id}:upload", headers=AUTH,
                         files={"file": ("input.jsonl", data, "application/octet-stream")})
    assert resp.status_code == 200, resp.text
    assert resp.json()["bytes"] == len(data)


def _create_job(base: str, job_id: str, **extra: object) -> requests.Response:
    body = {"model": "accounts/fireworks/models/llama-v3p1-8b-instruct",
            "inputDatasetId": "accounts/acme/datasets/in-1", **extra}
    return requests.post(f"{base}{ACCT}/batchInferenceJobs", params={"batchInferenceJobId": job_id}, json=body,
                         headers=AUTH)


def _download(base: str, dataset_id: str) -> dict[str, bytes]:
    resp = requests.get(f"{base}{ACCT}/datasets/{dataset_id}:getDownloadEndpoint", headers=AUTH)
    assert resp.status_code == 200, resp.text
    return {key: requests.get(url).content for key, url in resp.json()["filenameToSignedUrls"].items()}


def test_healthz_and_auth(emu: EmulatorServer) -> None:
    assert requests.get(f"{emu.base_url}/healthz").json()["ok"] is True
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}):
        resp = requests.get(f"{emu.base_url}{ACCT}/datasets", headers=headers)
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "UNAUTHORIZED"
    assert requests.get(f"{emu.base_url}{ACCT}/datasets", headers={"Authorization": "Bearer any"}).status_code == 200


def test_dataset_create_validation_and_errors(emu: EmulatorServer) -> None:
    url = f"{emu.base_url}{ACCT}/datasets"

    def post(body: dict) -> requests.Response:
        return requests.post(url, json=body, headers=AUTH)

    bad_id = post({"datasetId": "Bad_Id", "dataset": {"exampleCount": "1"}})
    assert (bad_id.status_code, bad_id.json()["code"]) == (400, 3)
    missing = post({"datasetId": "ds-a", "dataset": {"displayName": "x", "userUploaded": {}}})
    assert missing.status_code == 400 and missing.json()["message"] == "example_count is required for uploaded datasets"
    unknown = post({"datasetId": "ds-a", "dataset": {"exampleCount": "1"}, "x": 1})
    assert unknown.status_code == 400 and 'unknown field "x"' in unknown.json()["message"]
    flat = post({"datasetId": "ds-a", "exampleCount": "1"})
    assert flat.status_code == 400 and 'unknown field "exampleCount"' in flat.json()["message"]

    created = post({"dataset_id": "ds-a", "dataset": {"display_name": "A", "example_count": 3, "user_uploaded": {}}})
    assert created.status_code == 200, created.text
    dataset = created.json()
    assert dataset["name"] == "accounts/acme/datasets/ds-a" and dataset["displayName"] == "A"
    assert dataset["exampleCount"] == "3" and dataset["state"] == "UPLOADING"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", dataset["createTime"])

    again = post({"datasetId": "ds-a", "dataset": {"exampleCount": "3"}})
    assert again.status_code == 409 and again.json()["code"] == 6 and again.json()["details"] == []
    gone = requests.get(f"{url}/nope", headers=AUTH)
    assert gone.status_code == 404 and gone.json() == {"code": 5, "message": "resource not found", "details": []}


def test_signed_upload_flow_checks_headers(emu: EmulatorServer) -> None:
    base = emu.base_url
    requests.post(f"{base}{ACCT}/datasets", json={"datasetId": "big", "dataset": {"exampleCount": "2"}},
                  headers=AUTH)
    data = _lines(2)
    resp = requests.post(f"{base}{ACCT}/datasets/big:getUploadEndpoint", headers=AUTH,
                         json={"filenameToSize": {"input.jsonl": str(len(data))}})
    signed = resp.json()["filenameToSignedUrls"]["input.jsonl"]
    early = requests.post(f"{base}{ACCT}/datasets/big:validateUpload", json={}, headers=AUTH)
    assert (early.status_code, early.json()["code"]) == (400, 9)
    wrong_type = requests.put(signed, data=data, headers={"Content-Type": "text/plain",
                                                          "x-goog-content-length-range": f"{len(data)},{len(data)}"})
    assert wrong_type.status_code == 400
    no_range = requests.put(signed, data=data, headers={"Content-Type": "application/octet-stream"})
    assert no_range.status_code == 400
    ok = requests.put(signed, data=data, headers={"Content-Type": "application/octet-stream",
                                                  "x-goog-content-length-range": f"{len(data)},{len(data)}"})
    assert ok.status_code == 200
    assert requests.post(f"{base}{ACCT}/datasets/big:validateUpload", json={}, headers=AUTH).json() == {}
    assert requests.get(f"{base}{ACCT}/datasets/big", headers=AUTH).json()["state"] == "READY"


def test_job_progresses_with_time_and_writes_shuffled_results(emu: EmulatorServer, clock: Clock) -> None:
    base = emu.base_url
    data = _lines(5)
    _create_ready_dataset(base, "in-1", data, declared=2)
    not_ready = requests.post(f"{base}{ACCT}/datasets", json={"datasetId": "in-2", "dataset": {"exampleCount": "1"}},
                              headers=AUTH)
    assert not_ready.status_code == 200
    refused = _create_job(base, "job-b", inputDatasetId="accounts/acme/datasets/in-2")
    assert (refused.status_code, refused.json()["code"]) == (400, 9)
    assert _create_job(base, "job-c", model="").status_code == 400
    assert _create_job(base, "job-c", inferenceParameters={"max_tokens": 5, "bogus": 1}).status_code == 400

    created = _create_job(base, "job-a", outputDatasetId="accounts/acme/datasets/out-a",
                          inferenceParameters={"max_tokens": 64, "temperature": 0.0})
    assert created.status_code == 200, created.text
    assert created.json()["state"] == "JOB_STATE_VALIDATING"
    assert created.json()["inferenceParameters"] == {"maxTokens": 64, "temperature": 0.0}
    assert _create_job(base, "job-a").json()["code"] == 6

    states = []
    for _ in range(4):
        job = requests.get(f"{base}{ACCT}/batchInferenceJobs/job-a", headers=AUTH).json()
        states.append(job["state"])
        clock.advance(3)
    assert states == ["JOB_STATE_VALIDATING", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_COMPLETED"]
    assert job["jobProgress"]["totalInputRequests"] == 2  # echoes the declared exampleCount, like the real service
    assert job["jobProgress"]["outputRows"] == 5 and job["jobProgress"]["failedRequests"] == 0
    assert set(job["lifecycle"]) == {"validatedTime", "runStartTime", "endTime"}

    output = requests.get(f"{base}{ACCT}/datasets/out-a", headers=AUTH).json()
    assert output["state"] == "READY" and output["sourceJobName"] == "accounts/acme/batchInferenceJobs/job-a"
    assert requests.post(f"{base}{ACCT}/datasets/out-a:getDownloadEndpoint", headers=AUTH).status_code == 405
    with_body = requests.get(f"{base}{ACCT}/datasets/out-a:getDownloadEndpoint", data="{}", headers=AUTH)
    assert with_body.status_code == 400
    files = _download(base, "out-a")
    assert set(files) == {"dataset/out-a/BIJOutputSet.jsonl", "dataset/out-a/error-data"}
    assert files["dataset/out-a/error-data"] == b""
    rows = [json.loads(line) for line in files["dataset/out-a/BIJOutputSet.jsonl"].splitlines()]
    inputs = [json.loads(line)["custom_id"] for line in data.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(inputs)
    assert [r["custom_id"] for r in rows] != inputs, "rows must come back shuffled"
    response = rows[0]["response"]
    assert response["object"] == "chat.completion" and response["choices"][0]["finish_reason"] == "stop"
    assert set(response["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert _download(base, "out-a") == files, "the result is computed once and stays the same"


def test_signed_download_urls_expire(emu: EmulatorServer, clock: Clock) -> None:
    _create_ready_dataset(emu.base_url, "in-1", _lines(1), declared=1)
    resp = requests.get(f"{emu.base_url}{ACCT}/datasets/in-1:getDownloadEndpoint", headers=AUTH)
    url = resp.json()["filenameToSignedUrls"]["dataset/in-1/input.jsonl"]
    assert requests.get(url).content == _lines(1)
    assert requests.get(url.replace("/signed/", "/signed/1")).status_code == 403
    clock.advance(601)
    assert requests.get(url).status_code == 403


def test_invalid_row_fails_the_job_without_output(emu: EmulatorServer, clock: Clock) -> None:
    _create_ready_dataset(emu.base_url, "in-1", _lines(2, role="bananas"), declared=2)
    job = _create_job(emu.base_url, "job-bad").json()
    assert job["outputDatasetId"].startswith("accounts/acme/datasets/bij-")
    clock.advance(10)
    job = requests.get(f"{emu.base_url}{ACCT}/batchInferenceJobs/job-bad", headers=AUTH).json()
    assert job["state"] == "JOB_STATE_FAILED" and "invalid role bananas" in job["status"]["message"]
    out_id = job["outputDatasetId"].rsplit("/", 1)[-1]
    assert requests.get(f"{emu.base_url}{ACCT}/datasets/{out_id}:getDownloadEndpoint",
                        headers=AUTH).status_code == 404


def test_pagination_and_delete(emu: EmulatorServer) -> None:
    base = emu.base_url
    for i in range(5):
        requests.post(f"{base}{ACCT}/datasets", json={"datasetId": f"d{i}", "dataset": {"exampleCount": "1"}},
                      headers=AUTH)
    names, token, pages = [], "", 0
    while True:
        page = requests.get(f"{base}{ACCT}/datasets", params={"pageSize": 2, "pageToken": token}, headers=AUTH).json()
        assert page["totalSize"] == 5
        names += [d["name"] for d in page["datasets"]]
        pages += 1
        token = page["nextPageToken"]
        if not token:
            break
    assert pages == 3 and names == [f"accounts/acme/datasets/d{i}" for i in range(5)]
    assert requests.delete(f"{base}{ACCT}/datasets/d0", headers=AUTH).json() == {}
    assert requests.get(f"{base}{ACCT}/datasets/d0", headers=AUTH).status_code == 404


def test_state_survives_restart_and_calls_are_counted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = start_emulator(state, latency_s=0.0)
    _create_ready_dataset(first.base_url, "in-1", _lines(3), declared=3)
    assert _create_job(first.base_url, "job-r", outputDatasetId="accounts/acme/datasets/out-r").status_code == 200
    assert _create_job(first.base_url, "job-r").status_code == 409
    stop_emulator_server(first)

    second = start_emulator(state, latency_s=0.0)
    try:
        base = second.base_url
        job = requests.get(f"{base}{ACCT}/batchInferenceJobs/job-r", headers=AUTH).json()
        assert job["state"] == "JOB_STATE_COMPLETED"
        rows = _download(base, "out-r")["dataset/out-r/BIJOutputSet.jsonl"].splitlines()
        assert len(rows) == 3
        calls = requests.get(f"{base}/emulator/calls").json()
        assert calls["dataset_creates"] == {"in-1": 1} and calls["uploads"] == {"in-1": 1}
        assert calls["job_creates"] == {"job-r": 1} and calls["job_create_conflicts"] == {"job-r": 1}
        assert requests.post(f"{base}/emulator/reset-calls").status_code == 200
        assert requests.get(f"{base}/emulator/calls").json()["job_creates"] == {}
    finally:
        stop_emulator_server(second)


def test_ensure_emulator_reuses_one_server_and_stop_stops_it(tmp_path: Path) -> None:
    state = tmp_path / "emu"
    with ThreadPoolExecutor(max_workers=3) as pool:
        urls = list(pool.map(lambda _: ensure_emulator(state, answer_key=None, latency_s=0.0, idle_exit_s=60),
                             range(3)))
    try:
        assert len(set(urls)) == 1
        assert ensure_emulator(state, answer_key=None) == urls[0]
        assert requests.get(f"{urls[0]}/healthz", timeout=5).json()["ok"] is True
        info = json.loads((state / "server.json").read_text())
        assert info["base_url"] == urls[0] and info["port"] > 0
    finally:
        assert stop_emulator(state) is True
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{urls[0]}/healthz", timeout=5)
    assert stop_emulator(state) is False


def test_idle_exit_stops_serving(tmp_path: Path) -> None:
    server = make_server("127.0.0.1", 0, tmp_path / "state", idle_exit_s=0.1)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    assert requests.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
    thread.join(timeout=10)
    server.server_close()
    assert not thread.is_alive()
