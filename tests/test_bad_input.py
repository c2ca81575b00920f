"""The bad-input matrix: malformed or hostile input from outside gives a clear error or is accounted for, and
nothing already done is lost."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import PIPELINE_RUN, small_experiment

pytestmark = pytest.mark.slow
RID = "bad"


def luigi_run(root: Path, config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run([*PIPELINE_RUN, "TrialReport", "--rid", RID, "--root", str(root),
                           "--config", str(config), "--local-scheduler"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=root.parent)


def faults(base_url: str, rules: list[dict]) -> None:
    answer = requests.post(base_url + "/emulator/faults", json={"rules": rules}, timeout=5)
    assert answer.status_code == 200, answer.text


def results_of(run_dir: Path, pattern: str) -> list[dict]:
    (path,) = [p for p in run_dir.glob(f"*/results/{pattern}/results.jsonl")]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_untidy_provider_output_is_accounted_per_custom_id(tmp_path: Path, emulator: str) -> None:
    faults(emulator, [
        {"fault": "missing_results", "fraction": 0.5, "match": "ex-t0-cont-p01-", "times": 0},
        {"fault": "duplicate_lines", "match": "ex-t0-cont-p02-", "times": 0},
        {"fault": "garbage", "match": "ex-t0-cont-p03-", "times": 1},
        {"fault": "truncated", "mode": "short_body", "match": "ex-t0-cont-p04-", "times": 1},
        {"fault": "error_rows", "fraction": 0.5, "match": "ex-t07-cont-p01-"},
    ])
    run = luigi_run(tmp_path / "exp", small_experiment(tmp_path, lines_per_part=3))
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "exp" / f"run_{RID}"
    missing = results_of(run_dir, "t0_control_p01")
    assert any(r.get("error", {}).get("code") == "missing" for r in missing)
    assert "have no result; recorded as provider errors" in run.stderr
    dup = results_of(run_dir, "t0_control_p02")
    assert len({r["custom_id"] for r in dup}) == len(dup)
    assert all("(second copy)" not in json.dumps(r) for r in dup), "the first answer wins, deterministically"
    for key in ("t0_control_p03", "t0_control_p04"):  # bad first download, good second one
        assert all("response" in r for r in results_of(run_dir, key))
    errors = results_of(run_dir, "t07_control_p01")
    assert any("error" in r and "response" not in r for r in errors)
    report = next(run_dir.glob("*/reports/report.md")).read_text()
    assert "provider_error" in report


@pytest.mark.parametrize(("rule", "needle"), [
    ({"fault": "zip_bomb", "bytes": 2**26}, "above the limit"),
    ({"fault": "path_traversal"}, "contains '..', refused"),
    ({"fault": "file_url"}, "refusing URL scheme file://"),
    ({"fault": "oversized", "bytes": 3 * 2**20}, "exceeds the limit"),
])
def test_hostile_downloads_are_refused_with_a_clear_error_and_nothing_is_lost(tmp_path: Path, emulator: str,
                                                                              rule: dict, needle: str) -> None:
    faults(emulator, [{**rule, "match": "ex-t0-trea-p01-", "times": 0}])
    config = small_experiment(tmp_path, max_download_bytes=2 * 2**20)
    first = luigi_run(tmp_path / "exp", config)
    assert first.returncode == 30
    assert needle.lower() in first.stderr.lower(), first.stderr[-3000:]
    assert "t0_treatment_p01" in first.stderr
    run_dir = tmp_path / "exp" / f"run_{RID}"
    done_parts = sorted(p.parent.name for p in run_dir.glob("*/results/*/results.jsonl"))
    assert done_parts and "t0_treatment_p01" not in done_parts
    assert not list(run_dir.rglob("evil.jsonl")) and not (tmp_path / "evil.jsonl").exists()
    created = requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"]
    requests.delete(emulator + "/emulator/faults", timeout=5)
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/results/*/results.jsonl")}
    second = luigi_run(tmp_path / "exp", config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "parts already downloaded are kept as they are"
    assert requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"] == created


def test_malformed_prepared_data_names_file_and_line(tmp_path: Path) -> None:
    config = small_experiment(tmp_path)
    data = tmp_path / "data" / "open_book.jsonl"
    lines = data.read_text().splitlines()
    lines[2] = lines[2][:-5]
    data.write_text("\n".join(lines) + "\n")
    run = luigi_run(tmp_path / "exp", config)
    assert run.returncode == 30
    assert f"{data}:3" in run.stderr


@pytest.mark.parametrize("content", ["{not json\n", '{"custom_id": "x|y|control|0.0|0|open", "response": {}}\n',
                                     "x" * (17 * 2**20) + "\n"])
def test_damaged_results_file_is_repaired_not_trusted(tmp_path: Path, content: str) -> None:
    config = small_experiment(tmp_path)
    assert luigi_run(tmp_path / "exp", config).returncode == 0
    run_dir = tmp_path / "exp" / f"run_{RID}"
    target = sorted(run_dir.glob("*/results/t0_control_p01/results.jsonl"))[0]
    good = target.read_bytes()
    target.write_text(content)
    again = luigi_run(tmp_path / "exp", config)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "results.jsonl changed since it was downloaded" in again.stderr
    assert target.read_bytes() == good


def test_failed_job_is_resubmitted_once_and_expired_job_keeps_its_partial_rows(tmp_path: Path, emulator: str) -> None:
    faults(emulator, [
        {"fault": "job_state", "state": "JOB_STATE_FAILED", "match": "ex-t0-trea-p01-", "times": 1},
        {"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5, "match": "ex-t0-cont-p02-", "times": 1},
    ])
    run = luigi_run(tmp_path / "exp", small_experiment(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "downgrade part t0_treatment_p01" in run.stderr and "JOB_STATE_FAILED" in run.stderr
    assert "accept partial" in run.stderr
    run_dir = tmp_path / "exp" / f"run_{RID}"
    expired = results_of(run_dir, "t0_control_p02")
    assert any(r.get("error", {}).get("code") == "missing" for r in expired)
    assert any("response" in r for r in expired)
    manifests = [json.loads(p.read_text()) for p in run_dir.glob("*/results/trial_manifest.json")]
    resubmitted = [m["parts"]["t0_treatment_p01"] for m in manifests if "t0_treatment_p01" in m["parts"]]
    assert sorted((p["generation"], p["resubmissions"]) for p in resubmitted) == [(0, 0), (1, 1)], "one rule firing once"
    created = requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"]
    assert all(n == 1 for n in created.values())


def test_a_job_that_fails_again_after_its_resubmission_stops_with_a_clear_error(tmp_path: Path, emulator: str) -> None:
    faults(emulator, [{"fault": "job_state", "state": "JOB_STATE_FAILED", "message": "bad role bananas",
                       "match": "ex-t0-trea-p01-", "times": 0}])
    run = luigi_run(tmp_path / "exp", small_experiment(tmp_path))
    assert run.returncode == 30
    assert "already resubmitted once" in run.stderr and "bad role bananas" in run.stderr


@pytest.mark.parametrize("present", [{}, {"FIREWORKS_API_KEY": "k"}, {"FIREWORKS_ACCOUNT_ID": "a"}])
def test_missing_credentials_stop_the_run_before_anything_is_frozen_or_built(tmp_path: Path, present: dict) -> None:
    config = small_experiment(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["provider"]["name"] = "fireworks"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREWORKS_", "LUIGI_CONFIG_PATH"))}
    root = tmp_path / "exp"
    run = subprocess.run([*PIPELINE_RUN, "TrialReport", "--rid", RID, "--root", str(root), "--config", str(config)],
                         capture_output=True, text=True, env={**env, **present}, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    missing = [name for name in ("FIREWORKS_API_KEY", "FIREWORKS_ACCOUNT_ID") if name not in present]
    assert all(name in run.stderr for name in missing)
    assert "Traceback" not in run.stderr
    assert not (root / f"run_{RID}").exists() or not list((root / f"run_{RID}").rglob("*.json*"))


@pytest.mark.parametrize("allowed", [False, True])
def test_a_model_without_rates_is_warned_by_plan_and_refused_unless_allowed(tmp_path: Path, allowed: bool) -> None:
    config = small_experiment(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["model_id"] = "accounts/fireworks/models/gpt-oss-999b"
    raw["pricing"]["allow_unlisted_models"] = allowed
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = tmp_path / "exp"
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    common = ["--rid", RID, "--root", str(root), "--config", str(config)]
    plan = subprocess.run([*PIPELINE_RUN[:-1], "plan", *common], capture_output=True, text=True, env=env, timeout=120)
    assert plan.returncode == 0, plan.stderr
    warning = [line for line in plan.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "gpt-oss-999b" in warning[0] and "pricing.allow_unlisted_models" in warning[0]
    run = subprocess.run([*PIPELINE_RUN, "TrialReport", *common], capture_output=True, text=True, env=env, timeout=300)
    if allowed:
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        assert run.returncode == 2, run.stderr[-3000:]
        assert "gpt-oss-999b" in run.stderr and "pricing.allow_unlisted_models: true" in run.stderr
        assert not (root / f"run_{RID}" / "effective_config.yaml").exists()
