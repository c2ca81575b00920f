"""Repair loses nothing: a trial manifest replaced with garbage comes back with every part record and download entry
(from the per-part mirrors `<jkey>_part.json`), so money, part states, the budget check and the reports' provenance
are the same before and after, and no job is created again. What cannot be recovered counts as committed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import budget
from pipeline.control import exit_codes
from pipeline.control.layout import TRIAL_FILES
from pipeline.control.run import open_run
from targets import store
from targets.lifecycle import BREADCRUMB_MAX_BYTES, persist_lifecycle, read_breadcrumbs
from targets.manifest import PartRecord, TrialManifest
from tests.conftest import Provider, emulator_calls, run_luigi, small_experiment, stop_emulator_server

ACCT = "accounts/acme"
GARBAGE = b"\x00\xffnot a manifest\x9c" * 64
_JKEY_ROW = re.compile(r"^\| (?:\S+/)?t[0-9]+_(?:control|treatment)_p[0-9]{2,} \| .*\|$", re.MULTILINE)


# ------------------------------------------------------------------------------------------------ helpers

def context_for(results_dir: Path) -> Any:
    def context() -> dict[str, Any]:
        return {"run_id": "r1", "trial": {"model_id": "m"}, "temps": [0.0], "samples_per_item": {"0.0": 1},
                "prompts": {}, "results_dir": results_dir, "names": TRIAL_FILES}
    return context


def record(index: int, **fields: Any) -> PartRecord:
    return PartRecord(**{"group": "t0_control", "index": index, "type": "closed",
                         "input_path": f"batch_inputs/t0_control.p{index:02d}.jsonl", "input_sha256": "ab" * 32,
                         "lines": 6, "model": "m", "inference_parameters": {"maxTokens": 8},
                         "dataset_id": f"ds-{index}", "job_id": f"job-{index}", "output_dataset_id": f"out-{index}",
                         **fields})


def download(jkey: str) -> dict[str, Any]:
    return {"job_key": jkey, "path": f"trial/results/{jkey}/results.jsonl", "sha256": "cd" * 32, "size": 10,
            "mtime_ns": 1, "rows": 6, "request_sha256": "ef" * 32}


def set_part(path: Path, jkey: str, part: PartRecord) -> None:
    def change(manifest: TrialManifest | None) -> TrialManifest:
        manifest = manifest or TrialManifest(run_id="r1", trial={"model_id": "m"}, temps=[0.0],
                                             samples_per_item={"0.0": 1})
        manifest.set_part(jkey, part)
        return manifest

    store.update(path, TrialManifest, change, context=context_for(path.parent))


def set_download(path: Path, entry: dict[str, Any]) -> None:
    def change(manifest: TrialManifest | None) -> TrialManifest:
        assert manifest is not None
        stage = manifest.stage("downloaded")
        parts = [p for p in stage.artifacts.get("parts", []) if p["job_key"] != entry["job_key"]]
        manifest.set_stage("downloaded", "in_progress", {**stage.artifacts, "parts": [*parts, entry]})
        return manifest

    store.update(path, TrialManifest, change, context=context_for(path.parent))


def stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def job_json(job_id: str, state: str) -> dict[str, Any]:
    return {"name": f"{ACCT}/batchInferenceJobs/{job_id}", "state": state,
            "inputDatasetId": f"{ACCT}/datasets/{job_id}-in", "outputDatasetId": f"{ACCT}/datasets/{job_id}-out"}


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run_r1" / "trial" / "results"
    path.mkdir(parents=True)
    return path


# ------------------------------------------------------------------------------------------ mirrors (unit)

def test_every_manifest_write_mirrors_exactly_the_parts_it_changed(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    set_part(path, "t0_control_p01", record(1, state="submitting", estimated_usd=0.25))
    p01 = results_dir / "t0_control_p01_part.json"
    mirror = json.loads(p01.read_text())
    assert mirror["job_key"] == "t0_control_p01" and mirror["download"] is None
    assert mirror["record"] == json.loads(path.read_text())["parts"]["t0_control_p01"]

    first = stamp(p01)
    set_part(path, "t0_control_p02", record(2))
    assert stamp(p01) == first, "a part the write did not change is not rewritten"
    store.update(path, TrialManifest, lambda m: m, context=context_for(results_dir))
    assert stamp(p01) == first and (results_dir / "t0_control_p02_part.json").is_file()

    set_download(path, download("t0_control_p01"))
    assert json.loads(p01.read_text())["download"] == download("t0_control_p01")

    p01.unlink()  # lost (or written before mirrors existed): the next write of the manifest puts it back
    set_part(path, "t0_control_p02", record(2, state="uploaded"))
    assert json.loads(p01.read_text())["download"] == download("t0_control_p01")


def test_a_garbage_manifest_is_rebuilt_with_every_record_and_download_entry(results_dir: Path) -> None:
    path = results_dir / "trial_manifest.json"
    set_part(path, "t0_control_p01", record(1, state="completed", estimated_usd=0.5, generation=1, resubmissions=1,
                                            provider_state="JOB_STATE_COMPLETED", progress={"percent": 100},
                                            history=[{"generation": 0, "job_id": "job-0", "reason": "FAILED"}],
                                            future_field={"kept": True}))
    set_part(path, "t0_control_p02", record(2, state="running", estimated_usd=0.5))
    set_download(path, download("t0_control_p01"))
    original = TrialManifest.model_validate_json(path.read_text())
    path.write_bytes(GARBAGE)

    rebuilt = persist_lifecycle(path, context=context_for(results_dir))
    assert rebuilt is not None
    assert rebuilt.parts == original.parts
    assert rebuilt.parts["t0_control_p01"].model_extra == {"future_field": {"kept": True}}
    assert rebuilt.stage("downloaded").artifacts["parts"] == [download("t0_control_p01")]
    assert (rebuilt.jobs, rebuilt.datasets, rebuilt.job_status) == (original.jobs, original.datasets,
                                                                    original.job_status)
    event = rebuilt.model_extra["lifecycle_history"][-1]
    assert event["part_records_recovered"] == ["t0_control_p01", "t0_control_p02"]


@pytest.mark.parametrize(("state", "crumb", "expected"), [
    ("submitting", ("job-1", "JOB_STATE_PENDING"), ("submitted", "JOB_STATE_PENDING")),  # the job exists after all
    ("running", ("job-1", "JOB_STATE_COMPLETED"), ("running", "JOB_STATE_RUNNING")),  # the next poll learns it again
    ("submitting", ("job-0", "JOB_STATE_FAILED"), ("submitting", "JOB_STATE_RUNNING")),  # another job: ignored
])
def test_job_json_moves_a_record_on_only_to_the_job_it_proves(results_dir: Path, state: str,
                                                              crumb: tuple[str, str], expected: tuple[str, str]) -> None:
    path = results_dir / "trial_manifest.json"
    set_part(path, "t0_control_p01", record(1, state=state, provider_state="JOB_STATE_RUNNING"))
    (results_dir / "t0_control_p01_job.json").write_text(json.dumps(job_json(*crumb)))
    path.write_bytes(GARBAGE)
    rebuilt = persist_lifecycle(path, context=context_for(results_dir))
    assert rebuilt is not None
    part = rebuilt.parts["t0_control_p01"]
    assert (part.state, part.provider_state) == expected
    assert rebuilt.job_status["t0_control_p01"] == expected[0]


def test_hostile_part_mirrors_are_skipped_with_a_reason(results_dir: Path) -> None:
    good = {"schema_version": 1, "job_key": "t0_control_p01", "record": record(1).model_dump(mode="json"),
            "download": None}
    (results_dir / "t0_control_p01_part.json").write_text(json.dumps(good))
    hostile = {
        "t0_control_p02_part.json": json.dumps({**good, "job_key": "t0_control_p02"}),  # record of p01 under p02
        "t0_control_p03_part.json": json.dumps({**good, "job_key": "t0_control_p01"}),
        "t0_control_p04_part.json": json.dumps({**good, "job_key": "t0_control_p04",
                                                "record": record(4, job_id="../../etc").model_dump(mode="json")}),
        "t0_control_p05_part.json": json.dumps({**good, "job_key": "t0_control_p05", "record": None,
                                                "download": {**download("t0_control_p05"), "path": "../../x"}}),
        "t0_control_p06_part.json": json.dumps({**good, "job_key": "t0_control_p06", "record": {"group": 1}}),
        "t0_control_p07_part.json": json.dumps({**good, "schema_version": 99}),
        "t0_control_p08_part.json": "{" * 50_000,
        "t0_control_p09_part.json": json.dumps({**good, "pad": "a" * BREADCRUMB_MAX_BYTES}),
        "t0_control_p10_part.json": json.dumps({**good, "job_key": "t0_control_p10", "record": None}),
    }
    for name, text in hostile.items():
        (results_dir / name).write_text(text)
    os.symlink(results_dir / "t0_control_p01_part.json", results_dir / "t0_control_p11_part.json")
    found = read_breadcrumbs(results_dir, TRIAL_FILES)
    assert list(found.records) == ["t0_control_p01"] and found.downloads == {}
    assert {s["file"] for s in found.skipped} == {*hostile, "t0_control_p11_part.json"}
    assert all(s["reason"] for s in found.skipped)


# --------------------------------------------------------------------------------------------- end to end

def status(root: Path, rid: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "pipeline", "status", "--rid", rid, "--root", str(root), "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def money_and_parts(view: dict[str, Any]) -> dict[str, Any]:
    return {"committed": view["budget"]["committed_usd"], "spent": view["budget"]["spent_usd"],
            "parts": {t["trial"]: t["parts"] for t in view["trials"]}}


def manifests(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*/results/trial_manifest.json"))


def parts_of(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every trial's part records as the pipeline reads them (a corrupt manifest repaired in memory; a run that wrote
    nothing since leaves it corrupt on disk), without their `updated_at` stamps."""
    run = open_run(run_dir.name.removeprefix("run_"), run_dir.parent)
    found = {}
    for trial in run.trials:
        manifest = budget.trial_manifest(run, trial.slug)
        assert manifest is not None
        found[trial.slug] = {jkey: part.model_dump(mode="json", exclude={"updated_at"})
                             for jkey, part in manifest.parts.items()}
    return found


def garbage_every_manifest(run_dir: Path) -> None:
    found = manifests(run_dir)
    assert found
    for path in found:
        path.write_bytes(GARBAGE)


def creates(run_dir: Path) -> dict[str, dict[str, int]]:
    calls = emulator_calls(run_dir)
    return {kind: calls[kind] for kind in ("dataset_creates", "job_creates")}


def provenance(run_dir: Path) -> dict[str, list[str]]:
    """The job rows of every trial report's provenance table (part, job id, state)."""
    return {p.parent.parent.name: _JKEY_ROW.findall(p.read_text()) for p in sorted(run_dir.glob("*/reports/report.md"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("repair")
    config = small_experiment(base)
    root = base / "exp"
    done = run_luigi(root, config, "fin")
    assert done.returncode == exit_codes.OK, done.stderr[-3000:]
    return {"root": root, "config": config, "run_dir": root / "run_fin"}


@pytest.mark.e2e
def test_garbage_manifests_of_a_finished_run_lose_no_money_state_or_provenance(finished: dict[str, Any]) -> None:
    root, run_dir = finished["root"], finished["run_dir"]
    before, parts, reports, sent = status(root, "fin"), parts_of(run_dir), provenance(run_dir), creates(run_dir)
    assert money_and_parts(before)["committed"] > 0 and all(rows for rows in reports.values())
    garbage_every_manifest(run_dir)

    assert money_and_parts(status(root, "fin")) == money_and_parts(before), "the read-only repair shows the same"

    again = run_luigi(root, None, "fin")
    assert again.returncode == exit_codes.OK, again.stderr[-3000:]
    assert creates(run_dir) == sent, "no dataset or job is created again"
    assert "done downloaded" not in again.stderr, "no part is downloaded again"
    assert parts_of(run_dir) == parts
    assert money_and_parts(status(root, "fin")) == money_and_parts(before)
    assert provenance(run_dir) == reports


@pytest.mark.e2e
def test_a_part_known_only_from_its_job_json_counts_as_committed(finished: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(finished["run_dir"], tmp_path / "run_fin", ignore=shutil.ignore_patterns("*.lock"))
    run = open_run("fin", tmp_path)
    committed = budget.committed_usd(run)
    owner = next(t.slug for t in run.trials
                 if list(run.layout.results_dir(t.slug).glob("*_part.json")))
    results = run.layout.results_dir(owner)
    jkey = sorted(p.name.removesuffix("_part.json") for p in results.glob("*_part.json"))[0]
    run.layout.part_breadcrumb(owner, jkey).unlink()  # its record cannot be recovered: only job.json is left
    garbage_every_manifest(run.layout.run_dir)

    rebuilt = budget.trial_manifest(open_run("fin", tmp_path), owner)
    assert rebuilt is not None and jkey not in rebuilt.parts and jkey in rebuilt.model_extra["recovered_parts"]
    # Priced from its request file: exactly the estimate its lost record held.
    assert budget.committed_usd(open_run("fin", tmp_path)) == pytest.approx(committed, abs=1e-6)

    record = json.loads((finished["run_dir"] / owner / "results" / f"{jkey}_part.json").read_text())["record"]
    (run.layout.run_dir / record["input_path"]).unlink()  # its request file is gone too: the trial's largest estimate
    fallback = budget.committed_usd(open_run("fin", tmp_path))
    assert fallback >= committed - 1e-6 and fallback > 0


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    emulator = Provider(tmp_path / "exp" / "run_nw")
    yield emulator
    stop_emulator_server(emulator.server)


@pytest.mark.e2e
def test_garbage_manifests_of_a_waiting_run_keep_its_running_parts(tmp_path: Path, provider: Provider) -> None:
    config, root = small_experiment(tmp_path), tmp_path / "exp"
    run_dir = root / "run_nw"
    first = run_luigi(root, config, "nw", "--no-wait")
    assert first.returncode == exit_codes.WAITING, first.stderr[-3000:]
    before, parts, sent = status(root, "nw"), parts_of(run_dir), creates(run_dir)
    assert {state for trial in money_and_parts(before)["parts"].values() for state in trial} == {"running"}
    garbage_every_manifest(run_dir)

    assert money_and_parts(status(root, "nw")) == money_and_parts(before)
    again = run_luigi(root, config, "nw", "--no-wait")
    assert again.returncode == exit_codes.WAITING, again.stderr[-3000:]
    assert creates(run_dir) == sent
    assert parts_of(run_dir) == parts
    assert money_and_parts(status(root, "nw")) == money_and_parts(before)

    provider.clock.advance(120)
    done = run_luigi(root, config, "nw", "--no-wait")
    assert done.returncode == exit_codes.OK, done.stderr[-3000:]
    assert creates(run_dir) == sent


@pytest.mark.e2e
def test_the_budget_still_refuses_after_the_manifests_are_lost(tmp_path: Path) -> None:
    config, root = small_experiment(tmp_path), tmp_path / "exp"
    full = budget.plan_estimate(open_run("b", root, config))["total"].usd
    raw = yaml.safe_load(config.read_text())
    raw["budget"] = {"max_usd": round(full / 2, 6)}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = root / "run_b"

    stopped = run_luigi(root, config, "b")
    assert stopped.returncode == exit_codes.BUDGET_EXCEEDED, stopped.stderr[-3000:]
    sent, committed = creates(run_dir), budget.committed_usd(open_run("b", root))
    assert sent["job_creates"] and 0 < committed <= full / 2 + 1e-9
    garbage_every_manifest(run_dir)
    assert budget.committed_usd(open_run("b", root)) == pytest.approx(committed, abs=1e-9)

    again = run_luigi(root, config, "b")
    assert again.returncode == exit_codes.BUDGET_EXCEEDED, again.stderr[-3000:]
    assert "over budget.max_usd" in again.stderr
    assert creates(run_dir)["job_creates"] == sent["job_creates"], "no part is sent past the budget"
    assert budget.committed_usd(open_run("b", root)) == pytest.approx(committed, abs=1e-9)
