"""budget.max_usd: the estimate, `plan`'s pre-submission figure, and submission stopping before the budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import budget
from pipeline.control import exit_codes
from pipeline.control.run import open_run
from tests.conftest import emulator_calls, run_luigi, small_experiment

RATES = {"input_rate_per_mtok": 2.0, "output_rate_per_mtok": 10.0}


def line(*contents: str) -> str:
    return json.dumps({"custom_id": "x", "body": {"messages": [{"role": "user", "content": c} for c in contents]}})


def test_request_tokens_count_characters_per_four_plus_a_per_message_overhead() -> None:
    assert budget.request_tokens(line("abcd" * 10)) == 10 + budget.TOKENS_PER_MESSAGE
    assert budget.request_tokens(line("abcde", "")) == 2 + 2 * budget.TOKENS_PER_MESSAGE


def test_estimate_prices_prompt_tokens_and_the_full_max_tokens_of_every_request() -> None:
    lines = [line("a" * 396), line("b" * 396), "\n"]
    estimate = budget.estimate_lines(lines, max_tokens=100, rates=RATES)
    assert (estimate.requests, estimate.prompt_tokens, estimate.max_completion_tokens) == (2, 2 * 103, 200)
    assert estimate.usd == pytest.approx(206 / 1e6 * 2.0 + 200 / 1e6 * 10.0)


def test_the_plan_estimate_is_the_same_before_and_after_the_build(tmp_path: Path) -> None:
    config = small_experiment(tmp_path)
    run = open_run("est", tmp_path / "exp", config)
    before = budget.plan_estimate(run)
    assert before["from"] == "requests the build will write"
    # 12 items x 2 temperatures per condition; the two trials share their control parts, which count once.
    assert before["total"].requests == 12 * 2 * (len(run.trials) + 1)
    for trial in run.trials:
        for temp in trial.temps:
            built = run_luigi(tmp_path / "exp", config, "est", "--prompt-set", trial.prompt_set, "--temp", str(temp),
                              task="BuildBatches")
            assert built.returncode == 0, built.stderr[-2000:]
    after = budget.plan_estimate(open_run("est", tmp_path / "exp"))
    assert after["from"] == "built requests"
    assert after["total"] == before["total"] and after["by_trial"] == before["by_trial"]
    assert after["total"].usd > 0


def job_creates(run_dir: Path) -> dict[str, int]:
    return emulator_calls(run_dir)["job_creates"]


@pytest.mark.e2e
def test_submission_stops_before_the_budget_and_resumes_when_it_is_raised(tmp_path: Path) -> None:
    config = small_experiment(tmp_path)
    full = budget.plan_estimate(open_run("b", tmp_path / "exp", config))["total"].usd
    raw = yaml.safe_load(config.read_text())
    raw["budget"] = {"max_usd": round(full / 2, 6)}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))

    plan = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--rid", "b", "--root", str(tmp_path / "exp"),
                           "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "EXCEEDS" in plan.stdout, plan.stdout[-2000:]

    stopped = run_luigi(tmp_path / "exp", config, "b", "--workers", "4")
    assert stopped.returncode == exit_codes.BUDGET_EXCEEDED, stopped.stderr[-3000:]
    assert "over budget.max_usd" in stopped.stderr
    assert "Traceback" not in stopped.stderr, "the budget is an expected condition: one line, no traceback"
    assert [line for line in stopped.stderr.splitlines() if "held back by the budget:" in line]
    run_dir = tmp_path / "exp" / "run_b"
    run = open_run("b", tmp_path / "exp")
    sent = job_creates(run_dir)
    assert sent and all(n == 1 for n in sent.values())
    committed = budget.committed_usd(run)
    assert 0 < committed <= full / 2 + 1e-9, "concurrent workers never commit past the budget"
    assert not (run_dir / "aggregate_report.md").exists()

    raw["budget"] = {"max_usd": round(full * 2, 6)}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    finished = run_luigi(tmp_path / "exp", config, "b", "--accept-config-drift")
    assert finished.returncode == exit_codes.OK, finished.stderr[-3000:]
    after = job_creates(run_dir)
    assert all(n == 1 for n in after.values()) and set(sent) <= set(after)
    assert budget.committed_usd(open_run("b", tmp_path / "exp")) == pytest.approx(full, rel=1e-6)
