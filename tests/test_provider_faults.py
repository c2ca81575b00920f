"""The provider-fault matrix, on every batch API: the pipeline, driving the real client of Fireworks, OpenAI or
Anthropic against the emulator, survives what such an API does to a run.

Each case is one run of the lean small experiment (one trial at temperature 0: four parts) under a fault plan
installed before the run (`run_emulator`), and checks that the run ends well, that no part was paid twice
(`job_creates` at the emulator: one per part, whether the API keys it by our client key or by its own batch id, plus
one follow-up batch where OpenAI or Anthropic lost requests, which are sent again once), that
every fault rule actually fired, and that the results are right: the scores equal a fault-free run's (every API gives
the same scores, `tests/test_providers.py`), and where requests are lost (expiry with partial output, per-request
errors) every request of the part is accounted for in its results.jsonl and the answered ones equal the fault-free
answers.

Cases: 429 with Retry-After on the create route; 5xx (and Anthropic's 529 "overloaded") on the create and on the
status GETs; the create response lost after the batch was made (`drop_after_commit`: reconciliation finds it, no
second batch); the batch expiring with half of its output; half of the part's requests answered with errors; and
the results download cut once (`truncated`: retried).

This file runs the Fireworks column; `test_provider_faults_openai.py` and `..._anthropic.py` run the same cases
(`fault_case`) on the other APIs, in files of their own so that xdist (`--dist loadfile`) runs the columns in parallel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.parsing import has_answer, prediction_fields
from tests.conftest import run_emulator, run_luigi
from tests.test_hostile_downloads import MATCH, PART, lean_experiment

pytestmark = pytest.mark.slow
RID = "faults"
CREATE = {"fireworks": "/batchInferenceJobs$", "openai": "^/v1/batches$", "anthropic": "^/v1/messages/batches$"}
"""The create route of each API (the POST that makes a paid batch)."""
STATUS = {"fireworks": "/batchInferenceJobs/[^/]+$", "openai": "^/v1/batches/batch_[^/]+$",
          "anthropic": "^/v1/messages/batches/msgbatch_[0-9a-f]+$"}
"""The status route of each API (GET of one batch)."""
LOST = "lost"
"""A case where requests of PART are lost on purpose (the other cases answer everything)."""


def _create(status: int, **extra: Any) -> Any:
    return lambda api: [{"fault": "status", "status": status, "match": CREATE[api], "method": "POST", **extra}]


def _status(status: int) -> Any:
    # Three in a row: more than one retry of the same GET, within the client's retry budget.
    return lambda api: [{"fault": "status", "status": status, "match": STATUS[api], "method": "GET", "times": 3}]


CASES: dict[str, tuple[Any, str]] = {
    # case: (rules for an API, what the part's results hold)
    "429 Retry-After on create": (_create(429, retry_after=1), "all"),
    "503 on create": (_create(503), "all"),
    "529 on create": (_create(529), "all"),
    "503 on status": (_status(503), "all"),
    "529 on status": (_status(529), "all"),
    "create response lost": (lambda api: [{"fault": "drop_after_commit", "match": CREATE[api], "method": "POST"}],
                             "all"),
    "expired with partial output": (lambda api: [{"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5,
                                                  "match": MATCH[api], "times": 0}], LOST),
    "per-request errors": (lambda api: [{"fault": "error_rows", "fraction": 0.5, "match": MATCH[api], "times": 0}],
                           LOST),
    "download cut once": (lambda api: [{"fault": "truncated", "match": MATCH[api]}], "all"),
}
RESENDS = ("openai", "anthropic")
"""APIs whose parts send the requests a batch lost again, once, in a follow-up batch."""
ANTHROPIC_ONLY = "529 (overloaded_error) is Anthropic's status; the other APIs do not send it"


def matrix(api: str) -> list[object]:
    """The cases of `api`; one that cannot apply to it is skipped, saying why."""
    return [pytest.param(case, id=case,
                         marks=[pytest.mark.skip(reason=ANTHROPIC_ONLY)] if "529" in case and api != "anthropic" else [])
            for case in CASES]


def results(run_dir: Path, jkey: str) -> dict[str, dict[str, dict]]:
    """Per trial, the part's results by custom id."""
    return {p.parent.parent.parent.name: {row["custom_id"]: row for row in map(json.loads, p.read_text().splitlines())}
            for p in sorted(run_dir.glob(f"*/results/{jkey}/results.jsonl"))}


def answer(row: dict) -> str | None:
    """The answer text of a result line as the scoring reads it (whatever the API's row shape); None without one."""
    return prediction_fields(row)[9] if has_answer(row) else None


def scores(run_dir: Path) -> dict[str, bytes]:
    return {p.parent.parent.name: p.read_bytes() for p in sorted(run_dir.glob("*/results/per_item_scores.csv"))}


def parts(run_dir: Path) -> int:
    return sum(len(json.loads(p.read_text())["parts"]) for p in run_dir.glob("*/results/trial_manifest.json"))


def followups(run_dir: Path) -> int:
    """Parts that sent their failed requests again in a follow-up batch (OpenAI, Anthropic)."""
    return sum(bool(part.get("followup")) for p in run_dir.glob("*/results/trial_manifest.json")
               for part in json.loads(p.read_text())["parts"].values())


def reference_run(factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fault-free run (every API gives the same scores and answers, so one serves them all)."""
    base = factory.mktemp("reference")
    config = lean_experiment(base, "fireworks")
    root = base / "exp"
    with run_emulator(root, RID):
        done = run_luigi(root, config, RID)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = root / f"run_{RID}"
    return {"scores": scores(run_dir), "part": results(run_dir, PART)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference_run(tmp_path_factory)


@pytest.mark.parametrize("case", matrix("fireworks"))
def test_the_run_survives_the_fault_without_paying_twice(tmp_path: Path, emulator: str, reference: dict[str, Any],
                                                         case: str) -> None:
    fault_case(tmp_path, emulator, reference, "fireworks", case)


def fault_case(tmp_path: Path, emulator: str, reference: dict[str, Any], api: str, case: str) -> None:
    """One case of the matrix on `api` (module docstring), with the emulator at `emulator` and no plan yet."""
    rules, expect = CASES[case]
    answer_ = requests.post(emulator + "/emulator/faults", json={"rules": rules(api)}, timeout=5)
    assert answer_.status_code == 200, answer_.text
    config = lean_experiment(tmp_path, api)
    root = tmp_path / "exp"
    run_dir = root / f"run_{RID}"

    done = run_luigi(root, config, RID)
    assert done.returncode == 0, done.stderr[-3000:]
    fired = requests.get(emulator + "/emulator/faults", timeout=5).json()["rules"]
    assert all(rule["fired"] for rule in fired), fired
    creates = requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"]
    resent = followups(run_dir)
    assert resent == (1 if expect == LOST and api in RESENDS else 0), "a follow-up batch only for lost requests"
    assert set(creates.values()) == {1} and len(creates) == parts(run_dir) + resent == 4 + resent, creates

    got = results(run_dir, PART)
    assert set(got) == set(reference["part"])
    for trial, rows in got.items():
        ref = reference["part"][trial]
        assert set(rows) == set(ref), "every request of the part is accounted for"
        answered = {cid: answer(row) for cid, row in rows.items() if answer(row) is not None}
        assert answered == {cid: answer(ref[cid]) for cid in answered}, "the answers are the fault-free ones"
        if expect == LOST:
            # half lost; with a follow-up batch (which the fault may hit again) some or all of them answered
            assert 3 < len(answered) <= 6 if api in RESENDS else len(answered) == 3, rows
            assert all("error" in rows[cid] for cid in set(rows) - set(answered)), rows
        else:
            assert len(answered) == len(rows) == 6
    if expect != LOST:
        assert scores(run_dir) == reference["scores"]
