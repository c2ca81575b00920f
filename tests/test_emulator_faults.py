"""Fault injection in the Fireworks emulator, observed through raw HTTP and the real FireworksClient."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.emulator.faults import load_plan_arg, pick
from pipeline.emulator.server import EmulatorServer, main
from pipeline.naming import make_custom_id
from pipeline.providers.download import extract_jsonl_bundle
from pipeline.providers.errors import NotFound, ProviderUnavailable
from pipeline.providers.fireworks import FireworksClient
from tests.conftest import Clock, start_emulator, stop_emulator_server

REPO = Path(__file__).resolve().parent.parent
ACCT = "/v1/accounts/acme"
AUTH = {"Authorization": "Bearer k"}
MODEL = "accounts/fireworks/models/m"


def _client(base_url: str, **kwargs: Any) -> tuple[FireworksClient, list[float]]:
    sleeps: list[float] = []
    return FireworksClient(base_url, "k", "acme", allow_loopback_http=True, sleep=sleeps.append, **kwargs), sleeps


def _plan(emu: EmulatorServer, *rules: dict[str, Any]) -> dict[str, Any]:
    resp = requests.post(f"{emu.base_url}/emulator/faults", json={"rules": list(rules)})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _faults(emu: EmulatorServer) -> list[dict[str, Any]]:
    return requests.get(f"{emu.base_url}/emulator/faults").json()["rules"]


def _calls(emu: EmulatorServer) -> dict[str, dict[str, int]]:
    return requests.get(f"{emu.base_url}/emulator/calls").json()


def _input(client: FireworksClient, tmp_path: Path, name: str, n: int) -> list[str]:
    """A READY input dataset `<name>-in` of n requests; their custom_ids."""
    ids = [make_custom_id("squad_v2", f"{name}{i}", "control", 0.0, 0, "open") for i in range(n)]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"custom_id": c, "body": {"messages": [{"role": "user", "content": "Q?"}]}})
                            + "\n" for c in ids))
    client.create_dataset(f"{name}-in", display_name=name, example_count=n)
    client.upload_dataset_file(f"{name}-in", path)
    return ids


def _job(client: FireworksClient, name: str) -> tuple[dict[str, Any], bool]:
    return client.create_job(name, model=MODEL, input_dataset_id=f"{name}-in", output_dataset_id=f"{name}-out",
                             display_name=name, inference_parameters={"maxTokens": 8})


def _finished(client: FireworksClient, tmp_path: Path, name: str, n: int = 10) -> tuple[list[str], dict[str, Any]]:
    """Input ids and the finished job (the emulator runs with latency 0)."""
    ids = _input(client, tmp_path, name, n)
    _job(client, name)
    job = client.get_job(name)
    assert job is not None
    return ids, job


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- the plan


def test_plan_is_validated_normalised_and_cleared(emu: EmulatorServer) -> None:
    url = f"{emu.base_url}/emulator/faults"
    for bad in ({"rules": [{"fault": "meteor"}]}, {"rules": [{"fault": "drop", "bogus": 1}]},
                {"rules": [{"fault": "drop", "match": "("}]}, {"rules": [{"fault": "job_state"}]},
                {"rules": [{"fault": "garbage", "method": "GET"}]}, {"rules": [{"fault": "drop", "times": -1}]},
                {"rules": {}}, [1]):
        resp = requests.post(url, json=bad)
        assert resp.status_code == 400 and resp.json()["code"] == 3, (bad, resp.text)
    view = _plan(emu, {"fault": "status", "method": "post"}, {"fault": "zip_bomb", "times": 0},
                 {"fault": "output_deleted", "times": 3})
    assert view["rules"][0] == {"fault": "status", "match": ".*", "method": "POST", "times": 1, "after": 0,
                                "status": 503, "retry_after": None, "message": "injected fault", "code": None,
                                "seen": 0, "fired": 0}
    assert view["rules"][1]["bytes"] == 1024**3 and view["rules"][1]["times"] == 0
    assert view["rules"][2]["times"] == 0, "output_deleted ignores times"
    assert requests.get(url).json() == view
    assert requests.post(url, json={"rules": [{"fault": "nope"}]}).status_code == 400
    assert requests.get(url).json() == view, "a refused plan leaves the current one"
    assert requests.delete(url).json() == {"rules": []} and requests.get(url).json() == {"rules": []}


def test_inspection_routes_are_never_faulted(emu: EmulatorServer) -> None:
    _plan(emu, {"fault": "drop", "times": 0})
    assert requests.get(f"{emu.base_url}/healthz").json()["ok"] is True
    assert requests.get(f"{emu.base_url}/emulator/calls").status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{emu.base_url}{ACCT}/datasets", headers=AUTH)
    assert _faults(emu)[0]["fired"] == 1


# ---------------------------------------------------------------------------------------------- HTTP faults


def test_status_fault_with_retry_after_is_retried_by_the_client(emu: EmulatorServer) -> None:
    client, sleeps = _client(emu.base_url)
    client.create_dataset("d1", display_name="d", example_count=1)
    _plan(emu, {"fault": "status", "status": 429, "retry_after": 2, "match": "/datasets/d1$", "method": "GET",
                "times": 2, "after": 1})
    assert client.get_dataset("d1") is not None and sleeps == [], "after: 1 lets the first request through"
    assert client.get_dataset("d1")["name"] == "accounts/acme/datasets/d1"
    assert sleeps == [2.0, 2.0]
    assert _faults(emu)[0]["seen"] == 3 and _faults(emu)[0]["fired"] == 2
    assert _calls(emu)["faults_fired"] == {"status": 2}

    _plan(emu, {"fault": "status", "match": "/datasets/d1$"})
    resp = requests.get(f"{emu.base_url}{ACCT}/datasets/d1", headers=AUTH)
    assert resp.status_code == 503 and "Retry-After" not in resp.headers
    assert resp.json() == {"code": 14, "message": "injected fault", "details": []}


def test_drop_is_not_processed_and_the_client_retries(emu: EmulatorServer) -> None:
    client, sleeps = _client(emu.base_url)
    _plan(emu, {"fault": "drop", "match": "/datasets$", "method": "POST"})
    dataset, created = client.create_dataset("d1", display_name="d", example_count=1)
    assert created and dataset["state"] == "UPLOADING" and len(sleeps) == 1
    assert _calls(emu)["dataset_creates"] == {"d1": 1}


def test_drop_after_commit_creates_exactly_once(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    _plan(emu, {"fault": "drop_after_commit", "match": "/datasets$", "method": "POST"},
          {"fault": "drop_after_commit", "match": "/batchInferenceJobs$", "method": "POST"})
    _input(client, tmp_path, "j1", 2)
    job, created = _job(client, "j1")
    assert not created and job["name"] == "accounts/acme/batchInferenceJobs/j1"
    calls = _calls(emu)
    assert calls["dataset_creates"] == {"j1-in": 1} and calls["job_creates"] == {"j1": 1}
    assert calls["job_create_conflicts"] == {} and calls["faults_fired"] == {"drop_after_commit": 2}


def test_delay_makes_the_client_time_out_then_succeed(emu: EmulatorServer) -> None:
    client, sleeps = _client(emu.base_url, timeout=(2.0, 0.1))
    client.create_dataset("d1", display_name="d", example_count=1)
    _plan(emu, {"fault": "delay", "seconds": 0.3, "match": "/datasets/d1$"})
    assert client.get_dataset("d1") is not None and len(sleeps) == 1


def test_delay_is_interrupted_by_shutdown(tmp_path: Path) -> None:
    server = start_emulator(tmp_path / "state", faults={"rules": [{"fault": "delay", "seconds": 60, "match": "/datasets"}]})
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            requests.get(f"{server.base_url}{ACCT}/datasets", headers=AUTH, timeout=30)
        except requests.RequestException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while _faults(server)[0]["fired"] == 0:  # the request is now waiting inside the server
        assert time.monotonic() < deadline
    started = time.monotonic()
    stop_emulator_server(server)
    thread.join(timeout=10)
    assert not thread.is_alive() and time.monotonic() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], requests.ConnectionError)


def test_http_faults_apply_to_signed_file_routes(emu: EmulatorServer, tmp_path: Path) -> None:
    client, sleeps = _client(emu.base_url)
    ids, _ = _finished(client, tmp_path, "j1", n=3)
    _plan(emu, {"fault": "status", "status": 503, "match": "^/signed/.*BIJOutputSet"})
    files = client.download_dataset("j1-out", tmp_path / "dl")
    assert sorted(r["custom_id"] for r in _rows(files["BIJOutputSet.jsonl"])) == sorted(ids)
    assert len(sleeps) == 1
    assert _calls(emu)["downloads"] == {"j1-out": 2}, "the refused GET was not served"


# ---------------------------------------------------------------------------------------------- job faults


def test_failed_and_cancelled_jobs_have_no_output(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    _plan(emu, {"fault": "job_state", "state": "JOB_STATE_FAILED", "match": "^bad", "message": "boom"},
          {"fault": "job_state", "state": "JOB_STATE_CANCELLED", "match": "^gone"})
    _, failed = _finished(client, tmp_path, "bad1")
    assert failed["state"] == "JOB_STATE_FAILED" and failed["status"] == {"code": "INVALID_ARGUMENT", "message": "boom"}
    _, cancelled = _finished(client, tmp_path, "gone1")
    assert cancelled["state"] == "JOB_STATE_CANCELLED" and cancelled["status"]["code"] == "CANCELLED"
    _, fine = _finished(client, tmp_path, "bad2")
    assert fine["state"] == "JOB_STATE_COMPLETED", "times: 1 spent on bad1"
    for out in ("bad1-out", "gone1-out"):
        resp = requests.get(f"{emu.base_url}{ACCT}/datasets/{out}:getDownloadEndpoint", headers=AUTH)
        assert resp.status_code == 404
        with pytest.raises(NotFound):
            client.download_dataset(out, tmp_path / "dl")
    assert _calls(emu)["faults_fired"] == {"job_state": 2}


@pytest.mark.parametrize(("state", "partial", "kept"), [("JOB_STATE_EXPIRED", 0.5, 5), ("JOB_STATE_EARLY_STOPPED", 0.3, 3)])
def test_expired_and_early_stopped_jobs_keep_a_predictable_part(emu: EmulatorServer, tmp_path: Path, state: str,
                                                                 partial: float, kept: int) -> None:
    client, _ = _client(emu.base_url)
    _plan(emu, {"fault": "job_state", "state": state, "partial": partial})
    ids, job = _finished(client, tmp_path, "j1")
    assert job["state"] == state
    progress = job["jobProgress"]
    assert (progress["successfullyProcessedRequests"], progress["failedRequests"], progress["outputRows"]) == (
        kept, 10 - kept, kept)
    rows = _rows(client.download_dataset("j1-out", tmp_path / "dl")["BIJOutputSet.jsonl"])
    assert {r["custom_id"] for r in rows} == pick(ids, partial, "j1", 0)


def test_job_latency_and_stuck_jobs(tmp_path: Path) -> None:
    clock = Clock()
    server = start_emulator(tmp_path / "state", latency_s=0.0, clock=clock,
                    faults={"rules": [{"fault": "job_latency", "seconds": 100, "match": "^slow"},
                                      {"fault": "job_latency", "stuck": True, "match": "^stuck"}]})
    try:
        client, _ = _client(server.base_url)
        for name in ("slow", "stuck", "quick"):
            _input(client, tmp_path, name, 2)
            _job(client, name)
        assert client.get_job("quick")["state"] == "JOB_STATE_COMPLETED"
        clock.advance(60)
        assert client.get_job("slow")["state"] == "JOB_STATE_RUNNING"
        clock.advance(41)
        assert client.get_job("slow")["state"] == "JOB_STATE_COMPLETED"
        clock.advance(10**6)
        stuck = client.get_job("stuck")
        assert stuck["state"] == "JOB_STATE_PENDING" and set(stuck["lifecycle"]) == {"validatedTime"}
        client.delete_job("stuck")
        assert client.get_job("stuck") is None
    finally:
        stop_emulator_server(server)


# ---------------------------------------------------------------------------------------------- output faults


def test_output_deleted_is_gone_for_good(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    _, job = _finished(client, tmp_path, "j1")
    assert job["state"] == "JOB_STATE_COMPLETED"
    _plan(emu, {"fault": "output_deleted", "match": "^j1-out$"}, {"fault": "output_deleted", "match": "-in$"})
    assert client.get_dataset("j1-out") is None
    assert client.get_dataset("j1-in") is not None, "only output datasets are affected"
    requests.delete(f"{emu.base_url}/emulator/faults")
    assert client.get_dataset("j1-out") is None
    resp = requests.get(f"{emu.base_url}{ACCT}/datasets/j1-out:getDownloadEndpoint", headers=AUTH)
    assert resp.status_code == 404
    assert _calls(emu)["faults_fired"] == {"output_deleted": 1}


def test_truncated_cut_connection_is_retried_by_the_client(emu: EmulatorServer, tmp_path: Path) -> None:
    client, sleeps = _client(emu.base_url, max_retries=2)
    ids, _ = _finished(client, tmp_path, "j1")
    _plan(emu, {"fault": "truncated"})
    files = client.download_dataset("j1-out", tmp_path / "dl")
    assert sorted(r["custom_id"] for r in _rows(files["BIJOutputSet.jsonl"])) == sorted(ids)
    assert len(sleeps) == 1 and _calls(emu)["downloads"] == {"j1-out": 3}

    _plan(emu, {"fault": "truncated", "times": 0})
    with pytest.raises(ProviderUnavailable, match="body cut"):
        client.download_dataset("j1-out", tmp_path / "dl2")
    assert not (tmp_path / "dl2" / "BIJOutputSet.jsonl").exists()


def test_truncated_short_body_yields_a_cut_file(emu: EmulatorServer, tmp_path: Path) -> None:
    client, sleeps = _client(emu.base_url)
    _finished(client, tmp_path, "j1")
    whole = client.download_dataset("j1-out", tmp_path / "good")["BIJOutputSet.jsonl"].read_bytes()
    _plan(emu, {"fault": "truncated", "mode": "short_body"})
    cut = client.download_dataset("j1-out", tmp_path / "cut")["BIJOutputSet.jsonl"].read_bytes()
    assert sleeps == [] and whole.startswith(cut) and len(cut) < len(whole)
    lines = cut.splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines[:5])
    with pytest.raises(ValueError):
        json.loads(lines[-1])


def test_garbage_is_deterministic_non_json(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    _finished(client, tmp_path, "j1")
    _plan(emu, {"fault": "garbage", "bytes": 1000, "times": 2})
    first = client.download_dataset("j1-out", tmp_path / "a")["BIJOutputSet.jsonl"].read_bytes()
    second = client.download_dataset("j1-out", tmp_path / "b")["BIJOutputSet.jsonl"].read_bytes()
    assert len(first) == 1000 and first == second
    for line in first.splitlines():
        with pytest.raises(ValueError):
            json.loads(line)


def test_oversized_is_streamed_to_the_exact_size(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    ids, _ = _finished(client, tmp_path, "j1")
    size = 2 * 1024**2 + 7
    _plan(emu, {"fault": "oversized", "bytes": size, "times": 2})
    with pytest.raises(ValueError, match="exceeds the limit"):
        client.download_dataset("j1-out", tmp_path / "a", max_bytes=1024**2)
    path = client.download_dataset("j1-out", tmp_path / "b")["BIJOutputSet.jsonl"]
    assert path.stat().st_size == size
    rows = _rows(path)
    assert {r["custom_id"] for r in rows[:10]} == set(ids) and rows[10]["custom_id"].startswith("padding-")


def test_zip_bomb_is_compact_and_refused_by_extraction(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    _finished(client, tmp_path, "j1")
    _plan(emu, {"fault": "zip_bomb", "bytes": 64 * 1024**2})
    path = client.download_dataset("j1-out", tmp_path / "dl")["BIJOutputSet.jsonl"]
    assert path.stat().st_size < 200 * 1024
    with zipfile.ZipFile(path) as zf:
        (info,) = zf.infolist()
        assert info.file_size == 64 * 1024**2
        assert zf.testzip() is None, "a well-formed zip: the CRC matches the inflated zeros"
    with pytest.raises(ValueError, match="above the limit"):
        extract_jsonl_bundle(path, tmp_path / "out", max_total_bytes=16 * 1024**2)


@pytest.mark.parametrize("archive", ["tar", "zip"])
def test_path_traversal_is_refused_by_extraction(emu: EmulatorServer, tmp_path: Path, archive: str) -> None:
    client, _ = _client(emu.base_url)
    _finished(client, tmp_path, "j1")
    _plan(emu, {"fault": "path_traversal", "archive": archive})
    path = client.download_dataset("j1-out", tmp_path / "dl")["BIJOutputSet.jsonl"]
    with pytest.raises(ValueError, match=r"\.\./\.\./evil\.jsonl"):
        extract_jsonl_bundle(path, tmp_path / "out")
    assert not list(tmp_path.rglob("evil.jsonl"))


def test_file_url_is_refused_by_the_client(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    _finished(client, tmp_path, "j1")
    _plan(emu, {"fault": "file_url", "times": 2})
    assert client.get_dataset("j1-out")["externalUrl"] == "file:///etc/passwd"
    with pytest.raises(ValueError, match="file://"):
        client.download_dataset("j1-out", tmp_path / "dl")
    assert client.get_dataset("j1-out")["externalUrl"] == ""
    assert client.get_dataset("j1-in")["externalUrl"] == "", "input datasets are not affected"


@pytest.mark.parametrize("identical", [False, True])
def test_duplicate_lines(emu: EmulatorServer, tmp_path: Path, identical: bool) -> None:
    client, _ = _client(emu.base_url)
    ids, _ = _finished(client, tmp_path, "j1", n=4)
    _plan(emu, {"fault": "duplicate_lines", "identical": identical})
    rows = _rows(client.download_dataset("j1-out", tmp_path / "dl")["BIJOutputSet.jsonl"])
    assert len(rows) == 8 and [r["custom_id"] for r in rows[:4]] == [r["custom_id"] for r in rows[4:]]
    assert sorted(r["custom_id"] for r in rows[:4]) == sorted(ids)
    contents = [r["response"]["choices"][0]["message"]["content"] for r in rows]
    if identical:
        assert rows[:4] == rows[4:]
    else:
        assert all(second == f"{first} (second copy)" for first, second in zip(contents[:4], contents[4:], strict=True))


def test_missing_results_then_a_complete_download(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    ids, _ = _finished(client, tmp_path, "j1")
    _plan(emu, {"fault": "drop", "match": "nothing"}, {"fault": "missing_results"})
    files = client.download_dataset("j1-out", tmp_path / "a")
    got = {r["custom_id"] for r in _rows(files["BIJOutputSet.jsonl"])}
    assert set(ids) - got == pick(ids, 0.2, "j1-out", 1) and len(got) == 8
    assert files["error-data"].read_bytes() == b""
    again = client.download_dataset("j1-out", tmp_path / "b")["BIJOutputSet.jsonl"]
    assert {r["custom_id"] for r in _rows(again)} == set(ids)


def test_error_rows_go_to_error_data(emu: EmulatorServer, tmp_path: Path) -> None:
    client, _ = _client(emu.base_url)
    _plan(emu, {"fault": "error_rows", "fraction": 0.3, "match": "-out$"})
    ids, job = _finished(client, tmp_path, "j1")
    assert job["state"] == "JOB_STATE_COMPLETED" and job["jobProgress"]["failedRequests"] == 3
    files = client.download_dataset("j1-out", tmp_path / "dl")
    errors = _rows(files["error-data"])
    failed = pick(ids, 0.3, "j1-out", 0)
    assert {e["custom_id"] for e in errors} == failed
    assert errors[0]["error"] == {"code": 500, "message": "injected row failure"}
    assert {r["custom_id"] for r in _rows(files["BIJOutputSet.jsonl"])} == set(ids) - failed
    _, second = _finished(client, tmp_path, "j2")
    assert second["jobProgress"]["failedRequests"] == 0, "times counts output datasets"


# ---------------------------------------------------------------------------------------------- persistence, CLI


def test_plan_and_counters_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    plan = {"rules": [{"fault": "status", "match": "/datasets$", "times": 2}]}
    url = f"{ACCT}/datasets"
    first = start_emulator(state, faults=plan)
    assert requests.get(first.base_url + url, headers=AUTH).status_code == 503
    stop_emulator_server(first)

    second = start_emulator(state)
    assert _faults(second)[0]["fired"] == 1
    assert requests.get(second.base_url + url, headers=AUTH).status_code == 503
    assert requests.get(second.base_url + url, headers=AUTH).status_code == 200
    stop_emulator_server(second)

    third = start_emulator(state, faults=plan)
    assert _faults(third)[0]["fired"] == 2, "the same plan at startup keeps its counters"
    assert requests.get(third.base_url + url, headers=AUTH).status_code == 200
    stop_emulator_server(third)

    fourth = start_emulator(state, faults={"rules": [{"fault": "status", "match": "/datasets$", "status": 500}]})
    try:
        assert _faults(fourth)[0]["fired"] == 0, "another plan starts fresh"
        assert requests.get(fourth.base_url + url, headers=AUTH).status_code == 500
    finally:
        stop_emulator_server(fourth)


def test_load_plan_arg_reads_json_or_a_file(tmp_path: Path) -> None:
    plan = {"rules": [{"fault": "drop", "times": 3}]}
    assert load_plan_arg(json.dumps(plan)) == plan
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert load_plan_arg(str(tmp_path / "plan.json")) == plan
    for bad, message in (("{nope", "not valid JSON"), (str(tmp_path / "missing.json"), "neither"),
                         ('{"rules": [{"fault": "drop", "x": 1}]}', "unknown field")):
        with pytest.raises(ValueError, match=message):
            load_plan_arg(bad)


def test_cli_installs_the_faults_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    plan = json.dumps({"rules": [{"fault": "status", "status": 429, "retry_after": 1}]})
    base = [sys.executable, "-m", "pipeline", "emulator", "--port", "0", "--state-dir", str(state)]
    with pytest.raises(SystemExit) as refused:
        main(["--state-dir", str(state), "--faults", '{"rules": [{"fault": "meteor"}]}'])
    assert refused.value.code == 2 and "meteor" in capsys.readouterr().err
    proc = subprocess.Popen([*base, "--faults", plan, "--idle-exit", "30"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        info: dict[str, Any] = {}
        while info.get("pid") != proc.pid:
            assert time.monotonic() < deadline
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)  # fails at once if the server died
            try:
                info = json.loads((state / "server.json").read_text())
            except (OSError, ValueError):
                info = {}
        rules = requests.get(f"{info['base_url']}/emulator/faults", timeout=5).json()["rules"]
        assert [(r["fault"], r["status"], r["retry_after"]) for r in rules] == [("status", 429, 1)]
        resp = requests.get(f"{info['base_url']}{ACCT}/datasets", headers=AUTH, timeout=5)
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
