"""Task-level contracts that do not need a run: pickling, exit codes, config errors."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import (
    BuildBatches,
    ComputeStats,
    DownloadPart,
    ParsePredictions,
    PollJob,
    PrepareData,
    ScorePredictions,
    SubmitPart,
    SummarizeCosts,
    UploadPart,
)
from tests.conftest import PIPELINE_RUN

COMMON = {"rid": "pk", "root": "/nonexistent-root", "config": ""}


@pytest.mark.parametrize("task", [
    PrepareData(**COMMON), BuildBatches(prompt_set="excellence", temp=0.7, **COMMON),
    UploadPart(trial="t", jkey="t07_control_p01", **COMMON), SubmitPart(trial="t", jkey="t07_control_p01", **COMMON),
    PollJob(trial="t", jkey="t07_control_p01", **COMMON), DownloadPart(trial="t", jkey="t07_control_p01", **COMMON),
    ParsePredictions(trial="t", **COMMON), ScorePredictions(trial="t", **COMMON), ComputeStats(trial="t", **COMMON),
    SummarizeCosts(trial="t", **COMMON),
], ids=lambda t: t.get_task_family())
def test_tasks_survive_pickling_and_never_raise_in_complete(task) -> None:  # noqa: ANN001
    clone = pickle.loads(pickle.dumps(task))
    assert clone == task and clone.task_id == task.task_id
    assert task.complete() is False


def luigi_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run([*PIPELINE_RUN, "TrialReport", "--root", str(tmp_path / "exp"),
                           "--local-scheduler", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_failed_task_exits_non_zero(tmp_path: Path, config_dir: Path) -> None:
    raw = yaml.safe_load((config_dir / "experiment.yaml").read_text())
    raw["paths"]["prepared_dir"] = str(tmp_path / "no-such-data")
    (config_dir / "experiment.yaml").write_text(yaml.safe_dump(raw))
    out = luigi_run(tmp_path, "--rid", "fails", "--config", str(config_dir / "experiment.yaml"))
    assert out.returncode == 30, out.stderr[-2000:]
    assert "prepared data file missing" in out.stderr


def test_invalid_config_exits_2_with_the_key(tmp_path: Path, config_dir: Path) -> None:
    raw = yaml.safe_load((config_dir / "experiment.yaml").read_text())
    raw["temps"] = [0.2, 0.2]
    (config_dir / "experiment.yaml").write_text(yaml.safe_dump(raw))
    out = luigi_run(tmp_path, "--rid", "bad", "--config", str(config_dir / "experiment.yaml"))
    assert out.returncode == 2
    assert "temps" in out.stderr and "share the label" in out.stderr
    assert not (tmp_path / "exp" / "run_bad").exists()


def test_unknown_trial_is_a_clear_error(tmp_path: Path, config_dir: Path) -> None:
    out = luigi_run(tmp_path, "--rid", "x", "--trial", "nope", "--config", str(config_dir / "experiment.yaml"))
    assert out.returncode == 2 and "has no trial 'nope'" in out.stderr


def test_root_is_part_of_every_tasks_identity(tmp_path: Path) -> None:
    """Two roots served by one luigid are two runs: no task id is shared between them."""
    from pipeline.tasks.prepare import PrepareData
    from pipeline.tasks.remote import PollJob

    for make in (lambda root: PrepareData(rid="same", root=root),
                 lambda root: PollJob(rid="same", root=root, trial="t", jkey="t0_control_p01")):
        assert make(str(tmp_path / "a")).task_id != make(str(tmp_path / "b")).task_id
