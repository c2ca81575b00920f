"""One test per acceptance line of the seed ticket (shared/seed/000_ce683238fff405e3.txt), named after it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import luigi
import pytest
import requests
import yaml
from pydantic import ValidationError

from pipeline import TrialReport
from pipeline.control.run import accept_drift, open_run
from targets import store
from targets.manifest import TrialManifest
from tests.conftest import small_experiment

pytestmark = pytest.mark.slow
OUTPUTS = ("predictions.csv", "per_item_scores.csv", "significance.json", "costs.json")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run(common: dict, *extra: str) -> list[str]:
    """Build the run in-process; the pipeline's decision lines it logged."""
    handler = Lines()
    logger = logging.getLogger("pipeline")
    logger.addHandler(handler)
    try:
        from pipeline import decisions

        decisions._logged.clear()  # noqa: SLF001 - decisions are logged once per process; each build here is a new "process"
        assert luigi.build([TrialReport(**common)], local_scheduler=True, log_level="WARNING")
    finally:
        logger.removeHandler(handler)
    return handler.lines


def emulator(run_dir: Path) -> str:
    return json.loads((run_dir / ".emulator" / "server.json").read_text())["base_url"]


def calls(run_dir: Path) -> dict:
    return requests.get(emulator(run_dir) + "/emulator/calls", timeout=5).json()


def set_faults(run_dir: Path, rules: list[dict]) -> None:
    answer = requests.post(emulator(run_dir) + "/emulator/faults", json={"rules": rules}, timeout=5)
    assert answer.status_code == 200, answer.text


@pytest.fixture
def done(tmp_path: Path) -> dict:
    common = {"rid": "seed", "root": str(tmp_path / "exp"), "config": str(small_experiment(tmp_path))}
    first = run(common)
    run_dir = tmp_path / "exp" / "run_seed"
    trials = sorted(p.parent.parent for p in run_dir.glob("*/results/trial_manifest.json"))
    return {"common": common, "run_dir": run_dir, "trial": trials[0], "trials": trials, "calls": calls(run_dir),
            "tmp": tmp_path, "first_lines": first}


def test_first_downloads_are_logged_as_downloads_not_repairs(done: dict) -> None:
    downloads = [line for line in done["first_lines"] if " downloaded " in line]
    assert any(line.startswith("done downloaded") for line in downloads)
    assert not [line for line in downloads if line.startswith("repair")], downloads


def snapshot(trial: Path) -> dict[str, bytes]:
    return {n: (trial / "results" / n).read_bytes() for n in OUTPUTS}


# --- Manifest upgrade -------------------------------------------------------------------------------------------------

def test_new_trials_are_created_as_v2(done: dict) -> None:
    for trial in done["trials"]:
        raw = json.loads((trial / "results" / "trial_manifest.json").read_text())
        assert raw["schema_version"] == 2 and set(raw["timestamps"]) >= {"created_at", "updated_at"}
        assert set(raw["stage_status"]) >= {"downloaded", "parsed", "scored", "stats", "costs", "report", "archived"}
        assert all(set(s) >= {"status", "updated_at", "artifacts"} for s in raw["stage_status"].values())
        assert raw["jobs"] and raw["job_status"]


def test_legacy_v1_manifests_are_upgraded_on_resume_preserving_fields_and_backed_up(done: dict) -> None:
    path = done["trial"] / "results" / "trial_manifest.json"
    v2 = json.loads(path.read_text())
    v1 = {"created_utc": v2["timestamps"]["created_at"], "run_id": v2["run_id"], "trial": v2["trial"],
          "temps": v2["temps"], "samples_per_item": v2["samples_per_item"], "prompts": v2["prompts"],
          "datasets": v2["datasets"], "jobs": v2["jobs"], "job_status": v2["job_status"],
          "control_registry": {"t0": {"mode": "producer"}}, "job_counts": {"t0_control_p01": {"items_in": 4}},
          "custom_key": [1, 2, 3]}
    path.write_text(json.dumps(v1))
    before = snapshot(done["trial"])
    run(done["common"])
    backups = list(path.parent.glob("trial_manifest.json.backup.*.json"))
    assert len(backups) == 1 and json.loads(backups[0].read_text()) == v1
    upgraded = json.loads(path.read_text())
    assert upgraded["schema_version"] == 2
    for key in ("datasets", "jobs", "job_status", "control_registry", "job_counts", "custom_key"):
        assert upgraded[key] == {**v1[key], **upgraded[key]} if isinstance(v1[key], dict) else upgraded[key] == v1[key]
    assert calls(done["run_dir"])["job_creates"] == done["calls"]["job_creates"]
    assert snapshot(done["trial"]) == before


def test_corrupted_manifests_are_copied_aside_and_repaired_from_artifacts_and_breadcrumbs(done: dict) -> None:
    path = done["trial"] / "results" / "trial_manifest.json"
    original = path.read_text()
    path.write_text(original[: len(original) // 2])
    for results in sorted((done["trial"] / "results").glob("t07_*_p01/results.jsonl")):
        results.unlink()  # the repair must re-attach these parts from breadcrumbs, not resubmit them
    run(done["common"])
    copies = list(path.parent.glob("trial_manifest.json.corrupt.*"))
    assert len(copies) == 1 and copies[0].read_text() == original[: len(original) // 2]
    repaired = TrialManifest.model_validate_json(path.read_text())
    assert repaired.stage("report").status == "completed"
    assert calls(done["run_dir"])["job_creates"] == done["calls"]["job_creates"]


# --- Idempotency ------------------------------------------------------------------------------------------------------

# A deleted artifact is rebuilt byte for byte (deterministic writes), so the stages below it, scheduled because it was
# missing, find everything they read unchanged when their turn comes and skip.
@pytest.mark.parametrize(("artifact", "reruns"), [
    ("results/predictions.csv", {"parsed"}),
    ("results/per_item_scores.csv", {"scored"}),
    ("results/significance.json", {"stats"}),
    ("results/costs.json", {"costs"}),
    ("reports/report.md", {"report"}),
])
def test_each_phase_skips_completed_work_and_rebuilds_only_missing_or_stale(done: dict, artifact: str,
                                                                             reruns: set[str]) -> None:
    (done["trial"] / artifact).unlink()
    lines = run(done["common"])
    ran = {line.split()[1] for line in lines if line.startswith("done ") and f"trial={done['trial'].name}" in line}
    assert ran == reruns
    other = done["trials"][1].name
    assert not any(line.startswith("done ") and f"trial={other}" in line for line in lines)
    assert calls(done["run_dir"])["job_creates"] == done["calls"]["job_creates"]


def test_parse_row_count_matches_unique_custom_ids_and_a_mismatch_reparses(done: dict) -> None:
    predictions = done["trial"] / "results" / "predictions.csv"
    good = predictions.read_text()
    predictions.write_text("\n".join(good.splitlines()[:-3]) + "\n")
    lines = run(done["common"])
    assert any(line.startswith("run parsed") and "changed since it was written" in line for line in lines)
    assert predictions.read_text() == good
    ids = [json.loads(x)["custom_id"] for x in (done["trial"] / "results" / "results_combined.jsonl").read_text().splitlines()]
    assert len(good.splitlines()) - 1 == len(set(ids)) == len(ids)


# --- Repair download --------------------------------------------------------------------------------------------------

def part_with_breadcrumb(done: dict) -> tuple[Path, str]:
    crumb = sorted((done["trial"] / "results").glob("t0_*_OUTPUT_DATASET_ID.txt"))[0]
    jkey = crumb.name[: -len("_OUTPUT_DATASET_ID.txt")]
    return done["trial"] / "results" / jkey / "results.jsonl", crumb.read_text().strip()


def test_missing_results_with_output_dataset_id_are_repaired_by_download(done: dict) -> None:
    results, _ = part_with_breadcrumb(done)
    before = results.read_bytes()
    results.unlink()
    lines = run(done["common"])
    assert any(line.startswith("repair downloaded") for line in lines)
    assert results.read_bytes() == before
    assert calls(done["run_dir"])["job_creates"] == done["calls"]["job_creates"]


def test_repair_download_uses_the_cli_fallback_when_rest_fails(done: dict) -> None:
    results, output_id = part_with_breadcrumb(done)
    saved = done["tmp"] / "saved.jsonl"
    saved.write_bytes(results.read_bytes())
    results.unlink()
    config = Path(done["common"]["config"])
    raw = yaml.safe_load(config.read_text())
    script = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[3] + '/BIJOutputSet.jsonl')"
    raw["provider"]["download_command"] = [sys.executable, "-c", script, str(saved), "{dataset_id}", "{output_dir}"]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    set_faults(done["run_dir"], [{"fault": "status", "status": 404, "match": f"{output_id}:getDownloadEndpoint",
                                  "times": 0}])
    # what `run --accept-config-drift` does:
    accept_drift(open_run(done["common"]["rid"], done["common"]["root"], str(config)), config)
    lines = run(done["common"])
    assert any("fallback command" in line for line in lines)
    assert results.read_bytes() == saved.read_bytes()
    assert calls(done["run_dir"])["job_creates"] == done["calls"]["job_creates"]


def test_unrecoverable_output_is_downgraded_and_requeued_once_without_duplicate_submissions(done: dict) -> None:
    results, output_id = part_with_breadcrumb(done)
    results.unlink()
    set_faults(done["run_dir"], [{"fault": "output_deleted", "match": output_id}])
    lines = run(done["common"])
    assert any(line.startswith("downgrade part") and "resubmitting once" in line for line in lines)
    jkey = results.parent.name
    record = TrialManifest.model_validate_json((done["trial"] / "results" / "trial_manifest.json").read_text()).parts[jkey]
    assert record.generation == 1 and record.resubmissions == 1 and "not found" in record.history[0]["reason"]
    after = calls(done["run_dir"])["job_creates"]
    assert set(after) - set(done["calls"]["job_creates"]) == {record.job_id}
    assert all(n == 1 for n in after.values())
    run(done["common"])
    assert calls(done["run_dir"])["job_creates"] == after, "a second resume submits nothing more"


# --- Determinism, validation, observability ---------------------------------------------------------------------------

def test_artifact_writes_are_deterministic(done: dict, tmp_path: Path) -> None:
    other = {**done["common"], "root": str(tmp_path / "again")}
    run(other)
    for trial in done["trials"]:
        again = tmp_path / "again" / "run_seed" / trial.name
        assert snapshot(again) == snapshot(trial)
        assert (again / "reports" / "report.md").read_bytes() == (trial / "reports" / "report.md").read_bytes()


def test_state_changes_are_schema_validated_before_persist(done: dict) -> None:
    path = done["trial"] / "results" / "trial_manifest.json"
    before = path.read_bytes()

    def corrupting(manifest: TrialManifest | None) -> TrialManifest:
        assert manifest is not None
        manifest.__dict__["temps"] = "not a list"  # bypasses assignment validation, as a buggy caller could
        return manifest

    with pytest.raises(ValidationError):
        store.update(path, TrialManifest, corrupting)
    assert path.read_bytes() == before


def test_one_concise_log_line_per_idempotency_decision(done: dict) -> None:
    (done["trial"] / "results" / "costs.json").unlink()
    lines = run(done["common"])
    decisions = [line for line in lines if line.split()[0] in {"skip", "run", "re-run", "repair"}]
    assert decisions
    keys = [tuple(line.split(" (")[0].split()) for line in decisions]
    assert len(keys) == len(set(keys)), "each task's decision is logged once"
    assert all(line.endswith(")") and " (" in line and "\n" not in line for line in decisions)
    assert any(line.startswith(f"run costs trial={done['trial'].name} (") for line in decisions)
    assert any(line.startswith("skip ") for line in decisions)
