"""The emulator stays on loopback: it binds a non-loopback host only with --allow-remote, and its /emulator/*
control routes refuse clients that are not on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.emulator import server as server_module
from pipeline.emulator.server import EmulatorServer, is_loopback_client, main


@pytest.mark.parametrize(("addr", "loopback"), [
    ("127.0.0.1", True), ("127.5.5.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("192.168.1.2", False), ("::ffff:10.0.0.1", False), ("0.0.0.0", False), ("::", False),
    ("", False), ("localhost", False), ("not an address", False),
])
def test_is_loopback_client(addr: str, loopback: bool) -> None:
    assert is_loopback_client(addr) is loopback


def test_control_routes_work_from_loopback(emu: EmulatorServer) -> None:
    url = f"{emu.base_url}/emulator/faults"
    assert requests.post(url, json={"rules": [{"fault": "drop"}]}, timeout=5).status_code == 200
    assert requests.get(url, timeout=5).json()["rules"][0]["fault"] == "drop"
    assert requests.get(f"{emu.base_url}/emulator/calls", timeout=5).status_code == 200


def test_control_routes_refuse_other_clients(emu: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The test client is on loopback; make the server see it as remote to check the refusal end to end.
    seen: list[str] = []

    def remote(addr: str) -> bool:
        seen.append(addr)
        return False

    monkeypatch.setattr(server_module, "is_loopback_client", remote)
    for method, path in (("POST", "/emulator/faults"), ("DELETE", "/emulator/faults"), ("GET", "/emulator/faults"),
                         ("GET", "/emulator/calls"), ("POST", "/emulator/reset-calls")):
        resp = requests.request(method, f"{emu.base_url}{path}", json={"rules": [{"fault": "drop"}]}, timeout=5)
        assert resp.status_code == 403, (method, path)
        assert resp.json()["code"] == 7 and "loopback" in resp.json()["message"]
    assert seen and set(seen) == {"127.0.0.1"}, "the check gets the client's address"
    assert requests.get(f"{emu.base_url}/healthz", timeout=5).json()["ok"] is True, "liveness stays open"
    monkeypatch.undo()
    assert requests.get(f"{emu.base_url}/emulator/faults", timeout=5).json() == {"rules": []}, "nothing installed"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.2", "example.org"])
def test_non_loopback_host_needs_allow_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str], host: str) -> None:
    def no_bind(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("make_server must not be called")

    monkeypatch.setattr(server_module, "make_server", no_bind)
    state = tmp_path / "state"
    with pytest.raises(SystemExit) as refused:
        main(["--host", host, "--port", "0", "--state-dir", str(state)])
    assert refused.value.code == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert not state.exists(), "nothing written, nothing bound"


def test_allow_remote_and_loopback_hosts_pass_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bound: list[str] = []

    class Bound(Exception):
        """Stops main() right after it asked for a server."""

    def fake_make_server(host: str, *_args: Any, **_kwargs: Any) -> None:
        bound.append(host)
        raise Bound

    monkeypatch.setattr(server_module, "make_server", fake_make_server)
    for argv in (["--host", "0.0.0.0", "--allow-remote"], ["--host", "localhost"], ["--host", "::1"], []):
        with pytest.raises(Bound):
            main([*argv, "--state-dir", str(tmp_path / "state")])
    assert bound == ["0.0.0.0", "localhost", "::1", "127.0.0.1"]
