"""Two processes on the same run at once: no lost manifest update, no job created twice."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from targets.manifest import TrialManifest
from tests.conftest import PIPELINE_RUN, emulator_calls, small_experiment

pytestmark = pytest.mark.slow


def test_two_processes_on_one_rid(tmp_path: Path) -> None:
    config = small_experiment(tmp_path, latency_s=0.3)
    root = tmp_path / "exp"
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    # --no-lock: Luigi's own pid lock would make the second process exit at once; here both really run.
    args = [*PIPELINE_RUN, "TrialReport", "--rid", "two", "--root", str(root), "--config",
            str(config), "--local-scheduler", "--no-lock"]
    # Logs go to files: a pipe read only after the other process ends can fill and block its writer mid-run.
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    with logs[0].open("w") as first, logs[1].open("w") as second:
        procs = [subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
                 for out in (first, second)]
        for proc in procs:
            proc.wait(timeout=300)
    outputs = [log.read_text() for log in logs]
    codes = [p.returncode for p in procs]
    run_dir = root / "run_two"
    if any(codes):  # a process that lost a race on a file may fail a task; the next run must then finish cleanly
        again = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:] + "\n".join(o[-2000:] for o in outputs)
    calls = emulator_calls(run_dir)
    assert calls["job_creates"] and all(n == 1 for n in calls["job_creates"].values())
    assert all(n == 1 for n in calls["dataset_creates"].values())
    parts = {}
    for path in run_dir.glob("*/results/trial_manifest.json"):
        manifest = TrialManifest.model_validate_json(path.read_text())
        assert manifest.stage("report").status == "completed"
        parts.update({p.job_id: p for p in manifest.parts.values()})
    assert set(parts) == set(calls["job_creates"]), "every created job is recorded: no manifest update was lost"
    assert (run_dir / "aggregate_report.md").exists()
