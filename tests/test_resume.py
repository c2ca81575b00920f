"""Resume after damage: corrupt or legacy manifests, deleted results — nothing already paid for is paid again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import luigi
import pytest
import requests

from pipeline import TrialReport
from tests.conftest import small_experiment

pytestmark = pytest.mark.slow


def build(common: dict) -> bool:
    return luigi.build([TrialReport(**common)], local_scheduler=True, log_level="WARNING")


def calls(run_dir: Path) -> dict:
    server = json.loads((run_dir / ".emulator" / "server.json").read_text())
    return requests.get(server["base_url"] + "/emulator/calls", timeout=5).json()


@pytest.fixture
def finished(tmp_path: Path) -> dict:
    common = {"rid": "res", "root": str(tmp_path / "exp"), "config": str(small_experiment(tmp_path))}
    assert build(common)
    run_dir = tmp_path / "exp" / "run_res"
    trial = sorted(p.parent.parent for p in run_dir.glob("*/results/trial_manifest.json"))[0]
    return {"common": common, "run_dir": run_dir, "trial": trial, "calls": calls(run_dir)}


def outputs(trial: Path) -> dict[str, bytes]:
    names = ("predictions.csv", "per_item_scores.csv", "significance.json", "costs.json")
    return {n: (trial / "results" / n).read_bytes() for n in names}


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong_types", "not_an_object"])
def test_corrupt_manifest_is_quarantined_and_rebuilt_without_resubmitting(finished: dict, damage: str) -> None:
    manifest = finished["trial"] / "results" / "trial_manifest.json"
    before = outputs(finished["trial"])
    text = manifest.read_text()
    manifest.write_text({"truncated": text[: len(text) // 3], "empty": "", "not_an_object": "[1, 2]",
                         "wrong_types": json.dumps({**json.loads(text), "temps": "hot", "parts": 7})}[damage])
    assert build(finished["common"])
    copies = [p for p in manifest.parent.iterdir() if ".corrupt." in p.name]
    assert len(copies) == 1
    rebuilt = json.loads(manifest.read_text())
    assert rebuilt["schema_version"] == 2 and rebuilt["stage_status"]["report"]["status"] == "completed"
    assert calls(finished["run_dir"])["job_creates"] == finished["calls"]["job_creates"]
    assert calls(finished["run_dir"])["dataset_creates"] == finished["calls"]["dataset_creates"]
    assert outputs(finished["trial"]) == before


def test_lost_manifest_and_results_reattach_by_id(finished: dict) -> None:
    """Manifest gone and one part's results gone: the part is re-attached by its deterministic ids and re-downloaded."""
    trial = finished["trial"]
    before = outputs(trial)
    (trial / "results" / "trial_manifest.json").unlink()
    part = sorted((trial / "results").glob("t07_treatment_p*"))[0]
    shutil.rmtree(part)
    assert build(finished["common"])
    assert (part / "results.jsonl").exists()
    now = calls(finished["run_dir"])
    assert now["job_creates"] == finished["calls"]["job_creates"]
    assert outputs(trial) == before


def test_deleted_results_are_repaired_from_the_output_dataset(finished: dict) -> None:
    trial = finished["trial"]
    before = outputs(trial)
    for results in sorted((trial / "results").glob("t0_*_p*/results.jsonl"))[:2]:
        results.unlink()
    (trial / "results" / "predictions.csv").unlink()
    assert build(finished["common"])
    assert calls(finished["run_dir"])["job_creates"] == finished["calls"]["job_creates"]
    assert outputs(trial) == before
