"""Cron mode: `--no-wait` checks running jobs once and exits with the "waiting" code; a later run finishes.

The emulator runs in this process on a settable clock, so "the jobs are still running" and "now they are done"
are decided by the test, not by timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.control import exit_codes
from tests.conftest import PIPELINE_RUN, Provider, small_experiment, stop_emulator_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    emulator = Provider(tmp_path / "exp" / "run_cron")
    yield emulator
    stop_emulator_server(emulator.server)


def luigi_cmd(tmp_path: Path, config: Path, *extra: str) -> list[str]:
    return [*PIPELINE_RUN, "TrialReport", "--rid", "cron", "--root", str(tmp_path / "exp"),
            "--config", str(config), "--local-scheduler", *extra]


def invoke(tmp_path: Path, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run(luigi_cmd(tmp_path, config, *extra), capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path)


def status(tmp_path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "pipeline", "status", "--rid", "cron", "--root", str(tmp_path / "exp"),
                          "--json"], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_no_wait_exits_waiting_then_a_later_run_finishes(tmp_path: Path, provider: Provider) -> None:
    config = small_experiment(tmp_path)
    first = invoke(tmp_path, config, "--no-wait")
    assert first.returncode == exit_codes.WAITING, first.stderr[-3000:]
    assert "waiting on the provider" in first.stderr
    sent = provider.job_creates()
    assert sent and all(n == 1 for n in sent.values()), "every part is submitted in the first invocation"
    manifests = list((tmp_path / "exp" / "run_cron").glob("*/results/trial_manifest.json"))
    parts = [p for m in manifests for p in json.loads(m.read_text())["parts"].values()]
    assert parts and {p["state"] for p in parts} == {"running"}, "each job's state was checked and recorded"

    again = invoke(tmp_path, config, "--no-wait")
    assert again.returncode == exit_codes.WAITING, again.stderr[-3000:]
    assert provider.job_creates() == sent, "a waiting run never submits again"

    provider.clock.advance(120)
    done = invoke(tmp_path, config, "--no-wait")
    assert done.returncode == exit_codes.OK, done.stderr[-3000:]
    log = (first.stdout + first.stderr + again.stdout + again.stderr + done.stdout + done.stderr).splitlines()
    assert len(log) < 40 and "Traceback" not in "\n".join(log), "\n".join(log)
    assert [line for line in log if "waiting on the provider:" in line and f"{len(sent)} part(s)" in line], log
    assert any("finished (exit 0)" in line for line in done.stderr.splitlines())
    assert (tmp_path / "exp" / "run_cron" / "aggregate_report.md").is_file()
    assert provider.job_creates() == sent
    assert not list((tmp_path / "exp" / "run_cron" / ".outcomes").glob("*")), "outcome notes are cleaned up"


def test_an_overlapping_identical_invocation_is_refused_with_the_locked_code(tmp_path: Path, provider: Provider) -> None:
    config = small_experiment(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    env["TMPDIR"] = str(tmp_path)  # Luigi's pid-lock directory: private to this test
    log = (tmp_path / "blocking.log").open("w")  # a file, not a pipe: nobody reads the log while it runs
    blocking = subprocess.Popen(luigi_cmd(tmp_path, config), stdout=subprocess.DEVNULL, stderr=log, text=True,
                                env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not provider.job_creates():  # the first invocation holds the lock and is now waiting on its jobs
            assert blocking.poll() is None and time.monotonic() < deadline, "the first invocation never submitted"
            time.sleep(0.05)
        second = subprocess.run(luigi_cmd(tmp_path, config), capture_output=True, text=True, timeout=120, env=env,
                                cwd=tmp_path)
        assert second.returncode == exit_codes.LOCKED, second.stderr[-3000:]
        # Parts may still be being submitted: keep the provider's clock moving until the first invocation is done.
        deadline = time.monotonic() + 180
        while blocking.poll() is None and time.monotonic() < deadline:
            provider.clock.advance(120)
            with contextlib.suppress(subprocess.TimeoutExpired):
                blocking.wait(timeout=0.5)
        blocking.wait(timeout=5)
        assert blocking.returncode == exit_codes.OK, (tmp_path / "blocking.log").read_text()[-3000:]
    finally:
        if blocking.poll() is None:
            blocking.kill()
            blocking.wait()
        log.close()
