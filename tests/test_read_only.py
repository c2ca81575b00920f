"""Checks never write: `complete()`, task constructors and the read-only commands change nothing on disk and install
nothing in the process; process control (signals, stop, sweeps, exit code) is the runner's alone.

The emulator runs in this process on a frozen clock, so the run's jobs stay running until the test says otherwise.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.control import exit_codes
from tests.conftest import PIPELINE_RUN, Provider, finished_run, small_experiment, stop_emulator_server

pytestmark = pytest.mark.e2e
RID = "ro"


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root`: size, mtime and content checksum (lock files included: taking a lock creates one)."""
    out = {}
    for here, _, files in os.walk(root):
        for name in files:
            path = Path(here) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def wait_for(condition, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=180,
                          env=env, cwd=cwd)


@pytest.fixture
def provider(tmp_path: Path):  # noqa: ANN201
    emulator = Provider(tmp_path / "exp" / f"run_{RID}")
    yield emulator
    stop_emulator_server(emulator.server)


def test_views_and_a_refused_invocation_leave_a_frozen_run_and_its_stop_request_alone(tmp_path: Path,
                                                                                       provider: Provider) -> None:
    config = small_experiment(tmp_path)
    root = tmp_path / "exp"
    argv = [*PIPELINE_RUN, "TrialReport", "--rid", RID, "--root", str(root), "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        wait_for(lambda: len(provider.job_creates()) >= 2)
        proc.send_signal(signal.SIGSTOP)
        stop = command("stop", "--rid", RID, "--root", str(root), cwd=tmp_path)
        assert stop.returncode == 0, stop.stderr
        before = tree(root)
        assert f"run_{RID}/STOP_REQUESTED" in before

        for args in (["plan", "--rid", RID, "--root", str(root)], ["plan", "--rid", RID, "--root", str(root), "--json"],
                     ["status", "--rid", RID, "--root", str(root)], ["status", "--rid", RID, "--root", str(root), "--json"],
                     ["list", "--root", str(root)], ["list", "--root", str(root), "--json"],
                     ["compare", "--rid", RID, "--rid", RID, "--root", str(root)]):
            command(*args, cwd=tmp_path)
            assert tree(root) == before, f"`python -m pipeline {' '.join(args)}` changed the run tree"
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
        assert refused.returncode == exit_codes.LOCKED, refused.stderr[-2000:]
        assert tree(root) == before, "a refused invocation changed the run tree"
    finally:
        proc.send_signal(signal.SIGCONT)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == exit_codes.STOPPED, output[-3000:]


def test_complete_and_constructors_write_and_install_nothing(tmp_path: Path) -> None:
    import luigi

    from pipeline.tasks.report import TrialReport

    config = small_experiment(tmp_path)
    root = tmp_path / "exp"
    run_dir = finished_run(root, config, "ro")
    (run_dir / "STOP_REQUESTED").write_text("old request\n")
    stray = run_dir / "leftover.tmp.123"  # what a writer killed mid-write may leave: only the runner sweeps it
    stray.write_text("x")
    first = next(run_dir.glob("*/results/t0_control_p01/results.jsonl"))
    first.write_text(first.read_text() + "\n")  # something to re-check, so the checks walk the whole graph
    before = tree(root)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    exit_hooks = atexit._ncallbacks()

    task = TrialReport(rid="ro", root=str(root), config=str(config))
    assert task.complete() is False
    for dep in luigi.task.flatten(task.requires()):
        dep.complete()
        for upstream in luigi.task.flatten(dep.requires()):
            upstream.complete()

    assert tree(root) == before
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert atexit._ncallbacks() == exit_hooks


def test_archive_failure_is_a_nonzero_exit(tmp_path: Path) -> None:
    config = small_experiment(tmp_path)
    root = tmp_path / "exp"
    finished_run(root, config, "arch")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the archive directory should go\n")
    out = command("archive", "--rid", "arch", "--root", str(root), "--out", str(blocker), cwd=tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "failed" in out.stderr
