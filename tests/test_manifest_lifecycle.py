"""The trial manifest lifecycle: v1 upgrade on first touch, corrupt-manifest repair from on-disk artifacts."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.control.layout import TRIAL_FILES
from targets import lifecycle, store
from targets.lifecycle import (
    BREADCRUMB_MAX_BYTES,
    backup_path,
    classify,
    infer_stage_status,
    open_trial_manifest,
    persist_lifecycle,
    read_raw,
    rebuild_from_disk,
    upgrade_v1,
)
from targets.manifest import TrialManifest

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
FIXED = datetime(2025, 9, 1, 12, 0, 0, 123456, tzinfo=UTC)
STAMP = "20250901T120000123456Z"
ACCT = "accounts/acme"


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run_r1" / "model-default" / "results"
    path.mkdir(parents=True)
    return path


def context_for(results_dir: Path) -> lifecycle.Context:
    def context() -> dict[str, Any]:
        return {"run_id": "r1", "trial": {"model_id": "m", "prompt_set": "default"}, "temps": [0.0],
                "samples_per_item": {"0.0": 1}, "prompts": {"control": {"sha256": "aa"}, "treatment": {"sha256": "bb"}},
                "results_dir": results_dir, "names": TRIAL_FILES}
    return context


def job_json(job_id: str, state: str = "JOB_STATE_COMPLETED", **extra: Any) -> dict[str, Any]:
    return {"name": f"{ACCT}/batchInferenceJobs/{job_id}", "state": state,
            "inputDatasetId": f"{ACCT}/datasets/{job_id}-in", "outputDatasetId": f"{ACCT}/datasets/{job_id}-out", **extra}


def write_breadcrumbs(results_dir: Path) -> None:
    """p01 completed, p02 running (job.json only), treatment p01 known only from its OUTPUT_DATASET_ID.txt."""
    (results_dir / "t0_control_p01_job.json").write_text(json.dumps(job_json("job-c1")))
    (results_dir / "t0_control_p01_OUTPUT_DATASET_ID.txt").write_text("job-c1-out\n")
    (results_dir / "t0_control_p02_job.json").write_text(json.dumps(job_json("job-c2", "JOB_STATE_RUNNING")))
    (results_dir / "t0_treatment_p01_OUTPUT_DATASET_ID.txt").write_text(f"{ACCT}/datasets/job-t1-out\n")


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file with its size and mtime, except the store's lock files (taking a lock is not a write)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.suffix != ".lock"}


def copies(results_dir: Path, kind: str) -> list[Path]:
    return sorted(results_dir.glob(f"trial_manifest.json.{kind}.*"))


# ------------------------------------------------------------------------------------------------ classify

def test_classify_sorts_v2_v1_and_corrupt() -> None:
    valid = TrialManifest(run_id="r1", trial={"model_id": "m"}, temps=[0.0], samples_per_item={"0.0": 1})
    assert classify(valid.model_dump(mode="json")) == "v2"
    assert classify(fixture("v1_fa4d8a6.json")) == "v1"
    assert classify(fixture("v1_890c944.json")) == "v1"
    assert classify({**fixture("v1_fa4d8a6.json"), "schema_version": 1}) == "v1"
    # A v2 that fails validation is corrupt, never "upgraded" (the original lost fields that way).
    assert classify(fixture("v2_wrong_types.json")) == "corrupt"
    assert classify({**valid.model_dump(mode="json"), "stage_status": ["parsed"]}) == "corrupt"
    assert classify({**valid.model_dump(mode="json"), "run_id": None}) == "corrupt"
    assert classify({**fixture("v1_fa4d8a6.json"), "temps": "x"}) == "corrupt"
    for raw in ({}, [], "text", None, 3, {"schema_version": "2"}, {"schema_version": True}, {"schema_version": 2}):
        assert classify(raw) == "corrupt", raw


@pytest.mark.parametrize("content", [b"", b"  \n", b'{"run_id": "r1", "temps": [0.0', b'\xff\xfe{"a": 1}', b"[1, 2]",
                                     b"null", b"[" * 100_000, b'{"n": ' + b"9" * 5000 + b"}"])
def test_read_raw_reports_unreadable_files_as_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "trial_manifest.json"
    path.write_bytes(content)
    kind, _ = read_raw(path)
    assert kind == "corrupt"


def test_read_raw_returns_the_parsed_value(tmp_path: Path) -> None:
    path = tmp_path / "trial_manifest.json"
    path.write_text(json.dumps(fixture("v1_890c944.json")))
    assert read_raw(path) == ("v1", fixture("v1_890c944.json"))


# ------------------------------------------------------------------------------------------------- upgrade

@pytest.mark.parametrize("name", ["v1_fa4d8a6.json", "v1_890c944.json"])
def test_upgrade_v1_keeps_every_field(results_dir: Path, name: str) -> None:
    raw = fixture(name)
    dumped = upgrade_v1(raw, results_dir=results_dir, names=TRIAL_FILES).model_dump(mode="json")
    assert dumped["schema_version"] == 2
    assert dumped["timestamps"]["created_at"] == raw["created_utc"]
    for key, value in raw.items():
        if key not in ("jobs", "datasets"):
            assert dumped[key] == value, key
    for key in ("jobs", "datasets"):
        assert dumped[key] == {k: v if isinstance(v, list) else [v] for k, v in raw[key].items()}
    assert dumped["lifecycle_history"][-1]["event"] == "upgraded"


def test_upgrade_v1_keeps_the_original_only_fields_verbatim(results_dir: Path) -> None:
    upgraded = upgrade_v1(fixture("v1_fa4d8a6.json"), results_dir=results_dir, names=TRIAL_FILES)
    dumped = upgraded.model_dump(mode="json")
    assert dumped["datasets"]["t0_control"] == ["ex-oobdbc93-t0-control-01102030-p01", "ex-oobdbc93-t0-control-01102030-p02"]
    assert dumped["jobs"]["t0_control"] == [f"{ACCT}/batchInferenceJobs/job-c1", None]  # padding kept: index = part - 1
    assert dumped["job_status"] == {"t0_control_p01": "completed", "t0_treatment_p01": "running"}
    assert dumped["job_counts"]["t0_control_p01"]["items_out"] == 30
    assert dumped["control_registry"]["t0"]["key"] == "c0ffee"
    assert dumped["operator_notes"] == ["kept by hand", {"ticket": 2}]
    assert dumped["created_utc"] == "2025-08-01T10:20:30.123456Z"


def test_upgrade_890c944_string_jobs_become_part_one(results_dir: Path) -> None:
    upgraded = upgrade_v1(fixture("v1_890c944.json"), results_dir=results_dir, names=TRIAL_FILES)
    assert upgraded.jobs == {"t0_control": [f"{ACCT}/batchInferenceJobs/job-old"],
                             "t0_treatment": [f"{ACCT}/batchInferenceJobs/job-old-t"]}
    assert upgraded.datasets == {"t0_control": ["ex-d-t0-control-15080000-p01"]}
    assert upgraded.job_status == {}


def make_artifacts(results_dir: Path, *, all_parts: bool, stats_version: int, full_costs: bool) -> None:
    for jkey, lines in (("t0_control_p01", 3), ("t0_treatment_p01", 2)):
        (results_dir / jkey).mkdir()
        (results_dir / jkey / "results.jsonl").write_text('{"custom_id": "x"}\n' * lines)
    if not all_parts:
        (results_dir / "t0_control_p02").mkdir()
        (results_dir / "t0_control_p02" / "results.jsonl").write_text("")
    (results_dir / "not_a_part").mkdir()
    (results_dir / "predictions.csv").write_text('custom_id,answer\na,"two\nlines"\nb,x\n')
    (results_dir / "significance.json").write_text(json.dumps({"schema_version": stats_version}))
    costs = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, **({"usd": 0.1} if full_costs else {})}
    (results_dir / "costs.json").write_text(json.dumps(costs))
    (results_dir.parent / "reports").mkdir()
    (results_dir.parent / "reports" / "report.md").write_text("# report\n")


def test_stage_status_inferred_from_artifacts(results_dir: Path) -> None:
    make_artifacts(results_dir, all_parts=True, stats_version=2, full_costs=True)
    stages = infer_stage_status(results_dir, TRIAL_FILES)
    status = {name: record.status for name, record in stages.items()}
    assert status == {"downloaded": "completed", "parsed": "completed", "scored": "pending", "stats": "completed",
                      "costs": "completed", "report": "completed", "archived": "pending"}
    assert stages["downloaded"].artifacts["parts"] == [
        {"job_key": "t0_control_p01", "path": "model-default/results/t0_control_p01/results.jsonl", "size": 57, "rows": 3},
        {"job_key": "t0_treatment_p01", "path": "model-default/results/t0_treatment_p01/results.jsonl", "size": 38,
         "rows": 2}]
    assert stages["parsed"].artifacts == {"predictions_csv": "model-default/results/predictions.csv", "row_count": 2}
    assert stages["report"].artifacts == {"report_md": "model-default/reports/report.md"}
    # Informational only: nothing that would let a task treat the stage as verified.
    for record in stages.values():
        assert not {"file", "inputs", "sha256"} & record.artifacts.keys()


def test_stage_status_incomplete_artifacts_are_not_completed(results_dir: Path) -> None:
    make_artifacts(results_dir, all_parts=False, stats_version=1, full_costs=False)
    status = {name: record.status for name, record in infer_stage_status(results_dir, TRIAL_FILES).items()}
    assert status["downloaded"] == "in_progress"
    assert status["stats"] == "pending"
    assert status["costs"] == "pending"
    (results_dir / "significance.json").write_text('{"schema_version": 2')  # truncated
    assert infer_stage_status(results_dir, TRIAL_FILES)["stats"].status == "pending"
    elsewhere = results_dir.parent.parent / "other" / "results"
    assert {r.status for r in infer_stage_status(elsewhere, TRIAL_FILES).values()} == {"pending"}


def test_upgrade_records_inferred_stage_status(results_dir: Path) -> None:
    make_artifacts(results_dir, all_parts=True, stats_version=2, full_costs=True)
    upgraded = upgrade_v1(fixture("v1_fa4d8a6.json"), results_dir=results_dir, names=TRIAL_FILES)
    assert upgraded.stage("downloaded").status == "completed"
    assert upgraded.stage("scored").status == "pending"


# ----------------------------------------------------------------------------------------- backups, persist

def test_backup_path_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "trial_manifest.json"
    first = backup_path(path, "backup", now=FIXED)
    assert first.name == f"trial_manifest.json.backup.{STAMP}.json"
    first.write_text("taken")
    second = backup_path(path, "backup", now=FIXED)
    assert second.name == f"trial_manifest.json.backup.{STAMP}.1.json"
    second.write_text("taken")
    assert backup_path(path, "backup", now=FIXED).name == f"trial_manifest.json.backup.{STAMP}.2.json"
    assert backup_path(path, "corrupt", now=FIXED).name == f"trial_manifest.json.corrupt.{STAMP}"


def test_persist_v1_backs_up_then_upgrades(results_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = results_dir / "trial_manifest.json"
    original = (FIXTURES / "v1_fa4d8a6.json").read_bytes()
    path.write_bytes(original)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        upgraded = persist_lifecycle(path, context=context_for(results_dir))
    [backup] = copies(results_dir, "backup")
    assert backup.read_bytes() == original
    assert backup.name.endswith(".json")
    assert read_raw(path)[0] == "v2"
    assert upgraded is not None and upgraded.model_extra["job_counts"] == fixture("v1_fa4d8a6.json")["job_counts"]
    on_disk = json.loads(path.read_text())
    assert on_disk["datasets"] == fixture("v1_fa4d8a6.json")["datasets"]
    assert on_disk["lifecycle_history"][-1]["copy"] == backup.name
    assert [r.message for r in caplog.records] == [f"upgrade manifest {path}: v1 → v2 (backup {backup.name})"]
    # Second touch: already v2, nothing copied or rewritten.
    before = listing(results_dir)
    assert persist_lifecycle(path, context=context_for(results_dir)) == upgraded
    assert listing(results_dir) == before


def test_two_upgrades_in_the_same_instant_keep_both_backups(results_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "_now", lambda: FIXED)
    path = results_dir / "trial_manifest.json"
    originals = [(FIXTURES / "v1_fa4d8a6.json").read_bytes(), (FIXTURES / "v1_890c944.json").read_bytes()]
    for original in originals:
        path.write_bytes(original)
        persist_lifecycle(path)
    assert [p.name for p in copies(results_dir, "backup")] == [
        f"trial_manifest.json.backup.{STAMP}.1.json", f"trial_manifest.json.backup.{STAMP}.json"]
    assert (results_dir / f"trial_manifest.json.backup.{STAMP}.json").read_bytes() == originals[0]
    assert (results_dir / f"trial_manifest.json.backup.{STAMP}.1.json").read_bytes() == originals[1]


def test_persist_leaves_a_valid_v2_untouched(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    model = TrialManifest(run_id="r1", trial={"model_id": "m"}, temps=[0.0], samples_per_item={"0.0": 1})
    path.write_text(json.dumps(model.model_dump(mode="json")))
    before = listing(results_dir)
    assert persist_lifecycle(path) == model
    assert listing(results_dir) == before
    assert persist_lifecycle(results_dir / "absent.json") is None


CORRUPT = {
    "empty": b"",
    "truncated": (FIXTURES / "v1_fa4d8a6.json").read_bytes()[:200],
    "wrong_types": (FIXTURES / "v2_wrong_types.json").read_bytes(),
    "non_object": b'["t0_control"]',
    "not_utf8": b'{"run_id": "\xff"}',
}


@pytest.mark.parametrize("variant", sorted(CORRUPT))
def test_corrupt_manifest_is_quarantined_by_copy_and_rebuilt(results_dir: Path, variant: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_bytes(CORRUPT[variant])
    write_breadcrumbs(results_dir)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        rebuilt = persist_lifecycle(path, context=context_for(results_dir))
    [copy] = copies(results_dir, "corrupt")
    assert copy.read_bytes() == CORRUPT[variant] and not copy.name.endswith(".json")
    assert rebuilt is not None and read_raw(path)[0] == "v2"
    assert TrialManifest.model_validate_json(path.read_text()) == rebuilt
    assert (rebuilt.run_id, rebuilt.temps) == ("r1", [0.0])
    assert rebuilt.model_extra["recovered_parts"] == {
        "t0_control_p01": {"job_name": f"{ACCT}/batchInferenceJobs/job-c1", "job_id": "job-c1", "state": "completed",
                           "provider_state": "JOB_STATE_COMPLETED", "output_dataset_id": "job-c1-out",
                           "input_dataset_id": "job-c1-in", "source": "job.json"},
        "t0_control_p02": {"job_name": f"{ACCT}/batchInferenceJobs/job-c2", "job_id": "job-c2", "state": "running",
                           "provider_state": "JOB_STATE_RUNNING", "output_dataset_id": "job-c2-out",
                           "input_dataset_id": "job-c2-in", "source": "job.json"},
        "t0_treatment_p01": {"job_name": None, "job_id": None, "state": None, "provider_state": None,
                             "output_dataset_id": "job-t1-out", "input_dataset_id": None,
                             "source": "OUTPUT_DATASET_ID.txt"},
    }
    # A part record the corrupt file still holds (wrong_types: p02, for another job than job.json's) keeps its ids in
    # the tables, as in `parts`; breadcrumbs fill them for parts without a record.
    c2_job, c2_state, c2_dataset = (("old-job-c2", "submitting", "ds-c2") if variant == "wrong_types"
                                    else (f"{ACCT}/batchInferenceJobs/job-c2", "running", "job-c2-in"))
    assert rebuilt.jobs["t0_control"] == [f"{ACCT}/batchInferenceJobs/job-c1", c2_job]
    assert rebuilt.job_status["t0_control_p01"] == "completed"
    assert rebuilt.job_status["t0_control_p02"] == c2_state
    assert rebuilt.datasets["t0_control"] == ["job-c1-in", c2_dataset]
    assert rebuilt.model_extra["lifecycle_history"][-1]["copy"] == copy.name
    [line] = [r.message for r in caplog.records if r.message.startswith("repair manifest")]
    assert line.endswith(f"rebuilt from 4 breadcrumbs (copy at {copy.name})")


def test_wrong_types_rebuild_salvages_the_valid_keys(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_bytes(CORRUPT["wrong_types"])
    (results_dir / "t0_control_p01_job.json").write_text(json.dumps(job_json("job-c1")))
    rebuilt = persist_lifecycle(path, context=context_for(results_dir))
    assert rebuilt is not None
    dumped = rebuilt.model_dump(mode="json")
    assert dumped["temps"] == [0.0]  # from the context, not the corrupt file
    assert dumped["control_registry"] == {"t0": {"mode": "producer"}}
    assert dumped["custom_extension"] == {"keep": True}
    assert dumped["timestamps"]["created_at"] == "2025-09-01T00:00:00.000000Z"
    assert set(dumped["parts"]) == {"t0_control_p02"}  # the invalid p09 record is dropped, the valid one kept
    assert dumped["jobs"]["t0_control"] == [f"{ACCT}/batchInferenceJobs/job-c1", "old-job-c2"]  # breadcrumb wins for p01
    assert dumped["job_status"]["t0_control_p01"] == "completed"
    assert dumped["stage_status"]["parsed"]["status"] == "completed"
    assert dumped["stage_status"]["scored"]["status"] == "pending"
    assert set(dumped["lifecycle_history"][-1]["dropped_keys"]) == {"parts.t0_control_p09", "stage_status.scored"}


def test_rebuild_from_disk_with_no_breadcrumbs(results_dir: Path) -> None:
    rebuilt = rebuild_from_disk(results_dir, run_id="r1", trial={"model_id": "m"}, temps=[0.0, 0.7],
                                samples_per_item={"0.0": 1, "0.7": 2}, prompts={}, names=TRIAL_FILES)
    assert rebuilt.model_extra["recovered_parts"] == {}
    assert (rebuilt.jobs, rebuilt.job_status, rebuilt.samples_per_item) == ({}, {}, {"0.0": 1, "0.7": 2})


def test_hostile_breadcrumbs_are_skipped(results_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (results_dir / "t0_control_p01_job.json").write_text(json.dumps(job_json("good-job")))
    hostile = {
        "t0_control_p02_job.json": json.dumps(job_json("x", pad="a" * BREADCRUMB_MAX_BYTES)),
        "t0_control_p03_job.json": json.dumps(job_json("Bad_Id")),
        "t0_control_p04_job.json": json.dumps({**job_json("x"), "name": "../../../etc/passwd"}),
        "t0_control_p05_job.json": json.dumps({**job_json("x"), "name": f"{ACCT}/batchInferenceJobs/../y"}),
        "t0_control_p06_job.json": json.dumps({**job_json("x"), "name": f"{ACCT}/datasets/not-a-job"}),
        "t0_control_p07_job.json": json.dumps({**job_json("x"), "outputDatasetId": "/abs/path"}),
        "t0_control_p08_job.json": json.dumps({**job_json("x"), "state": "DROP TABLE"}),
        "t0_control_p09_job.json": "[" * 50_000,
        "t0_control_p10_job.json": '["not", "an", "object"]',
        "t0_control_p11_job.json": json.dumps({**job_json("x"), "name": "good-job\n"}),
        "t0_control_p00_job.json": json.dumps(job_json("x")),
        "..%2Fescape_job.json": json.dumps(job_json("x")),
        "t0_treatment_p01_OUTPUT_DATASET_ID.txt": "one\ntwo\n",
        "t0_treatment_p02_OUTPUT_DATASET_ID.txt": "../../secrets\n",
    }
    for name, text in hostile.items():
        (results_dir / name).write_text(text)
    os.mkfifo(results_dir / "t0_control_p12_job.json")  # opening it would block forever
    os.symlink(results_dir / "t0_control_p01_job.json", results_dir / "t0_control_p13_job.json")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        rebuilt = rebuild_from_disk(results_dir, **{k: v for k, v in context_for(results_dir)().items()
                                                    if k != "results_dir"})
    assert list(rebuilt.model_extra["recovered_parts"]) == ["t0_control_p01"]
    assert rebuilt.jobs == {"t0_control": [f"{ACCT}/batchInferenceJobs/good-job"]}
    skipped = {entry["file"] for entry in rebuilt.model_extra["lifecycle_history"][-1]["breadcrumbs_skipped"]}
    assert skipped == {*hostile, "t0_control_p12_job.json", "t0_control_p13_job.json"}
    assert len([r for r in caplog.records if r.message.startswith("skip breadcrumb")]) == len(skipped)


def test_disagreeing_breadcrumbs_prefer_the_job_record(results_dir: Path) -> None:
    (results_dir / "t0_control_p01_job.json").write_text(json.dumps(job_json("gen1", "JOB_STATE_RUNNING")))
    (results_dir / "t0_control_p01_OUTPUT_DATASET_ID.txt").write_text("gen0-out\n")
    rebuilt = rebuild_from_disk(results_dir, run_id="r1", trial={}, temps=[0.0], samples_per_item={}, prompts={},
                                names=TRIAL_FILES)
    assert rebuilt.model_extra["recovered_parts"]["t0_control_p01"]["output_dataset_id"] == "gen1-out"


def test_newer_schema_is_refused_not_rebuilt(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_text('{"schema_version": 3, "run_id": "r1"}')
    with pytest.raises(store.ManifestError, match="newer version"):
        persist_lifecycle(path, context=context_for(results_dir))
    assert copies(results_dir, "corrupt") == []


# --------------------------------------------------------------------------------------------- read-only open

@pytest.mark.parametrize(("content", "expected"), [
    ((FIXTURES / "v1_890c944.json").read_bytes(), "v1 manifest, upgraded in memory"),
    (CORRUPT["truncated"], "corrupt manifest (not valid JSON: Expecting property name enclosed in double quotes at "
                           "line 5 column 6), rebuilt in memory from 4 breadcrumbs"),
])
def test_read_only_open_writes_nothing(results_dir: Path, content: bytes, expected: str) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_bytes(content)
    write_breadcrumbs(results_dir)
    before = listing(results_dir.parent.parent)
    model, reason = open_trial_manifest(path, context=context_for(results_dir))
    assert model is not None and model.schema_version == 2
    assert reason == expected
    via_store = store.read(path, TrialManifest, context=context_for(results_dir))
    assert via_store is not None and via_store.jobs == model.jobs
    assert listing(results_dir.parent.parent) == before
    assert list(results_dir.glob("*.lock")) == []


def test_open_reports_each_kind(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    assert open_trial_manifest(path) == (None, "no manifest")
    path.write_bytes((FIXTURES / "v1_fa4d8a6.json").read_bytes())
    assert open_trial_manifest(path)[1] == "v1 manifest, upgraded in memory"
    path.write_bytes(b"")
    with pytest.raises(store.ManifestError, match="empty file"):
        open_trial_manifest(path)
    assert open_trial_manifest(path, context=context_for(results_dir))[1] == (
        "corrupt manifest (empty file), rebuilt in memory from 0 breadcrumbs")


def test_without_names_nothing_is_inferred_and_nothing_is_rebuilt(results_dir: Path) -> None:
    """`targets` knows no pipeline file names: a caller that gives none gets no inference, no mirrors, no rebuild."""
    make_artifacts(results_dir, all_parts=True, stats_version=2, full_costs=True)
    write_breadcrumbs(results_dir)
    assert {r.status for r in infer_stage_status(results_dir).values()} == {"pending"}
    assert lifecycle.read_breadcrumbs(results_dir).used == 0
    upgraded = upgrade_v1(fixture("v1_fa4d8a6.json"), results_dir=results_dir)
    assert upgraded.stage_status["downloaded"].status == "pending"
    path = results_dir / "trial_manifest.json"
    path.write_bytes(CORRUPT["truncated"])

    def nameless() -> dict[str, Any]:
        return {k: v for k, v in context_for(results_dir)().items() if k != "names"}

    with pytest.raises(store.ManifestError, match="lacks names"):
        open_trial_manifest(path, context=nameless)
    assert open_trial_manifest(path, context=nameless, names=TRIAL_FILES)[0] is not None
    assert path.read_bytes() == CORRUPT["truncated"]


# ------------------------------------------------------------------------------------------------ store hook

def test_store_update_upgrades_v1_before_the_change(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_bytes((FIXTURES / "v1_fa4d8a6.json").read_bytes())

    def change(manifest: TrialManifest | None) -> TrialManifest:
        assert manifest is not None and manifest.schema_version == 2
        manifest.set_stage("parsed", "completed", {"predictions_csv": "p.csv"})
        return manifest

    store.update(path, TrialManifest, change)
    assert len(copies(results_dir, "backup")) == 1
    on_disk = json.loads(path.read_text())
    assert on_disk["stage_status"]["parsed"]["status"] == "completed"
    assert on_disk["job_counts"] == fixture("v1_fa4d8a6.json")["job_counts"]
    assert on_disk["control_registry"] == fixture("v1_fa4d8a6.json")["control_registry"]


def test_store_refuses_a_corrupt_manifest_without_context(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_bytes(CORRUPT["truncated"])
    with pytest.raises(store.ManifestError, match="corrupt trial manifest"):
        store.read(path, TrialManifest)
    with pytest.raises(store.ManifestError, match="corrupt trial manifest"):
        store.update(path, TrialManifest, lambda m: m)
    assert path.read_bytes() == CORRUPT["truncated"]
    assert copies(results_dir, "corrupt") == []
    written = store.update(path, TrialManifest, lambda m: m, context=context_for(results_dir))
    assert written is not None and written.run_id == "r1"
    assert len(copies(results_dir, "corrupt")) == 1


# ------------------------------------------------------------------------------------------------ concurrency

def test_concurrent_threads_upgrade_once(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_bytes((FIXTURES / "v1_fa4d8a6.json").read_bytes())
    barrier = threading.Barrier(4)
    results: list[TrialManifest | None] = []

    def worker() -> None:
        barrier.wait()
        results.append(persist_lifecycle(path))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(copies(results_dir, "backup")) == 1
    assert len({json.dumps(r.model_dump(mode="json"), sort_keys=True) for r in results if r}) == 1
    assert len(results) == 4


def _persist_in_child(path: str, barrier: Any) -> None:
    barrier.wait()
    persist_lifecycle(Path(path))


def test_concurrent_processes_upgrade_once(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    path.write_bytes((FIXTURES / "v1_890c944.json").read_bytes())
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_persist_in_child, args=(str(path), barrier)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=30)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert len(copies(results_dir, "backup")) == 1
    assert read_raw(path)[0] == "v2"
