"""FireworksClient against the emulator and against a scripted fake server; download safety; job states."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from pipeline.emulator.server import EmulatorServer
from pipeline.naming import make_custom_id
from pipeline.providers import job_states
from pipeline.providers.download import extract_jsonl_bundle, fetch_url
from pipeline.providers.errors import AuthError, NotFound, ProviderError, ProviderUnavailable, RateLimited
from pipeline.providers.fireworks import FireworksClient
from tests.conftest import start_emulator, stop_emulator_server

KEY = "sk-secret-test-key"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    server = start_emulator(tmp_path / "emu", latency_s=0.0)
    yield server
    stop_emulator_server(server)


def _client(base_url: str, **kwargs: Any) -> tuple[FireworksClient, list[float]]:
    sleeps: list[float] = []
    client = FireworksClient(base_url, KEY, "acme", allow_loopback_http=True, sleep=sleeps.append, **kwargs)
    return client, sleeps


Reply = tuple[int, dict[str, str], bytes] | str


class Fake:
    """A scripted HTTP server: per (method, path) a list of replies, the last one repeating.

    A reply is (status, headers, body), "drop" (close without answering) or "short" (body cut before
    Content-Length). Every request is recorded as (method, path, query, headers, body).
    """

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[Reply]] = {}
        self.seen: list[tuple[str, str, str, dict[str, str], bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.seen.append((self.command, parts.path, parts.query, dict(self.headers), body))
                replies = fake.script.get((self.command, parts.path)) or [(404, {}, b'{"code":5,"message":"nf"}')]
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                if reply == "drop":
                    self.close_connection = True
                    return
                if reply == "short":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"0123456789")
                    self.close_connection = True
                    return
                status, headers, payload = reply
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, method: str, path: str, *replies: Reply) -> None:
        self.script[(method, path)] = list(replies)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, *_ in self.seen if (m, p) == (method, path))


def _json(status: int, payload: Any, **headers: str) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(payload).encode()


@pytest.fixture
def fake() -> Iterator[Fake]:
    server = Fake()
    threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield server
    server.server.shutdown()
    server.server.server_close()


JOBS = "/v1/accounts/acme/batchInferenceJobs"
DATASETS = "/v1/accounts/acme/datasets"


def _input_file(path: Path, n: int) -> list[str]:
    ids = [make_custom_id("squad_v2", f"q{i}", "treatment", 0.0, 0, "open") for i in range(n)]
    path.write_text("".join(json.dumps({"custom_id": c, "body": {"messages": [{"role": "user", "content": "Q?"}]}})
                            + "\n" for c in ids))
    return ids


# ---------------------------------------------------------------------------------------------- against the emulator


def test_full_flow_is_idempotent_against_the_emulator(emulator: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emulator.base_url)
    assert client.get_dataset("in-1") is None and client.get_job("job-1") is None
    dataset, created = client.create_dataset("in-1", display_name="part 1", example_count=4)
    assert created and dataset["state"] == "UPLOADING" and dataset["exampleCount"] == "4"
    again, created_again = client.create_dataset("in-1", display_name="part 1", example_count=4)
    assert not created_again and again["name"] == dataset["name"]

    ids = _input_file(tmp_path / "input.jsonl", 4)
    client.upload_dataset_file("in-1", tmp_path / "input.jsonl")
    assert client.wait_dataset_ready("in-1")["state"] == "READY"

    params = {"maxTokens": 32, "temperature": 0.0}
    job, created = client.create_job("job-1", model="accounts/fireworks/models/m", input_dataset_id="in-1",
                                     output_dataset_id="in-1-out", display_name="j", inference_parameters=params)
    assert created and job["inputDatasetId"] == "accounts/acme/datasets/in-1"
    same, created_again = client.create_job("job-1", model="accounts/fireworks/models/m", input_dataset_id="in-1",
                                            output_dataset_id="in-1-out", display_name="j", inference_parameters=params)
    assert not created_again and same["name"] == job["name"]
    assert job_states.classify(client.get_job("job-1")["state"]) == job_states.COMPLETED

    files = client.download_dataset(job["outputDatasetId"], tmp_path / "out")
    assert set(files) == {"BIJOutputSet.jsonl", "error-data"}
    rows = [json.loads(line) for line in files["BIJOutputSet.jsonl"].read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == sorted(ids)
    assert files["error-data"].read_bytes() == b""

    calls = requests.get(f"{emulator.base_url}/emulator/calls").json()
    assert calls["dataset_creates"] == {"in-1": 1} and calls["dataset_create_conflicts"] == {"in-1": 1}
    assert calls["job_creates"] == {"job-1": 1} and calls["job_create_conflicts"] == {"job-1": 1}


def test_large_files_use_the_signed_upload_flow(emulator: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emulator.base_url)
    client.multipart_limit_bytes = 10
    client.create_dataset("big-1", display_name="big", example_count=3)
    _input_file(tmp_path / "input.jsonl", 3)
    client.upload_dataset_file("big-1", tmp_path / "input.jsonl")
    assert client.get_dataset("big-1")["state"] == "READY"


def test_list_jobs_follows_page_tokens_and_404s_are_none(emulator: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emulator.base_url)
    client.create_dataset("in-1", display_name="x", example_count=1)
    _input_file(tmp_path / "input.jsonl", 1)
    client.upload_dataset_file("in-1", tmp_path / "input.jsonl")
    for i in range(5):
        client.create_job(f"job-{i}", model="m", input_dataset_id="in-1", output_dataset_id=f"out-{i}",
                          display_name="", inference_parameters={})
    names = [job["name"] for job in client.list_jobs(page_size=2)]
    assert sorted(names) == [f"accounts/acme/batchInferenceJobs/job-{i}" for i in range(5)]
    client.delete_job("job-0")
    assert client.get_job("job-0") is None
    client.delete_job("job-0")  # already gone: not an error
    with pytest.raises(NotFound):
        client.download_dataset("never-made", tmp_path / "dl")


# ---------------------------------------------------------------------------------------------- against a fake


def test_403_raises_auth_error_without_leaking_the_key(fake: Fake) -> None:
    fake.on("GET", f"{DATASETS}/x", _json(403, {"error": {"message": "The API key you provided is invalid.",
                                                          "code": "UNAUTHORIZED", "type": "error"}}))
    client, sleeps = _client(fake.url)
    with pytest.raises(AuthError) as info:
        client.get_dataset("x")
    assert info.value.code == "UNAUTHORIZED" and f"GET {DATASETS}/x" in str(info.value)
    assert KEY not in str(info.value) and sleeps == []
    assert fake.seen[0][3]["Authorization"] == f"Bearer {KEY}"


def test_429_is_retried_honouring_retry_after(fake: Fake) -> None:
    fake.on("GET", f"{DATASETS}/x", _json(429, {"code": 8, "message": "slow down"}, **{"Retry-After": "7"}),
            _json(429, {"code": 8, "message": "slow down"}, **{"Retry-After": "3"}), _json(200, {"name": "n"}))
    client, sleeps = _client(fake.url)
    assert client.get_dataset("x") == {"name": "n"}
    assert sleeps == [7.0, 3.0] and fake.count("GET", f"{DATASETS}/x") == 3


def test_retries_are_bounded_and_other_4xx_fail_at_once(fake: Fake) -> None:
    fake.on("GET", f"{DATASETS}/busy", _json(503, {"code": 14, "message": "unavailable"}))
    fake.on("GET", f"{DATASETS}/limited", _json(429, {"code": 8, "message": "quota"}))
    fake.on("GET", f"{DATASETS}/bad", _json(400, {"code": 3, "message": "invalid"}))
    client, sleeps = _client(fake.url, max_retries=2)
    with pytest.raises(ProviderUnavailable):
        client.get_dataset("busy")
    assert fake.count("GET", f"{DATASETS}/busy") == 3 and len(sleeps) == 2
    with pytest.raises(RateLimited):
        client.get_dataset("limited")
    sleeps.clear()
    with pytest.raises(ProviderError) as info:
        client.get_dataset("bad")
    assert (info.value.status, info.value.code) == (400, 3) and sleeps == []
    assert fake.count("GET", f"{DATASETS}/bad") == 1


def test_create_job_sends_query_id_and_full_dataset_names(fake: Fake) -> None:
    fake.on("POST", JOBS, _json(200, {"name": "accounts/acme/batchInferenceJobs/j1"}))
    client, _ = _client(fake.url)
    _, created = client.create_job("j1", model="m", input_dataset_id="in", output_dataset_id="out",
                                   display_name="d", inference_parameters={"maxTokens": 5})
    _, _, query, _, body = fake.seen[0]
    assert created and query == "batchInferenceJobId=j1"
    sent = json.loads(body)
    assert sent["inputDatasetId"] == "accounts/acme/datasets/in"
    assert sent["outputDatasetId"] == "accounts/acme/datasets/out"


def test_create_job_409_returns_the_existing_job_without_retrying(fake: Fake) -> None:
    fake.on("POST", JOBS, _json(409, {"code": 6, "message": "already exists", "details": []}))
    fake.on("GET", f"{JOBS}/j1", _json(200, {"name": "accounts/acme/batchInferenceJobs/j1", "state": "X"}))
    client, sleeps = _client(fake.url)
    job, created = client.create_job("j1", model="m", input_dataset_id="in", output_dataset_id="out",
                                     display_name="d", inference_parameters={})
    assert not created and job["state"] == "X"
    assert fake.count("POST", JOBS) == 1 and sleeps == []


def test_create_job_looks_up_the_job_after_a_dropped_connection(fake: Fake) -> None:
    # The create committed but the answer was lost: the client must find the job, not submit it again.
    fake.on("POST", JOBS, "drop", _json(200, {"name": "second create"}))
    fake.on("GET", f"{JOBS}/j1", _json(200, {"name": "accounts/acme/batchInferenceJobs/j1"}))
    client, _ = _client(fake.url)
    job, created = client.create_job("j1", model="m", input_dataset_id="in", output_dataset_id="out",
                                     display_name="d", inference_parameters={})
    assert not created and job["name"] == "accounts/acme/batchInferenceJobs/j1"
    assert fake.count("POST", JOBS) == 1


def test_create_job_retries_after_a_5xx_when_the_job_does_not_exist(fake: Fake) -> None:
    fake.on("POST", JOBS, _json(503, {"code": 14, "message": "unavailable"}), _json(200, {"name": "made"}))
    client, sleeps = _client(fake.url)
    job, created = client.create_job("j1", model="m", input_dataset_id="in", output_dataset_id="out",
                                     display_name="d", inference_parameters={})
    assert created and job == {"name": "made"}
    assert fake.count("POST", JOBS) == 2 and fake.count("GET", f"{JOBS}/j1") == 1 and len(sleeps) == 1


def test_download_uses_signed_urls_without_the_api_key(fake: Fake, tmp_path: Path) -> None:
    fake.on("GET", f"{DATASETS}/out", _json(200, {"name": "accounts/acme/datasets/out", "externalUrl": ""}))
    fake.on("GET", f"{DATASETS}/out:getDownloadEndpoint", _json(200, {"filenameToSignedUrls": {
        "dataset/out/BIJOutputSet.jsonl": f"{fake.url}/files/a?X-Goog-Signature=abc",
        "dataset/out/error-data": f"{fake.url}/files/b"}}))
    fake.on("GET", "/files/a", "short", (200, {}, b'{"custom_id": "x"}\n'))
    fake.on("GET", "/files/b", (200, {}, b""))
    client, sleeps = _client(fake.url)
    files = client.download_dataset("out", tmp_path)
    assert files["BIJOutputSet.jsonl"].read_bytes() == b'{"custom_id": "x"}\n'
    assert files["error-data"].read_bytes() == b""
    assert fake.count("GET", f"{DATASETS}/out:getDownloadEndpoint") == 2, "fresh URLs after the cut download"
    assert len(sleeps) == 1
    for _, path, _, headers, _ in fake.seen:
        assert ("Authorization" in headers) == path.startswith("/v1/"), path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BIJOutputSet.jsonl", "error-data"]


def test_download_prefers_external_url_and_refuses_unsafe_schemes(fake: Fake, tmp_path: Path) -> None:
    fake.on("GET", f"{DATASETS}/ext", _json(200, {"externalUrl": f"{fake.url}/bucket/results.jsonl"}))
    fake.on("GET", "/bucket/results.jsonl", (200, {}, b"{}\n"))
    fake.on("GET", f"{DATASETS}/local", _json(200, {"externalUrl": "file:///etc/passwd"}))
    client, _ = _client(fake.url)
    assert client.download_dataset("ext", tmp_path)["results.jsonl"].read_bytes() == b"{}\n"
    with pytest.raises(ValueError, match="file://"):
        client.download_dataset("local", tmp_path)
    assert fake.count("GET", f"{DATASETS}/ext:getDownloadEndpoint") == 0


def test_from_env_names_the_missing_variable() -> None:
    with pytest.raises(ValueError, match="FIREWORKS_ACCOUNT_ID"):
        FireworksClient.from_env({"FIREWORKS_API_KEY": "k"})
    with pytest.raises(ValueError, match="FIREWORKS_API_KEY"):
        FireworksClient.from_env({"FIREWORKS_ACCOUNT_ID": "a"})
    real = FireworksClient.from_env({"FIREWORKS_API_KEY": "k", "FIREWORKS_ACCOUNT_ID": "a"})
    assert real.base_url == "https://api.fireworks.ai" and not real.allow_loopback_http
    local = FireworksClient.from_env({"FIREWORKS_API_KEY": "k", "FIREWORKS_ACCOUNT_ID": "a",
                                      "FIREWORKS_BASE_URL": "http://127.0.0.1:9"})
    assert local.allow_loopback_http
    with pytest.raises(ValueError, match="http"):
        FireworksClient("http://api.example.com", "k", "a", allow_loopback_http=True)


# ---------------------------------------------------------------------------------------------- fetch_url


def _fetch(url: str, dest: Path, *, loopback: bool = True, max_bytes: int = 1000) -> int:
    return fetch_url(url, dest, max_bytes=max_bytes, timeout=(2.0, 5.0), allow_loopback_http=loopback)


def test_fetch_url_refuses_unsafe_urls(fake: Fake, tmp_path: Path) -> None:
    dest = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="file://"):
        _fetch("file:///etc/passwd", dest)
    with pytest.raises(ValueError, match="http"):
        _fetch("http://example.com/results.jsonl", dest)
    with pytest.raises(ValueError, match="loopback"):
        _fetch(f"{fake.url}/f", dest, loopback=False)
    fake.on("GET", "/redirect", (302, {"Location": "file:///etc/passwd"}, b""))
    with pytest.raises(ValueError, match="file://"):
        _fetch(f"{fake.url}/redirect", dest)
    assert not dest.exists()


def test_fetch_url_limits_size_and_detects_truncation(fake: Fake, tmp_path: Path) -> None:
    fake.on("GET", "/big", (200, {}, b"x" * 2000))
    fake.on("GET", "/cut", "short")
    fake.on("GET", "/ok", (200, {}, b"hello\n"))
    dest = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="limit"):
        _fetch(f"{fake.url}/big", dest)
    with pytest.raises(ProviderUnavailable):
        _fetch(f"{fake.url}/cut", dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    assert _fetch(f"{fake.url}/ok", dest) == 6 and dest.read_bytes() == b"hello\n"


# ---------------------------------------------------------------------------------------------- bundles


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_bundles_with_escaping_members_are_rejected(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("ok.jsonl", "{}\n")
        zf.writestr("../evil.jsonl", "{}\n")
    with pytest.raises(ValueError, match=r"\.\."):
        extract_jsonl_bundle(tmp_path / "evil.zip", out)
    _tar(tmp_path / "evil.tar", {"ok.jsonl": b"{}\n", "a/../../evil.jsonl": b"{}\n"})
    with pytest.raises(ValueError, match=r"\.\."):
        extract_jsonl_bundle(tmp_path / "evil.tar", out)
    _tar(tmp_path / "abs.tar.gz", {"/tmp/evil.jsonl": b"{}\n"}, mode="w:gz")
    with pytest.raises(ValueError, match="absolute"):
        extract_jsonl_bundle(tmp_path / "abs.tar.gz", out)
    with tarfile.open(tmp_path / "link.tar", "w") as tf:
        link = tarfile.TarInfo("results.jsonl")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(ValueError, match="link"):
        extract_jsonl_bundle(tmp_path / "link.tar", out)
    assert not (tmp_path / "evil.jsonl").exists() and not any(out.rglob("*.jsonl"))


@pytest.mark.parametrize(("kind", "name", "needle"), [
    (kind, name, needle) for kind in ("zip", "tar", "tar.gz")
    for name, needle in (("/".join(["a"] * 9) + "/r.jsonl", "folders deep"), ("x" * 256 + ".jsonl", "longer than"),
                         ("a/" + "y" * 3000, "longer than"))])
def test_bundle_members_too_deep_or_too_long_are_refused(tmp_path: Path, kind: str, name: str, needle: str) -> None:
    bundle = tmp_path / f"deep.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(bundle, "w") as zf:
            zf.writestr(name, "{}\n")
    else:
        _tar(bundle, {name: b"{}\n"}, mode="w:gz" if kind == "tar.gz" else "w")
    with pytest.raises(ValueError, match=needle):
        extract_jsonl_bundle(bundle, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*"))


def test_bundle_limits(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zf:
        for i in range(5):
            zf.writestr(f"p{i}.jsonl", "{}\n")
    with pytest.raises(ValueError, match="members"):
        extract_jsonl_bundle(tmp_path / "many.zip", tmp_path / "out", max_members=4)
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(b"x" * 5000))
    with pytest.raises(ValueError, match="exceeds"):
        extract_jsonl_bundle(tmp_path / "big.jsonl.gz", tmp_path / "out", max_total_bytes=1000)
    assert not (tmp_path / "out" / "big.jsonl").exists()


def test_bundles_extract_and_plain_jsonl_is_kept_intact(tmp_path: Path) -> None:
    plain = tmp_path / "BIJOutputSet.jsonl"
    plain.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b"}\n')
    assert extract_jsonl_bundle(plain, tmp_path) == [plain]
    assert plain.read_bytes() == b'{"custom_id": "a"}\n{"custom_id": "b"}\n'

    _tar(tmp_path / "r.tar.gz", {"dataset/x/BIJOutputSet.jsonl": b"{}\n", "dataset/x/error-data": b""}, mode="w:gz")
    paths = extract_jsonl_bundle(tmp_path / "r.tar.gz", tmp_path / "t")
    assert paths == [tmp_path / "t/dataset/x/BIJOutputSet.jsonl", tmp_path / "t/dataset/x/error-data"]
    assert paths[0].read_bytes() == b"{}\n"
    with zipfile.ZipFile(tmp_path / "r.zip", "w") as zf:
        zf.writestr("sub/a.jsonl", "{}\n")
    assert extract_jsonl_bundle(tmp_path / "r.zip", tmp_path / "z") == [tmp_path / "z/sub/a.jsonl"]
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(b"{}\n"))
    assert [p.read_bytes() for p in extract_jsonl_bundle(tmp_path / "r.jsonl.gz", tmp_path / "g")] == [b"{}\n"]


# ---------------------------------------------------------------------------------------------- job states


@pytest.mark.parametrize(("state", "expected"), [
    ("JOB_STATE_COMPLETED", "completed"), ("completed", "completed"), ("JOB_STATE_FAILED", "failed"),
    ("JOB_STATE_EXPIRED", "expired"), ("JOB_STATE_EARLY_STOPPED", "expired"), ("job_state_cancelled", "cancelled"),
    ("JOB_STATE_CANCELLING", "cancelled"), ("DELETING", "cancelled"), ("JOB_STATE_DELETING_CLEANING_UP", "cancelled"),
    ("JOB_STATE_RUNNING", "in_progress"), ("JOB_STATE_PENDING", "in_progress"),
    ("JOB_STATE_SOMETHING_NEW", "in_progress"), ("", "in_progress"),
])
def test_classify_job_states(state: str, expected: str) -> None:
    assert job_states.classify(state) == expected
    assert (expected in job_states.TERMINAL) == (expected != "in_progress")


def test_reconcile_by_display_name_finds_a_job_whose_id_the_provider_chose(emulator: EmulatorServer,
                                                                         tmp_path: Path) -> None:
    from pipeline.providers.fireworks import FireworksBackend

    base = f"http://127.0.0.1:{emulator.server_address[1]}"
    client, _ = _client(base)
    find_by_display_name = FireworksBackend(client, poll_s=0.01).find_by_display_name
    path = tmp_path / "in.jsonl"
    _input_file(path, 2)
    client.create_dataset("ds-a", display_name="a", example_count=2)
    client.upload_dataset_file("ds-a", path)
    body = {"model": "accounts/fireworks/models/m", "inputDatasetId": "accounts/acme/datasets/ds-a",
            "displayName": "excellence-t0-control-r-p01"}
    answer = requests.post(base + JOBS, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert answer.status_code == 200
    found = find_by_display_name("excellence-t0-control-r-p01", "ds-a")
    assert found is not None and found["name"] == answer.json()["name"]
    assert find_by_display_name("excellence-t0-control-r-p01", "ds-other") is None
    assert find_by_display_name("other-name", "ds-a") is None
