"""AnthropicBackend and AnthropicClient against the emulator's Message Batches wire format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.batches import build_lines, render
from pipeline.emulator import model
from pipeline.emulator.server import EmulatorServer
from pipeline.naming import ANTHROPIC_ID_RE, anthropic_id, parse_custom_id
from pipeline.parsing import check_part_results, iter_jsonl, prediction_fields
from pipeline.providers import anthropic, job_states
from pipeline.providers.anthropic import AmbiguousBatch, AnthropicBackend, AnthropicClient
from pipeline.providers.backend import PartSpec
from pipeline.providers.errors import AuthError, NotFound, ProviderUnavailable
from pipeline.providers.limits import Deadline
from targets.manifest import PartRecord
from tests.conftest import Clock, start_emulator, stop_emulator_server, tiny_data

KEY = "sk-ant-secret-test-key"
SYSTEM = "You answer questions tersely."


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fake run directory: prepared data and one part of request lines under batch_inputs/."""
    run = tmp_path / "run"
    tiny_data(run / "prepared")
    closed = [json.loads(line) for line in (run / "prepared" / "closed_book.jsonl").read_text().splitlines()]
    lines = build_lines(closed_rows=closed, open_rows=[], condition="treatment", temp=0.0, samples=1,
                        system_prompt=SYSTEM, instructions={"closed": "Answer briefly.", "open": "Use the context."})
    (run / "batch_inputs").mkdir()
    (run / "batch_inputs" / "t0_treatment.p01.jsonl").write_bytes(render(lines))
    return run


def _start(tmp_path: Path, run_dir: Path, **kwargs: Any) -> EmulatorServer:
    return start_emulator(tmp_path / "state", answer_key=run_dir / "prepared", **{"latency_s": 0.0, **kwargs})


@pytest.fixture
def emu(tmp_path: Path, run_dir: Path) -> Iterator[EmulatorServer]:
    server = _start(tmp_path, run_dir)
    yield server
    stop_emulator_server(server)


def _client(server: EmulatorServer, sleeps: list[float] | None = None) -> AnthropicClient:
    return AnthropicClient(server.base_url, KEY, allow_loopback_http=True,
                           sleep=(sleeps if sleeps is not None else []).append)


def _part(run_dir: Path, tmp_path: Path, **params: Any) -> PartSpec:
    path = run_dir / "batch_inputs" / "t0_treatment.p01.jsonl"
    lines = len(path.read_text().splitlines())
    return PartSpec(jkey="t0_treatment_p01", requests_path=path, lines=lines, model="claude-test",
                    inference_parameters={"maxTokens": 64, "temperature": 0.0, "n": 1, **params},
                    request_sha256="ab" * 32, client_key="run-ab-g0", input_name="in", output_name="out",
                    display_name="t0 treatment p01", work_dir=tmp_path / "work" / "t0_treatment_p01")


def _record() -> PartRecord:
    return PartRecord(group="t0_treatment", index=1, type="closed", input_path="batch_inputs/t0_treatment.p01.jsonl",
                      input_sha256="ab" * 32, lines=6, model="claude-test", inference_parameters={"maxTokens": 64},
                      dataset_id="", job_id="", output_dataset_id="")


class Journal:
    """Fake `save` / `reserve`: counts the calls and keeps the saved records as JSON."""

    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []
        self.reserved = 0

    def save(self, record: PartRecord) -> None:
        self.saved.append(record.model_dump(mode="json"))

    def reserve(self) -> None:
        self.reserved += 1


def _calls(server: EmulatorServer) -> dict[str, dict[str, int]]:
    return requests.get(server.base_url + "/emulator/calls", timeout=5).json()


def _faults(server: EmulatorServer, *rules: dict[str, Any]) -> None:
    requests.post(server.base_url + "/emulator/faults", json={"rules": list(rules)}, timeout=5).raise_for_status()


def _download(backend: AnthropicBackend, part: PartSpec, record: PartRecord, dest: Path) -> list[dict[str, Any]]:
    files = backend.download(part, record, dest, max_bytes=1 << 20, deadline=Deadline(30, "test download"))
    assert list(files) == ["results.jsonl"]
    assert sorted(p.name for p in dest.iterdir()) == ["results.jsonl"]  # the raw download is gone
    return [obj for _, obj in iter_jsonl(files["results.jsonl"])]


def _our_ids(part: PartSpec) -> list[str]:
    return [json.loads(line)["custom_id"] for line in part.requests_path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- full cycle


def test_full_cycle_gives_canonical_lines_with_our_ids(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    backend = AnthropicBackend(_client(emu), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    backend.upload(part, record, journal.save)
    submitted = backend.submit(part, record, journal.save, journal.reserve)
    assert record.job_id.startswith("msgbatch_") and submitted.job_id == record.job_id
    assert journal.reserved == 1 and journal.saved[-1]["job_id"] == record.job_id
    intent = journal.saved[0]["remote"]["intent"]
    assert intent["count"] == part.lines and len(intent["checksum"]) == 64

    status = backend.status(part, record)
    assert status is not None and status.state == "ended" and status.decided == job_states.COMPLETED
    assert status.output.endswith(f"/v1/messages/batches/{record.job_id}/results")
    assert status.progress == {"processing": 0, "succeeded": part.lines, "errored": 0, "canceled": 0, "expired": 0,
                               "total": part.lines, "percent": 100}

    dest = tmp_path / "dest"
    rows = _download(backend, part, record, dest)
    check = check_part_results(dest / "results.jsonl", _our_ids(part))
    assert check.valid and check.ok == part.lines
    prepared = {json.loads(line)["id"]: json.loads(line)
                for line in (run_dir / "prepared" / "closed_book.jsonl").read_text().splitlines()}
    requests_by_id = {json.loads(line)["custom_id"]: json.loads(line)["body"]["messages"]
                      for line in part.requests_path.read_text().splitlines()}
    for row in rows:
        fields = prediction_fields(row)
        cid = parse_custom_id(row["custom_id"])
        # The emulator inverted the mapped id, so the answer is the one the Fireworks emulator gives.
        expected, _, usage = model.answer(row["custom_id"], requests_by_id[row["custom_id"]], prepared[cid.item_id])
        assert fields[9] == expected.strip() and fields[8] == "stop" and fields[13] == ""
        assert row["response"]["body"]["usage"]["prompt_tokens"] == usage["prompt_tokens"]
        assert row["response"]["body"]["model"] == "claude-test"


def test_id_mapping_round_trip_and_collisions(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = AnthropicClient("https://api.anthropic.com", KEY)
    backend = AnthropicBackend(client, prompt_caching=False)
    part = _part(run_dir, tmp_path)
    ours = _our_ids(part)
    assert all("|" in cid for cid in ours)
    inverse = backend.inverse(part)
    assert sorted(inverse.values()) == sorted(ours)
    assert all(ANTHROPIC_ID_RE.match(mapped) and inverse[mapped] == cid
               for cid in ours for mapped in [anthropic_id(cid)])
    assert anthropic_id(ours[0]) == anthropic_id(ours[0]) != anthropic_id(ours[1])
    monkeypatch.setattr(anthropic, "anthropic_id", lambda cid: "rsame")
    with pytest.raises(ValueError, match="map to the same Anthropic id rsame"):
        anthropic.inverse_ids(ours, part.jkey)


@pytest.mark.parametrize("caching", [False, True])
def test_system_prompt_is_top_level(emu: EmulatorServer, run_dir: Path, tmp_path: Path, caching: bool) -> None:
    backend = AnthropicBackend(_client(emu), prompt_caching=caching)
    part, record, journal = _part(run_dir, tmp_path, topP=0.9, topK=40, extraBody='{"stop": ["\\n\\n"]}'), _record(), \
        Journal()
    backend.upload(part, record, journal.save)
    first = (part.work_dir / "anthropic_requests.json").read_bytes()
    backend.convert(part)
    assert (part.work_dir / "anthropic_requests.json").read_bytes() == first  # deterministic bytes
    converted = json.loads(first)
    params = converted[0]["params"]
    assert [m["role"] for m in params["messages"]] == ["user"]
    assert params["max_tokens"] == 64 and params["temperature"] == 0.0 and params["top_p"] == 0.9
    assert params["top_k"] == 40 and params["stop_sequences"] == ["\n\n"] and "n" not in params
    if caching:
        assert params["system"] == [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    else:
        assert params["system"] == SYSTEM

    backend.submit(part, record, journal.save, journal.reserve)
    rows = _download(backend, part, record, tmp_path / "dest")
    usages = [row["response"]["body"]["usage"] for row in rows]
    for usage in usages:
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    creations = sum(1 for u in usages if u["cache_creation_input_tokens"])
    reads = sum(1 for u in usages if u["cache_read_input_tokens"])
    assert (creations, reads) == ((1, len(rows) - 1) if caching else (0, 0))


def test_n_above_one_is_refused(run_dir: Path, tmp_path: Path) -> None:
    backend = AnthropicBackend(AnthropicClient("https://api.anthropic.com", KEY), prompt_caching=False)
    with pytest.raises(ValueError, match="n=2"):
        backend.upload(_part(run_dir, tmp_path, n=2), _record(), Journal().save)


# ---------------------------------------------------------------------------------------------- exactly once


def test_submit_twice_makes_one_batch(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    backend = AnthropicBackend(_client(emu), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    first = backend.submit(part, record, journal.save, journal.reserve)
    second = backend.submit(part, record, journal.save, journal.reserve)
    assert first.job_id == second.job_id == record.job_id
    assert journal.reserved == 1
    assert _calls(emu)["job_creates"] == {record.job_id: 1}


def test_lost_create_response_is_found_not_repeated(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    _faults(emu, {"fault": "drop_after_commit", "match": "^/v1/messages/batches$", "method": "POST"})
    sleeps: list[float] = []
    backend = AnthropicBackend(_client(emu, sleeps), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    status = backend.submit(part, record, journal.save, journal.reserve)
    creates = _calls(emu)["job_creates"]
    assert list(creates) == [record.job_id] == [status.job_id] and creates[record.job_id] == 1
    assert sleeps == []  # found by the lookup, no retry of the create


def test_crash_after_create_is_reconciled_by_intent(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    """A create whose response was lost and whose lookup failed too (the process gives up without the batch id) is
    found by the next submit through the recorded intent, not created again."""
    _faults(emu, {"fault": "drop_after_commit", "match": "^/v1/messages/batches$", "method": "POST"},
            {"fault": "status", "status": 503, "match": "^/v1/messages/batches$", "method": "GET", "after": 1})
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    impatient = AnthropicClient(emu.base_url, KEY, allow_loopback_http=True, max_retries=0)
    with pytest.raises(ProviderUnavailable):
        AnthropicBackend(impatient, prompt_caching=False).submit(part, record, journal.save, journal.reserve)
    assert record.job_id == "" and journal.reserved == 1
    assert sum(_calls(emu)["job_creates"].values()) == 1
    backend = AnthropicBackend(_client(emu), prompt_caching=False)
    status = backend.submit(part, record, journal.save, journal.reserve)
    assert status.job_id == record.job_id and list(_calls(emu)["job_creates"]) == [record.job_id]
    assert journal.reserved == 1 and sum(_calls(emu)["job_creates"].values()) == 1


def test_two_matching_candidates_are_refused(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    backend = AnthropicBackend(_client(emu), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()

    def refuse() -> None:
        raise RuntimeError("stop requested")

    with pytest.raises(RuntimeError, match="stop requested"):
        backend.submit(part, record, journal.save, refuse)
    assert "intent" in journal.saved[-1]["remote"]
    converted = backend.convert(part)
    ids = [backend.client.create_batch(converted.requests, lookup=lambda: None)[0]["id"] for _ in range(2)]
    with pytest.raises(AmbiguousBatch) as caught:
        backend.submit(part, record, journal.save, journal.reserve)
    assert all(batch_id in str(caught.value) for batch_id in ids)
    assert record.job_id == "" and sum(_calls(emu)["job_creates"].values()) == 2


def test_batches_existing_before_the_create_are_not_taken(tmp_path: Path, run_dir: Path) -> None:
    """An in-progress look-alike (same count, other requests) created before ours is excluded by the intent."""
    clock = Clock()
    server = _start(tmp_path, run_dir, latency_s=3600.0, clock=clock)
    try:
        backend = AnthropicBackend(_client(server), prompt_caching=False,
                                   now=lambda: datetime.fromtimestamp(clock.ns / 1e9, tz=UTC))
        part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
        other = [{"custom_id": f"x{i}", "params": {"model": "m", "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": "hi"}]}}
                 for i in range(part.lines)]
        foreign = backend.client.create_batch(other, lookup=lambda: None)[0]["id"]
        clock.advance(5)
        _faults(server, {"fault": "drop_after_commit", "match": "^/v1/messages/batches$", "method": "POST"})
        status = backend.submit(part, record, journal.save, journal.reserve)
        assert status.decided == job_states.IN_PROGRESS and record.job_id != foreign
        assert journal.saved[0]["remote"]["intent"]["excluded"] == [foreign]
        assert sum(_calls(server)["job_creates"].values()) == 2
    finally:
        stop_emulator_server(server)


def test_overloaded_529_is_retried(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    _faults(emu, {"fault": "status", "status": 529, "match": "^/v1/messages/batches$", "method": "GET"},
            {"fault": "status", "status": 529, "match": "^/v1/messages/batches$", "method": "POST"})
    sleeps: list[float] = []
    backend = AnthropicBackend(_client(emu, sleeps), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    status = backend.submit(part, record, journal.save, journal.reserve)
    assert len(sleeps) == 2 and status.job_id == record.job_id
    assert sum(_calls(emu)["job_creates"].values()) == 1


# ---------------------------------------------------------------------------------------------- partial results


def test_expired_requests_become_error_lines(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    _faults(emu, {"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5, "match": r"\|treatment\|"})
    backend = AnthropicBackend(_client(emu), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    backend.submit(part, record, journal.save, journal.reserve)
    status = backend.status(part, record)
    assert status is not None and status.decided == job_states.EXPIRED and status.output
    assert status.progress is not None and status.progress["expired"] == part.lines // 2
    rows = _download(backend, part, record, tmp_path / "dest")
    errors = [row["error"] for row in rows if "error" in row]
    assert len(rows) == part.lines and len(errors) == part.lines // 2
    assert all(e["code"] == "expired" for e in errors)
    assert check_part_results(tmp_path / "dest" / "results.jsonl", _our_ids(part)).errors == part.lines // 2


def test_errored_requests_become_error_lines(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    _faults(emu, {"fault": "error_rows", "fraction": 0.5, "message": "boom"})
    backend = AnthropicBackend(_client(emu), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    backend.submit(part, record, journal.save, journal.reserve)
    status = backend.status(part, record)
    assert status is not None and status.decided == job_states.EXPIRED and "errored" in status.message
    rows = _download(backend, part, record, tmp_path / "dest")
    errors = [row["error"] for row in rows if "error" in row]
    assert errors and all(e == {"code": "api_error", "message": "boom"} for e in errors)


def test_archived_results_are_not_found(emu: EmulatorServer, run_dir: Path, tmp_path: Path) -> None:
    _faults(emu, {"fault": "output_deleted"})
    backend = AnthropicBackend(_client(emu), prompt_caching=False)
    part, record, journal = _part(run_dir, tmp_path), _record(), Journal()
    backend.submit(part, record, journal.save, journal.reserve)
    with pytest.raises(NotFound):
        backend.download(part, record, tmp_path / "dest", max_bytes=1 << 20, deadline=Deadline(30, "test"))
    status = backend.status(part, record)
    assert status is not None and status.output == "" and status.snapshot and status.snapshot["archived_at"]


# ---------------------------------------------------------------------------------------------- client and wire


def test_auth_and_version_headers_are_required(emu: EmulatorServer) -> None:
    url = emu.base_url + "/v1/messages/batches"
    resp = requests.get(url, headers={"anthropic-version": "2023-06-01"}, timeout=5)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    resp = requests.get(url, headers={"x-api-key": KEY}, timeout=5)
    assert resp.status_code == 400 and resp.json()["type"] == "error"
    bad = {"requests": [{"custom_id": "a|b", "params": {"model": "m", "max_tokens": 1,
                                                         "messages": [{"role": "user", "content": "x"}]}}]}
    resp = requests.post(url, json=bad, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}, timeout=5)
    assert resp.status_code == 400 and "custom_id" in resp.json()["error"]["message"]


def test_client_errors_and_pagination(emu: EmulatorServer, tmp_path: Path) -> None:
    client = _client(emu)
    one = [{"custom_id": "a", "params": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "q"}]}}]
    made = [client.create_batch(one, lookup=lambda: None)[0]["id"] for _ in range(3)]
    listed = [b["id"] for b in client.list_batches(page_size=2)]
    assert sorted(listed) == sorted(made) and len(listed) == 3
    assert client.get_batch("msgbatch_" + "0" * 24) is None
    cancelled = client.cancel_batch(made[0])
    assert cancelled["id"] == made[0]
    with pytest.raises(ValueError, match="API key is only sent"):
        client.download_results("https://evil.example/v1/x", tmp_path / "x", max_bytes=10,
                                deadline=Deadline(5, "t"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError):
        AnthropicClient.from_env({})
    assert AnthropicClient.missing_env({"ANTHROPIC_API_KEY": ""}) == ["ANTHROPIC_API_KEY"]
    env_client = AnthropicClient.from_env({"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": emu.base_url})
    assert env_client.allow_loopback_http and KEY not in repr(env_client)
    with pytest.raises(ValueError, match="http"):
        AnthropicClient.from_env({"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": "http://example.com"})


def test_anthropic_error_envelope_becomes_error_class(emu: EmulatorServer) -> None:
    class Keyless(AnthropicClient):
        def auth_headers(self) -> dict[str, str]:
            return {"anthropic-version": anthropic.API_VERSION}

    client = Keyless(emu.base_url, KEY, allow_loopback_http=True)
    with pytest.raises(AuthError) as caught:
        list(client.list_batches())
    assert caught.value.code == "authentication_error" and "x-api-key" in caught.value.message


def test_foreign_and_malformed_result_lines(run_dir: Path, tmp_path: Path) -> None:
    backend = AnthropicBackend(AnthropicClient("https://api.anthropic.com", KEY), prompt_caching=False)
    part = _part(run_dir, tmp_path)
    ours = _our_ids(part)
    raw = tmp_path / "raw.jsonl"
    lines = [{"custom_id": "rforeign", "result": {"type": "succeeded", "message": {"content": []}}},
             {"custom_id": anthropic_id(ours[0]), "result": {"type": "succeeded", "message": {
                 "content": [{"type": "text", "text": "Tess"}, {"type": "tool_use"}, {"type": "text", "text": "1"}],
                 "stop_reason": "max_tokens", "usage": {"input_tokens": 3, "output_tokens": 2,
                                                        "cache_read_input_tokens": 5}}}},
             {"custom_id": anthropic_id(ours[1]), "result": {"type": "succeeded", "message": "nonsense"}},
             {"custom_id": anthropic_id(ours[2]), "result": {"type": "canceled"}}]
    raw.write_text("".join(json.dumps(line) + "\n" for line in lines))
    target = tmp_path / "out.jsonl"
    backend._convert_results(part, raw, target, backend.inverse(part), 1 << 20)
    rows = [obj for _, obj in iter_jsonl(target)]
    assert [row["custom_id"] for row in rows] == ours[:3]
    first = prediction_fields(rows[0])
    assert first[8:13] == ("length", "Tess1", 8, 2, 10)  # prompt = input + cache read
    assert rows[1]["error"]["code"] == "malformed_result" and rows[2]["error"]["code"] == "canceled"
    raw.write_text("not json\n")
    with pytest.raises(ValueError, match="not valid JSONL"):
        backend._convert_results(part, raw, tmp_path / "bad.jsonl", backend.inverse(part), 1 << 20)
    assert not (tmp_path / "bad.jsonl").exists()


def test_fetch_url_headers_stay_on_their_origin(tmp_path: Path) -> None:
    """The API key goes to the results URL's origin, not to a redirect target on another host."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipeline.providers.download import fetch_url

    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            seen.append((self.headers.get("Host", ""), self.headers.get("x-api-key")))
            if self.path == "/start":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/file")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", "3")
                self.end_headers()
                self.wfile.write(b"ok\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        written = fetch_url(f"http://127.0.0.1:{server.server_address[1]}/start", tmp_path / "f", max_bytes=10,
                            timeout=(5, 5), allow_loopback_http=True, headers={"x-api-key": KEY})
    finally:
        server.shutdown()
        server.server_close()
    assert written == 3 and (tmp_path / "f").read_bytes() == b"ok\n"
    assert [key for _, key in seen] == [KEY, None]
