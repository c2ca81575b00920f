"""Hostile download bodies of the emulator (gzip_bomb, endless, lying_length, tar_bomb, slow_drip), read over raw
HTTP with bounded reads: each test checks the hostile property, and that the server drops the stream cleanly."""

from __future__ import annotations

import json
import logging
import socket
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import urllib3

from pipeline.emulator.server import EmulatorServer
from pipeline.naming import make_custom_id
from pipeline.providers.fireworks import FireworksClient
from tests.conftest import start_emulator, stop_emulator_server

ACCT = "/v1/accounts/acme"
AUTH = {"Authorization": "Bearer k"}
RESULTS = "dataset/j1-out/BIJOutputSet.jsonl"


@pytest.fixture
def results(emu: EmulatorServer, tmp_path: Path) -> tuple[str, bytes]:
    return _results(emu, tmp_path)


def _results(emu: EmulatorServer, tmp_path: Path) -> tuple[str, bytes]:
    """The signed URL of a finished job's results file (j1-out, 4 rows; file faults act on it) and its true bytes."""
    client = FireworksClient(emu.base_url, "k", "acme", allow_loopback_http=True, sleep=lambda _s: None)
    ids = [make_custom_id("squad_v2", f"q{i}", "control", 0.0, 0, "open") for i in range(4)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"custom_id": c, "body": {"messages": [{"role": "user", "content": "Q?"}]}})
                            + "\n" for c in ids))
    client.create_dataset("j1-in", display_name="j1", example_count=len(ids))
    client.upload_dataset_file("j1-in", path)
    client.create_job("j1", model="accounts/fireworks/models/m", input_dataset_id="j1-in", output_dataset_id="j1-out",
                      display_name="j1", inference_parameters={"maxTokens": 8})
    assert client.get_job("j1")["state"] == "JOB_STATE_COMPLETED", "latency 0: the first look runs it"
    endpoint = requests.get(f"{emu.base_url}{ACCT}/datasets/j1-out:getDownloadEndpoint", headers=AUTH, timeout=5)
    url = endpoint.json()["filenameToSignedUrls"][RESULTS]
    real = requests.get(url, timeout=5).content
    assert real.count(b"\n") == len(ids)
    return url, real


def _plan(emu: EmulatorServer, *rules: dict[str, Any]) -> list[dict[str, Any]]:
    resp = requests.post(f"{emu.base_url}/emulator/faults", json={"rules": list(rules)}, timeout=5)
    assert resp.status_code == 200, resp.text
    return resp.json()["rules"]


def _handler_threads() -> set[threading.Thread]:
    """The live per-connection threads of the in-process servers (ThreadingHTTPServer names them so)."""
    return {t for t in threading.enumerate() if t.name.endswith("(process_request_thread)")}


def _assert_ended(threads: set[threading.Thread]) -> None:
    """Every thread in `threads` finishes soon (joins, no polling)."""
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive(), f"{thread.name} still serving after the client left"


def _raw_get(url: str) -> tuple[dict[str, str], bytes]:
    """GET `url` over a bare socket and read until the server closes: the response headers and every body byte
    sent (a normal client would stop at Content-Length or fail early; this one sees what was actually written)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(1 << 16):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    assert " 200 " in status, status
    return {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


@pytest.fixture
def quiet_log(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.LogCaptureFixture]:
    """Fails the test if the server logs a warning or worse, or prints a traceback (socketserver's handle_error)."""
    caplog.set_level(logging.DEBUG, logger="pipeline.emulator.server")
    yield caplog
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- validation


def test_hostile_params_have_defaults_and_are_validated(emu: EmulatorServer) -> None:
    rules = _plan(emu, {"fault": "gzip_bomb"}, {"fault": "endless"}, {"fault": "lying_length"},
                  {"fault": "tar_bomb"}, {"fault": "slow_drip"})
    params = [{k: v for k, v in r.items() if k not in ("fault", "match", "method", "times", "after", "seen", "fired")}
              for r in rules]
    assert params == [{"inflated_bytes": 2 * 1024**3}, {"chunk_bytes": 65536},
                      {"direction": "over", "extra_bytes": None},
                      {"members": 100000, "depth": 0, "member_bytes": 16, "gzip": True}, {"interval_s": 1.0}]
    for bad in ({"fault": "gzip_bomb", "inflated_bytes": 2**40}, {"fault": "endless", "chunk_bytes": 0},
                {"fault": "lying_length", "direction": "sideways"}, {"fault": "lying_length", "extra_bytes": 0},
                {"fault": "tar_bomb", "member_bytes": 0}, {"fault": "tar_bomb", "gzip": "yes"},
                {"fault": "tar_bomb", "depth": -1}, {"fault": "slow_drip", "interval_s": -1}):
        resp = requests.post(f"{emu.base_url}/emulator/faults", json={"rules": [bad]}, timeout=5)
        assert resp.status_code == 400, bad


# ---------------------------------------------------------------------------------------------- bodies


def test_gzip_bomb_is_one_small_gzip_stream_of_many_zeros(emu: EmulatorServer, results: tuple[str, bytes]) -> None:
    url, _ = results
    inflated = 64 * 1024**2
    _plan(emu, {"fault": "gzip_bomb", "inflated_bytes": inflated})
    resp = requests.get(url, timeout=5)
    body = resp.content
    assert body[:2] == b"\x1f\x8b" and len(body) == int(resp.headers["Content-Length"]) < 128 * 1024
    assert int.from_bytes(body[-4:], "little") == inflated, "ISIZE trailer"
    gz = zlib.decompressobj(31)
    first = gz.decompress(body, 1 << 20)
    assert first == bytes(1 << 20), "the first MiB inflates to zeros"
    total = len(first)
    while not gz.eof:  # bounded steps: never more than 1 MiB inflated at once
        total += len(gz.decompress(gz.unconsumed_tail, 1 << 20))
    assert total == inflated and not gz.unused_data, "one complete stream; zlib checked its CRC"


def test_endless_is_chunked_without_length_and_stops_when_the_client_leaves(
        emu: EmulatorServer, results: tuple[str, bytes], quiet_log: pytest.LogCaptureFixture) -> None:
    url, real = results
    _plan(emu, {"fault": "endless"})
    before = _handler_threads()
    got = bytearray()
    with requests.get(url, stream=True, timeout=5) as resp:
        assert "Content-Length" not in resp.headers and resp.headers["Transfer-Encoding"] == "chunked"
        serving = _handler_threads() - before
        for chunk in resp.iter_content(1 << 16):
            got += chunk
            if len(got) >= 5 * 1024**2:
                break
    assert got.startswith(real)
    padding = got[len(real):].split(b"\n")[:100]
    assert all(json.loads(line)["custom_id"].startswith("padding-") for line in padding)
    _assert_ended(serving)
    assert any("went away" in r.getMessage() for r in quiet_log.records)


@pytest.mark.parametrize(("direction", "extra"), [("over", None), ("over", 10), ("under", None), ("under", 7),
                                                  ("under", 100_000)])
def test_lying_length(emu: EmulatorServer, results: tuple[str, bytes], direction: str, extra: int | None) -> None:
    url, real = results
    _plan(emu, {"fault": "lying_length", "direction": direction, "extra_bytes": extra})
    headers, body = _raw_get(url)  # returns only once the server has closed the connection
    declared = int(headers["content-length"])
    if direction == "over":
        assert body == real and declared == len(real) + (extra if extra is not None else len(real))
    else:
        assert 0 < declared <= len(real) // 2 and b"\n" not in real[declared - 1:declared + 1]
        assert len(body) == declared + (extra if extra is not None else len(real) - declared)
        assert body.startswith(real) if len(body) >= len(real) else real.startswith(body)


def test_tar_bomb_streams_many_members(emu: EmulatorServer, results: tuple[str, bytes],
                                       quiet_log: pytest.LogCaptureFixture) -> None:
    url, _ = results
    _plan(emu, {"fault": "tar_bomb"})
    before = _handler_threads()
    with requests.get(url, stream=True, timeout=5) as resp:
        assert "Content-Length" not in resp.headers
        serving = _handler_threads() - before
        with tarfile.open(fileobj=resp.raw, mode="r|gz") as tf:
            first = [tf.next() for _ in range(5)]
    assert [m.name for m in first] == [f"part-{n:06d}.jsonl" for n in range(5)]
    assert all(m.isfile() and m.size == 16 for m in first)
    _assert_ended(serving)


def test_tar_bomb_deep_plain_tar_is_complete(emu: EmulatorServer, results: tuple[str, bytes]) -> None:
    url, _ = results
    _plan(emu, {"fault": "tar_bomb", "members": 2000, "depth": 60, "member_bytes": 200, "gzip": False})
    with requests.get(url, stream=True, timeout=5) as resp:
        with tarfile.open(fileobj=resp.raw, mode="r|") as tf:
            count = 0
            for member in tf:
                assert member.name == "a/" * 60 + f"part-{count:06d}.jsonl" and member.size == 200
                if count == 0:
                    line = tf.extractfile(member).read()  # type: ignore[union-attr]
                    assert json.loads(line)["custom_id"] == "padding-000000000000"
                count += 1
    assert count == 2000


def test_slow_drip_paces_bytes_without_blocking_other_requests(
        emu: EmulatorServer, results: tuple[str, bytes], quiet_log: pytest.LogCaptureFixture) -> None:
    url, real = results
    interval = 0.01
    _plan(emu, {"fault": "slow_drip", "interval_s": interval})
    before = _handler_threads()
    with requests.get(url, stream=True, timeout=5) as resp:
        assert int(resp.headers["Content-Length"]) == len(real)
        serving = _handler_threads() - before
        got = resp.raw.read(1)
        started = time.monotonic()
        while len(got) < 30:
            got += resp.raw.read(1)
        paced = time.monotonic() - started
        assert requests.get(f"{emu.base_url}/healthz", timeout=1).json()["ok"] is True, "not blocked by the drip"
    assert got == real[:30]
    assert paced >= 29 * interval, "each byte after the first waits interval_s"
    _assert_ended(serving)


def test_slow_drip_ends_at_server_shutdown(tmp_path: Path) -> None:
    server = start_emulator(tmp_path / "state2", latency_s=0.0)
    stopped = False
    try:
        url, _ = _results(server, tmp_path)
        _plan(server, {"fault": "slow_drip", "interval_s": 60})
        with requests.get(url, stream=True, timeout=10) as resp:
            assert len(resp.raw.read(1)) == 1
            started = time.monotonic()
            stop_emulator_server(server)
            stopped = True
            with pytest.raises(urllib3.exceptions.HTTPError):  # the body ends before its Content-Length
                resp.raw.read()
        assert time.monotonic() - started < 5, "the 60 s wait was cut short by the shutdown"
    finally:
        if not stopped:
            stop_emulator_server(server)
