"""Requests a batch ended without an answer for are sent again, once, in a follow-up batch of just those requests
(OpenAI and Anthropic); the follow-up is paid once, counted in the budget, and a second failure stays an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.budget import committed_usd
from pipeline.control.run import open_run
from pipeline.parsing import has_answer
from tests.conftest import emulator_calls, run_emulator, run_luigi
from tests.test_providers import RID, provider_experiment

pytestmark = pytest.mark.slow
PART = "t0_treatment_p01"
# The faulted part's batches (one trial: the only closed-book treatment part at T=0): OpenAI matches the client_key
# (the part's job id, and its follow-up's `...-p01-resend-...`), Anthropic the first custom id of the requests.
SUBJECT = {"openai": r"^ex-t0-trea-p01-", "anthropic": r"\|treatment\|0\.0\|[0-9]+\|closed$"}


def one_trial_experiment(base: Path, api: str) -> Path:
    config = provider_experiment(base, api)
    raw = yaml.safe_load(config.read_text())
    raw["sweep"]["prompt_sets"] = ["excellence"]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def faulted_part(run_dir: Path) -> tuple[dict, list[dict]]:
    """The record of the part with a follow-up (both trials have a `PART`, each its own requests) and its results."""
    found = []
    for manifest in run_dir.glob("*/results/trial_manifest.json"):
        record = json.loads(manifest.read_text())["parts"].get(PART)
        if record and record.get("followup"):
            lines = (manifest.parent / PART / "results.jsonl").read_text().splitlines()
            found.append((record, [json.loads(line) for line in lines]))
    assert len(found) == 1, f"{len(found)} parts {PART} have a follow-up"
    return found[0]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("times", [1, 2], ids=["recovered", "fails-again"])
def test_failed_requests_are_sent_again_once(tmp_path: Path, api: str, times: int) -> None:
    config = one_trial_experiment(tmp_path, api)
    root = tmp_path / "experiments"
    # times=2: the follow-up expires too
    plan = {"rules": [{"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5, "match": SUBJECT[api],
                       "times": times}]}
    with run_emulator(root, RID) as base_url:
        assert requests.post(f"{base_url}/emulator/faults", json=plan, timeout=5).status_code == 200
        done = run_luigi(root, config, RID)
        again = run_luigi(root, config, RID)
    assert done.returncode == 0, done.stderr[-3000:]
    assert again.returncode == 0, again.stderr[-3000:]
    run_dir = root / f"run_{RID}"
    record, rows = faulted_part(run_dir)
    answered = sum(has_answer(row) for row in rows)
    follow = record["followup"]
    assert follow["state"] == "completed" and 0 < follow["lines"] < record["lines"]
    assert len(rows) == record["lines"]
    if times == 1:
        assert answered == record["lines"], "the follow-up's answers replace the expired requests"
    else:
        assert record["lines"] - follow["lines"] <= answered < record["lines"], "a second failure stays an error"
    creates = emulator_calls(run_dir)["job_creates"]
    parts = {p["job_id"] for m in run_dir.glob("*/results/trial_manifest.json")
             for p in json.loads(m.read_text())["parts"].values()}
    assert sum(creates.values()) == len(parts) + 1, "one follow-up batch, created once, and none on the re-run"
    run = open_run(RID, run_dir.parent)
    per_part = record["estimated_usd"]
    assert follow["estimated_usd"] == pytest.approx(per_part * follow["lines"] / record["lines"])
    assert committed_usd(run) >= follow["estimated_usd"] + per_part
