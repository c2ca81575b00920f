"""The default experiment, end to end, through the `luigi` command against the embedded emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from targets.atomic import pid_alive
from tests.conftest import PIPELINE_RUN, REPO, emulator_calls, emulator_job

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
RID = "e2e"


def luigi_cmd(root: Path, *extra: str, rid: str = RID, cwd: Path | None = None) -> subprocess.CompletedProcess:
    args = [*PIPELINE_RUN, "TrialReport", "--rid", rid, "--root", str(root),
            "--local-scheduler", *extra]
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd or root, env=env)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("e2e")
    config = base / "config"
    import shutil

    shutil.copytree(REPO / "config", config)
    raw = yaml.safe_load((config / "experiment.yaml").read_text())
    raw["paths"]["prepared_dir"] = str(REPO / "data" / "sample")
    raw["provider"]["latency_s"] = 0.2
    (config / "experiment.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    root = base / "experiments"
    first = luigi_cmd(root, "--config", str(config / "experiment.yaml"), cwd=base)
    return {"root": root, "run_dir": root / f"run_{RID}", "config": config / "experiment.yaml", "first": first,
            "base": base}


def trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in run_dir.glob("*/results/trial_manifest.json"))


def test_first_run_writes_every_report(experiment: dict) -> None:
    first = experiment["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = experiment["run_dir"]
    trials = trial_dirs(run_dir)
    assert len(trials) == 2
    for trial in trials:
        report = (trial / "reports" / "report.md").read_text()
        assert "## Results @ T=0.7" in report and "McNemar" in report
        sig = json.loads((trial / "results" / "significance.json").read_text())
        assert sig["schema_version"] == 2 and set(sig["results"]) == {"0.0", "0.7"}
        manifest = json.loads((trial / "results" / "trial_manifest.json").read_text())
        assert manifest["schema_version"] == 2
        assert all(manifest["stage_status"][s]["status"] == "completed"
                   for s in ("downloaded", "parsed", "scored", "stats", "costs", "report"))
    assert (run_dir / "aggregate_report.md").read_text().startswith("# Aggregate Trial Comparison")
    assert (run_dir / "effective_config.yaml").exists()


def test_jobs_carry_each_trials_own_parameters(experiment: dict) -> None:
    run_dir = experiment["run_dir"]
    effective = yaml.safe_load((run_dir / "effective_config.yaml").read_text())
    for trial in trial_dirs(run_dir):
        manifest = json.loads((trial / "results" / "trial_manifest.json").read_text())
        for part in manifest["parts"].values():
            job = emulator_job(run_dir, part["job_id"])
            assert job["model"] == manifest["trial"]["model_id"]
            params = job["inferenceParameters"]
            kind = "open_book" if part["type"] == "open" else "closed_book"
            assert params["maxTokens"] == effective["max_new_tokens"][kind]
            assert params["topP"] == effective["top_p"] and params["topK"] == effective["top_k"]


def test_each_part_submitted_exactly_once_and_controls_shared(experiment: dict) -> None:
    run_dir = experiment["run_dir"]
    calls = emulator_calls(run_dir)
    owned = {}
    for trial in trial_dirs(run_dir):
        manifest = json.loads((trial / "results" / "trial_manifest.json").read_text())
        owned.update({p["job_id"]: p for p in manifest["parts"].values()})
    assert set(calls["job_creates"]) == set(owned)
    assert all(n == 1 for n in calls["job_creates"].values())
    # 2 temps x (control shared + 2 treatments) x parts: controls are not paid twice
    controls = [p for p in owned.values() if p["group"].endswith("control")]
    treatments = [p for p in owned.values() if p["group"].endswith("treatment")]
    assert len(treatments) == 2 * len(controls)


def test_second_run_does_nothing(experiment: dict) -> None:
    before = emulator_calls(experiment["run_dir"])
    again = luigi_cmd(experiment["root"], cwd=experiment["base"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done " not in again.stderr.replace("Done", "")
    assert "skip report run=e2e (aggregate)" in again.stderr
    assert "verified complete before, and none of its" in again.stderr, "one walk instead of the graph's predicates"
    assert again.stderr.count(" pipeline: ") == 1, again.stderr[-3000:]
    assert emulator_calls(experiment["run_dir"]) == before


def test_deleted_predictions_rerun_only_that_trial(experiment: dict) -> None:
    first, second = trial_dirs(experiment["run_dir"])
    other_report = second / "reports" / "report.md"
    stamp = other_report.stat().st_mtime_ns
    (first / "results" / "predictions.csv").unlink()
    plan = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--rid", RID, "--root", str(experiment["root"])],
                          capture_output=True, text=True, timeout=120)
    assert f"to run  parsed     trial={first.name}" in plan.stdout
    assert f"to run  parsed     trial={second.name}" not in plan.stdout
    again = luigi_cmd(experiment["root"], cwd=experiment["base"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"done parsed trial={first.name}" in again.stderr
    assert f"done parsed trial={second.name}" not in again.stderr
    assert "predictions.csv is missing" in again.stderr
    assert other_report.stat().st_mtime_ns == stamp


def test_edited_results_are_downloaded_again_never_resent(experiment: dict) -> None:
    """A hand-edited results.jsonl is not what the provider answered: the part is downloaded again (no job is
    created), and the trial's downstream stages are current again with the provider's answers."""
    run_dir = experiment["run_dir"]
    owner = trial_dirs(run_dir)[0]
    part = sorted((owner / "results").glob("t07_treatment_p*/results.jsonl"))[0]
    original = part.read_bytes()
    predictions = (owner / "results" / "predictions.csv").read_bytes()
    lines = part.read_text().splitlines()
    row = json.loads(lines[0])
    row["response"]["choices"][0]["message"]["content"] = "an edited answer"
    lines[0] = json.dumps(row, sort_keys=True)
    part.write_text("\n".join(lines) + "\n")
    creates = emulator_calls(run_dir)
    again = luigi_cmd(experiment["root"], cwd=experiment["base"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "results.jsonl changed since it was downloaded" in again.stderr
    assert f"done downloaded trial={owner.name} part={part.parent.name}" in again.stderr
    assert part.read_bytes() == original
    assert (owner / "results" / "predictions.csv").read_bytes() == predictions
    after = emulator_calls(run_dir)
    assert (after["job_creates"], after["dataset_creates"]) == (creates["job_creates"], creates["dataset_creates"])
    assert "submit job" not in again.stderr


def test_plan_is_read_only_and_reports_done(experiment: dict) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--rid", RID, "--root", str(experiment["root"])],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "done    report" in out.stdout and "0 to run" in out.stdout
    fresh = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--rid", "never-run", "--root",
                            str(experiment["root"]), "--config", str(experiment["config"])],
                           capture_output=True, text=True, env=env, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert "to run  prepared" in fresh.stdout
    assert not (experiment["root"] / "run_never-run").exists()


def test_config_drift_refused_then_accepted(experiment: dict) -> None:
    raw = yaml.safe_load(experiment["config"].read_text())
    raw["stats"]["bootstrap_samples"] = 1000
    drifted = experiment["config"].with_name("drifted.yaml")
    drifted.write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = luigi_cmd(experiment["root"], "--config", str(drifted), cwd=experiment["base"])
    assert refused.returncode == 3
    assert "stats.bootstrap_samples: 2000 -> 1000" in refused.stderr
    accepted = luigi_cmd(experiment["root"], "--config", str(drifted), "--accept-config-drift", cwd=experiment["base"])
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    state = json.loads((experiment["run_dir"] / "run_state.json").read_text())
    assert state["config_drift"] and state["config_drift"][-1]["accepted"] is True
    assert "done stats" in accepted.stderr and "submit job" not in accepted.stderr


def test_the_emulator_a_run_starts_ends_with_the_run(experiment: dict) -> None:
    state = experiment["run_dir"] / ".emulator"
    started = json.loads((state / "started_by.json").read_text())
    assert started["owner"] and started["pid"]
    assert not pid_alive(int(started["pid"])), "the run's emulator outlived the run"
