"""Stopping a run (`python -m pipeline stop`, SIGTERM): nothing new is sent, state is kept, exit code 75, resume works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.control import exit_codes
from tests.conftest import PIPELINE_RUN, small_experiment

pytestmark = pytest.mark.slow


def start(root: Path, config: Path, rid: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.Popen([*PIPELINE_RUN, "TrialReport", "--rid", rid, "--root", str(root),
                             "--config", str(config), "--local-scheduler"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=root.parent)


def wait_for(condition, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def job_creates(run_dir: Path) -> dict[str, int]:
    try:
        server = json.loads((run_dir / ".emulator" / "server.json").read_text())
        return requests.get(server["base_url"] + "/emulator/calls", timeout=5).json()["job_creates"]
    except (OSError, ValueError, requests.RequestException):
        return {}


@pytest.mark.parametrize("how", ["command", "sigterm"])
def test_stop_then_resume(tmp_path: Path, how: str) -> None:
    config = small_experiment(tmp_path, latency_s=3.0)
    root, rid = tmp_path / "exp", f"stop-{how}"
    run_dir = root / f"run_{rid}"
    proc = start(root, config, rid)
    wait_for(lambda: len(job_creates(run_dir)) >= 1)
    if how == "command":
        out = subprocess.run([sys.executable, "-m", "pipeline", "stop", "--rid", rid, "--root", str(root)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "stop requested" in out.stdout
    else:
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == exit_codes.STOPPED, output[-3000:]
    assert "stop requested" in output
    assert "Traceback" not in output, "a stop is an expected condition: one line, no traceback"
    created = job_creates(run_dir)
    manifests = [json.loads(p.read_text()) for p in run_dir.glob("*/results/trial_manifest.json")]
    known = {part["job_id"] for m in manifests for part in m["parts"].values() if part["state"] != "uploaded"}
    assert set(created) <= known, "every created job is recorded in a manifest"
    resumed = start(root, config, rid)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-3000:]
    final = job_creates(run_dir)
    assert all(n == 1 for n in final.values())
    assert {j: n for j, n in final.items() if j in created} == created
    assert not (run_dir / "STOP_REQUESTED").exists()
    assert (run_dir / "aggregate_report.md").exists()
