"""The local OpenAI-compatible server backend (`pipeline.providers.local`) against the emulator's synchronous
`POST /v1/chat/completions`: full cycle, journal resume (partial run, torn line, kill -9), retries, error lines,
the concurrency cap, stop, and download's dedupe / order / bounds."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.emulator import model
from pipeline.emulator.server import EmulatorServer
from pipeline.naming import make_custom_id
from pipeline.parsing import check_part_results, iter_jsonl, prediction_fields
from pipeline.providers import job_states
from pipeline.providers.backend import PartSpec
from pipeline.providers.errors import AuthError, NotFound, ProviderUnavailable
from pipeline.providers.limits import Deadline, DownloadRefused
from pipeline.providers.local import (
    JOURNAL,
    JOURNAL_LOCK,
    JOURNAL_META,
    InvalidCompletion,
    LocalBackend,
    LocalClient,
    ResponseTooLarge,
    chat_body,
    check_completion,
)
from targets.manifest import PartRecord
from tests.conftest import start_emulator, stop_emulator_server, tiny_data

REPO = Path(__file__).resolve().parent.parent
MODEL = "llama3.2:1b"
PARAMS = {"maxTokens": 64, "temperature": 0.0, "n": 1}
SYSTEM = "Answer with a short span."


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmulatorServer]:
    """An in-process emulator whose answer key is `tiny_data` (items o0..o5 answerable per the model's rates)."""
    srv = start_emulator(tmp_path / "state", latency_s=0.0, answer_key=tiny_data(tmp_path / "data"))
    yield srv
    stop_emulator_server(srv)


def custom_ids(n: int) -> list[str]:
    return [make_custom_id("squad_v2", f"o{i}", "control", 0.0, 0, "open") for i in range(n)]


def messages_of(cid: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question for {cid}?"}]


def make_part(tmp_path: Path, n: int, *, client_key: str = "run1-abc-g0", params: dict[str, Any] | None = None
              ) -> PartSpec:
    """A part of `n` Fireworks-shaped request lines in tmp_path."""
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"custom_id": c, "body": {"messages": messages_of(c)}}) + "\n"
                            for c in custom_ids(n)))
    return PartSpec(jkey="t00_control_p01", requests_path=path, lines=n, model=MODEL,
                    inference_parameters=dict(params or PARAMS), request_sha256="f" * 64, client_key=client_key,
                    input_name=f"{client_key}-in", output_name=f"{client_key}-out", display_name="t00 control p01",
                    work_dir=tmp_path / "work")


def make_record(part: PartSpec, job_id: str = "") -> PartRecord:
    return PartRecord(group="t00_control", index=1, type="open", input_path=str(part.requests_path),
                      input_sha256="0" * 64, lines=part.lines, model=part.model,
                      inference_parameters=part.inference_parameters, dataset_id=part.input_name, job_id=job_id,
                      output_dataset_id=part.output_name)


def client_for(srv: EmulatorServer, **kwargs: Any) -> LocalClient:
    kwargs.setdefault("sleep", lambda _s: None)
    return LocalClient(srv.base_url + "/v1", **kwargs)


def submitted(part: PartSpec) -> PartRecord:
    return make_record(part, LocalBackend.job_id(part))


def plan(srv: EmulatorServer, *rules: dict[str, Any]) -> None:
    resp = requests.post(f"{srv.base_url}/emulator/faults", json={"rules": list(rules)}, timeout=5)
    assert resp.status_code == 200, resp.text


def completions(srv: EmulatorServer) -> dict[str, int]:
    return requests.get(f"{srv.base_url}/emulator/calls", timeout=5).json()["completions"]


def journal_lines(part: PartSpec) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (part.work_dir / JOURNAL).read_text().splitlines()]


def download(backend: LocalBackend, part: PartSpec, dest: Path, max_bytes: int = 10**8) -> Path:
    files = backend.download(part, submitted(part), dest, max_bytes=max_bytes, deadline=Deadline(60, "download"))
    return files["results.jsonl"]


class StopAfter:
    """should_stop: True once `journal` has at least `n` lines."""

    def __init__(self, part: PartSpec, n: int) -> None:
        self.path = part.work_dir / JOURNAL
        self.n = n

    def __call__(self) -> bool:
        return self.path.exists() and self.path.read_bytes().count(b"\n") >= self.n


# ---------------------------------------------------------------------------------------------- full cycle


def test_full_cycle_gives_canonical_lines_that_parse(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 6)
    backend = LocalBackend(client_for(server), 3)
    record = make_record(part)
    saved: list[str] = []
    reserved: list[int] = []

    backend.upload(part, record, lambda r: saved.append(r.job_id))
    assert saved == [], "nothing to upload"
    first = backend.submit(part, record, lambda r: saved.append(r.job_id), lambda: reserved.append(1))
    again = backend.submit(part, record, lambda r: saved.append(r.job_id), lambda: reserved.append(1))
    assert first.job_id == again.job_id == record.job_id == "local-run1-abc-g0"
    assert first.decided == job_states.IN_PROGRESS
    assert reserved == [1] and saved == ["local-run1-abc-g0"], "reserved and saved once per generation"
    assert completions(server) == {}, "submit sends nothing"

    status = backend.status(part, record)
    assert status is not None and status.decided == job_states.COMPLETED
    assert status.output == str(part.work_dir / JOURNAL)
    assert status.progress == {"percent": 100, "answered": 6, "total": 6}
    assert completions(server) == dict.fromkeys(custom_ids(6), 1)
    assert backend.status(part, record).decided == job_states.COMPLETED  # type: ignore[union-attr]
    assert completions(server) == dict.fromkeys(custom_ids(6), 1), "a completed part sends nothing more"

    out = download(backend, part, tmp_path / "dl")
    check = check_part_results(out, custom_ids(6))
    assert check.ok == 6 and not check.problems and not check.missing
    key = {row["id"]: row for row in map(json.loads, (tmp_path / "data" / "open_book.jsonl").read_text().splitlines())}
    for (_, obj), cid in zip(iter_jsonl(out), custom_ids(6), strict=True):
        row = prediction_fields(obj)
        content, finish, usage = model.answer(cid, messages_of(cid), key[cid.split("|")[1]])
        assert (row[0], row[9], row[8], row[11]) == (cid, content, finish, usage["completion_tokens"])


def test_status_before_submit_is_unknown(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 2)
    assert LocalBackend(client_for(server), 2).status(part, make_record(part, "someone-else")) is None
    assert completions(server) == {}


def test_request_body_carries_every_parameter() -> None:
    params = {"maxTokens": 32, "temperature": 0.7, "n": 1, "topP": 0.9, "topK": 40,
              "extraBody": json.dumps({"stop": ["\n\n"]})}
    msgs = [{"role": "user", "content": "Q?"}]
    assert chat_body("m", msgs, params) == {"model": "m", "messages": msgs, "max_tokens": 32, "temperature": 0.7,
                                            "n": 1, "top_p": 0.9, "top_k": 40, "stop": ["\n\n"]}
    assert chat_body("m", msgs, PARAMS) == {"model": "m", "messages": msgs, "max_tokens": 64, "temperature": 0.0,
                                            "n": 1}
    with pytest.raises(ValueError, match="only"):
        chat_body("m", msgs, {**PARAMS, "extraBody": json.dumps({"stop": ["x"], "seed": 1})})


# ---------------------------------------------------------------------------------------------- resume


def test_resume_after_a_stopped_run_sends_only_the_missing(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 8)
    record = submitted(part)
    partial = LocalBackend(client_for(server), 1, should_stop=StopAfter(part, 3)).status(part, record)
    assert partial is not None and partial.decided == job_states.IN_PROGRESS and partial.state == "stopped"
    assert partial.progress == {"percent": 37, "answered": 3, "total": 8}
    assert sorted(completions(server)) == sorted(custom_ids(8)[:3])

    done = LocalBackend(client_for(server), 4).status(part, record)
    assert done is not None and done.decided == job_states.COMPLETED
    assert completions(server) == dict.fromkeys(custom_ids(8), 1), "each request sent exactly once"
    assert sorted(line["custom_id"] for line in journal_lines(part)) == sorted(custom_ids(8))


def test_lines_journaled_before_are_not_sent_again(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 4)
    record = submitted(part)
    part.work_dir.mkdir(parents=True)
    (part.work_dir / JOURNAL_META).write_text(json.dumps(
        {"job_id": record.job_id, "request_sha256": part.request_sha256, "requests": part.lines}))
    earlier = [{"custom_id": cid, "response": {"status_code": 200, "body": {
        "object": "chat.completion", "choices": [{"message": {"content": "from before"}, "finish_reason": "stop"}]}}}
        for cid in custom_ids(4)[1:3]]
    (part.work_dir / JOURNAL).write_text("".join(json.dumps(line) + "\n" for line in earlier))

    status = LocalBackend(client_for(server), 2).status(part, record)
    assert status is not None and status.decided == job_states.COMPLETED
    ids = custom_ids(4)
    assert completions(server) == {ids[0]: 1, ids[3]: 1}
    texts = [prediction_fields(obj)[9] for _, obj in iter_jsonl(download(LocalBackend(client_for(server), 1), part,
                                                                         tmp_path / "dl"))]
    assert texts[1:3] == ["from before", "from before"]


def test_a_torn_last_line_is_truncated_and_its_request_sent_again(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 5)
    record = submitted(part)
    LocalBackend(client_for(server), 1, should_stop=StopAfter(part, 2)).status(part, record)
    journal = part.work_dir / JOURNAL
    ids = custom_ids(5)
    torn = json.dumps({"custom_id": ids[2], "response": {"body": {"object": "chat.completion"}}})[:40]
    with open(journal, "a") as fh:
        fh.write(torn)
    size_before = journal.stat().st_size

    done = LocalBackend(client_for(server), 2).status(part, record)
    assert done is not None and done.decided == job_states.COMPLETED
    assert completions(server) == dict.fromkeys(ids, 1)
    assert torn not in journal.read_text(), "the torn fragment was truncated away"
    assert journal.stat().st_size > size_before - len(torn)
    assert sorted(line["custom_id"] for line in journal_lines(part)) == sorted(ids), "every line parses"


def test_a_journal_of_another_generation_is_moved_aside(server: EmulatorServer, tmp_path: Path) -> None:
    old = make_part(tmp_path, 3, client_key="run1-abc-g0")
    LocalBackend(client_for(server), 2).status(old, submitted(old))
    new = make_part(tmp_path, 3, client_key="run1-abc-g1")
    backend = LocalBackend(client_for(server), 2)
    with pytest.raises(NotFound):
        download(backend, new, tmp_path / "dl")
    status = backend.status(new, submitted(new))
    assert status is not None and status.decided == job_states.COMPLETED
    assert completions(server) == dict.fromkeys(custom_ids(3), 2), "the new generation asks again"
    assert (new.work_dir / "journal.superseded-1.jsonl").exists()
    with pytest.raises(NotFound):
        download(backend, old, tmp_path / "dl-old")


def test_a_second_process_on_the_same_part_is_turned_away(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 3)
    part.work_dir.mkdir(parents=True)
    with open(part.work_dir / JOURNAL_LOCK, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        status = LocalBackend(client_for(server), 2).status(part, submitted(part))
    assert status is not None and status.decided == job_states.IN_PROGRESS and status.state == "busy"
    assert completions(server) == {}


# ---------------------------------------------------------------------------------------------- failures


def test_429_and_500_are_retried(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 4)
    plan(server, {"fault": "status", "match": "^/v1/chat/completions$", "status": 429, "times": 2},
         {"fault": "status", "match": "^/v1/chat/completions$", "status": 500, "times": 2})
    sleeps: list[float] = []
    status = LocalBackend(client_for(server, sleep=sleeps.append), 1).status(part, submitted(part))
    assert status is not None and status.decided == job_states.COMPLETED
    assert len(sleeps) == 4
    assert completions(server) == dict.fromkeys(custom_ids(4), 1)
    assert all("response" in line for line in journal_lines(part))


def test_error_answers_are_journaled_as_error_lines(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 4)
    plan(server, {"fault": "status", "match": "^/v1/chat/completions$", "status": 400, "message": "bad prompt",
                  "times": 1},
         {"fault": "status", "match": "^/v1/chat/completions$", "status": 503, "times": 2})
    backend = LocalBackend(client_for(server, max_retries=1), 1)
    status = backend.status(part, submitted(part))
    assert status is not None and status.decided == job_states.COMPLETED
    ids = custom_ids(4)
    lines = {line["custom_id"]: line for line in journal_lines(part)}
    assert lines[ids[0]]["error"]["code"] == 3 and "bad prompt" in lines[ids[0]]["error"]["message"]
    assert "HTTP 503" in lines[ids[1]]["error"]["message"], "a 5xx still failing after the retries"
    assert "response" in lines[ids[2]] and "response" in lines[ids[3]]
    check = check_part_results(download(backend, part, tmp_path / "dl"), ids)
    assert (check.ok, check.errors, check.missing) == (2, 2, [])


def test_an_unreachable_server_fails_the_part_naming_it_and_journals_nothing(tmp_path: Path) -> None:
    part = make_part(tmp_path, 3)
    client = LocalClient("http://127.0.0.1:9/v1", max_retries=1, sleep=lambda _s: None, timeout=(1.0, 1.0))
    with pytest.raises(ProviderUnavailable, match="127.0.0.1:9/v1 does not answer .* provider.base_url"):
        LocalBackend(client, 2).status(part, submitted(part))
    assert (part.work_dir / JOURNAL).read_bytes() == b""


def test_auth_errors_raise_instead_of_failing_every_request(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 3)
    plan(server, {"fault": "status", "match": "^/v1/chat/completions$", "status": 401, "times": 0})
    with pytest.raises(AuthError):
        LocalBackend(client_for(server), 2).status(part, submitted(part))
    assert (part.work_dir / JOURNAL).read_bytes() == b""


def test_oversized_and_malformed_answers_are_refused(server: EmulatorServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_for(server)
    with pytest.raises(ResponseTooLarge):
        client.chat({"model": MODEL, "messages": messages_of("x")}, "x", max_bytes=50)
    for bad in ({"object": "list"}, {"object": "chat.completion", "choices": []},
                {"object": "chat.completion", "choices": [{"text": "hi"}]}, []):
        with pytest.raises(InvalidCompletion):
            check_completion(bad, "answer")

    monkeypatch.setattr("pipeline.providers.local.response_bound", lambda _params: 50)
    part = make_part(tmp_path, 2)
    LocalBackend(client, 2).status(part, submitted(part))
    assert {line["error"]["code"] for line in journal_lines(part)} == {"response_too_large"}


# ---------------------------------------------------------------------------------------------- concurrency, stop


class CountingClient(LocalClient):
    """Records the most requests in flight at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = 0
        self.max_in_flight = 0
        self._count_lock = threading.Lock()

    def chat(self, body: dict[str, Any], request_id: str, *, max_bytes: int) -> dict[str, Any]:
        with self._count_lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return super().chat(body, request_id, max_bytes=max_bytes)
        finally:
            with self._count_lock:
                self.in_flight -= 1


def test_concurrency_cap_is_respected(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 12)
    plan(server, {"fault": "delay", "match": "^/v1/chat/completions$", "seconds": 0.05, "times": 0})
    client = CountingClient(server.base_url + "/v1")
    status = LocalBackend(client, 3).status(part, submitted(part))
    assert status is not None and status.decided == job_states.COMPLETED
    assert client.max_in_flight == 3, "the cap is reached and never exceeded"
    assert completions(server) == dict.fromkeys(custom_ids(12), 1)


def test_should_stop_sends_nothing_new(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 4)
    status = LocalBackend(client_for(server), 2, should_stop=lambda: True).status(part, submitted(part))
    assert status is not None and status.decided == job_states.IN_PROGRESS and status.state == "stopped"
    assert status.progress == {"percent": 0, "answered": 0, "total": 4}
    assert completions(server) == {}


# ---------------------------------------------------------------------------------------------- download


def test_download_dedupes_orders_and_bounds(server: EmulatorServer, tmp_path: Path) -> None:
    part = make_part(tmp_path, 3)
    backend = LocalBackend(client_for(server), 1)
    with pytest.raises(NotFound):
        download(backend, part, tmp_path / "none")
    ids = custom_ids(3)
    part.work_dir.mkdir(parents=True)
    (part.work_dir / JOURNAL_META).write_text(json.dumps(
        {"job_id": LocalBackend.job_id(part), "request_sha256": part.request_sha256, "requests": part.lines}))

    def line(cid: str, text: str) -> str:
        return json.dumps({"custom_id": cid, "response": {"body": {"object": "chat.completion", "choices": [
            {"message": {"content": text}, "finish_reason": "stop"}]}}}) + "\n"

    (part.work_dir / JOURNAL).write_text(
        line(ids[2], "third") + line(ids[0], "first") + line(ids[2], "third again")
        + line("squad_v2|zz|control|0.0|0|open", "stranger") + json.dumps({"custom_id": ids[1], "error": {
            "code": 500, "message": "boom"}}) + "\n" + line(ids[1], "second late"))
    out = download(backend, part, tmp_path / "dl")
    rows = [obj for _, obj in iter_jsonl(out)]
    assert [r["custom_id"] for r in rows] == ids
    assert [prediction_fields(r)[9] for r in rows] == ["first", "", "third"], "first answer per id wins"
    assert rows[1]["error"]["message"] == "boom"
    with pytest.raises(DownloadRefused):
        download(backend, part, tmp_path / "small", max_bytes=out.stat().st_size - 1)
    assert not (tmp_path / "small" / "results.jsonl").exists()


# ---------------------------------------------------------------------------------------------- client, emulator


def test_client_url_policy_and_auth_header() -> None:
    with pytest.raises(ValueError, match="http"):
        LocalClient("http://10.0.0.5:8000/v1")
    assert LocalClient("http://10.0.0.5:8000/v1", allow_http=True).base_url == "http://10.0.0.5:8000/v1"
    assert LocalClient("https://gpu.example/v1").auth_headers() == {}
    keyed = LocalClient.from_env("http://localhost:8000/v1", environ={"LOCAL_API_KEY": "sk-local"})
    assert keyed.auth_headers() == {"Authorization": "Bearer sk-local"}
    assert "sk-local" not in repr(keyed)
    with pytest.raises(ValueError):
        LocalClient("file:///tmp/x", allow_http=True)


def test_emulator_chat_route(server: EmulatorServer) -> None:
    url = server.base_url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What?"}], "n": 2, "max_tokens": 1}
    answer = requests.post(url, json=body, timeout=5)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["object"] == "chat.completion" and len(data["choices"]) == 2
    assert data["choices"][0]["finish_reason"] == "length" and len(data["choices"][0]["message"]["content"].split()) == 1
    assert data["usage"]["completion_tokens"] == 2
    assert requests.post(url, json=body, timeout=5, headers={"Authorization": "Bearer any"}).json() == data, \
        "deterministic, any key"
    assert list(completions(server).values()) == [2] and next(iter(completions(server))).startswith("body-")
    assert requests.get(url, timeout=5).status_code == 405
    assert requests.post(url, json={"model": MODEL, "messages": []}, timeout=5).status_code == 400
    assert requests.post(url, json={**body, "stream": True}, timeout=5).status_code == 400


# ---------------------------------------------------------------------------------------------- kill -9

_CHILD = """
import json, sys
from pathlib import Path
from pipeline.providers.backend import PartSpec
from pipeline.providers.local import LocalBackend, LocalClient
from targets.manifest import PartRecord

spec, record = json.loads(sys.argv[1]), json.loads(sys.argv[2])
spec["requests_path"], spec["work_dir"] = Path(spec["requests_path"]), Path(spec["work_dir"])
part = PartSpec(**spec)
LocalBackend(LocalClient(sys.argv[3]), int(sys.argv[4])).status(part, PartRecord(**record))
raise SystemExit("status returned before the kill")
"""


def _wait_for(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Poll `predicate` (the child's progress on disk) until it holds; fail if the child exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the child exited before {what}: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_kill_9_mid_run_then_resume_answers_each_request_once(server: EmulatorServer, tmp_path: Path) -> None:
    n, cap = 30, 3
    part = make_part(tmp_path, n)
    record = submitted(part)
    plan(server, {"fault": "delay", "match": "^/v1/chat/completions$", "seconds": 0.1, "times": 0})
    spec = {**part.__dict__, "requests_path": str(part.requests_path), "work_dir": str(part.work_dir)}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec), record.model_dump_json(),
                             server.base_url + "/v1", str(cap)], cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        _wait_for(StopAfter(part, 5), "5 journal lines", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(journal_lines(part))
    assert 5 <= killed_at < n

    plan(server)
    done = LocalBackend(client_for(server), cap).status(part, record)
    assert done is not None and done.decided == job_states.COMPLETED
    rows = [obj for _, obj in iter_jsonl(download(LocalBackend(client_for(server), cap), part, tmp_path / "dl"))]
    assert sorted(r["custom_id"] for r in rows) == sorted(custom_ids(n)), "every request answered exactly once"
    assert all("response" in r for r in rows)
    sent = completions(server)
    assert set(sent) == set(custom_ids(n))
    assert n <= sum(sent.values()) <= n + cap, f"only the requests in flight at the kill were sent twice: {sent}"
