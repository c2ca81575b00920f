"""Crash torture on every other provider API (the scheme of `tests/test_torture.py`, which tortures Fireworks').

For OpenAI, Anthropic and a local OpenAI-compatible server, the default experiment runs uninterrupted once against
the emulator speaking that API (the reference), then again in a fresh root, SIGKILLed at 50+ points and resumed each
time. Afterwards: every part's batch was created exactly once (OpenAI: by client_key, its input file uploaded once;
Anthropic: one batch per part, though it has neither client ids nor metadata; local: every request answered, at most
the requests in flight at a kill answered twice), the results are byte-identical to the reference, the manifests
validate, nothing is left behind and `plan` finds nothing to run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.torture_support import (
    COMPARED_FILES,
    EmulatorProcess,
    KillPlan,
    Runner,
    TortureResult,
    end_state_checks,
    failed_checks,
    snapshot_outputs,
    torture,
    write_config,
)

pytestmark = [pytest.mark.torture, pytest.mark.slow]
RID = "torture"
SEED = int(os.environ.get("TORTURE_SEED", "20251124"))
MAX_CONCURRENT = 4  # provider.max_concurrent_requests of the local runs (the default)


def tortured(tmp_path: Path, api: str, plan: KillPlan, faults: list[dict[str, Any]] | None = None) -> TortureResult:
    """A reference run, then a tortured one, each against a fresh emulator with `faults`; asserts every check."""
    (tmp_path / "shared").mkdir()
    config = write_config(tmp_path / "shared", api=api)
    with EmulatorProcess(tmp_path / "reference-emulator") as emulator:
        if faults:
            emulator.set_faults(faults)
        reference = Runner(rid=RID, root=tmp_path / "reference", config=config, base_url=emulator.base_url,
                           logs=tmp_path / "reference-logs")
        first = reference.run()
    assert first.returncode == 0, first.tail(40)
    outputs = snapshot_outputs(reference.run_dir)
    assert len(outputs) == 2 * len(COMPARED_FILES), sorted(outputs)

    with EmulatorProcess(tmp_path / "torture-emulator") as emulator:
        if faults:
            emulator.set_faults(faults)
        runner = Runner(rid=RID, root=tmp_path / "torture", config=config, base_url=emulator.base_url,
                        logs=tmp_path / "torture-logs")
        result = torture(runner, first.points, plan, emulator.calls)
        calls = emulator.calls()
    print(f"\n[{api}] {result.summary()}")
    checks = end_state_checks(runner, result, outputs, calls, api, resent_at_most=MAX_CONCURRENT * len(result.kills))
    assert not failed_checks(checks), f"{failed_checks(checks)}\n\n{result.summary()}"
    return result


@pytest.mark.parametrize("api", ["openai", "anthropic", "local"])
def test_kill_nine_at_fifty_points_is_exactly_once_and_identical(tmp_path: Path, api: str) -> None:
    # Anthropic and local runs have fewer crash points per part (no upload step): a denser plan for the same count
    body, tail = {"openai": (56, 6)}.get(api, (90, 4))
    result = tortured(tmp_path, api, KillPlan(seed=SEED, body_kills=body, tail_max_step=tail, parent_kills=3))
    assert len(result.kills) >= 50, result.summary()


def test_kill_nine_around_follow_up_batches_sends_each_once(tmp_path: Path) -> None:
    """Every part at T=0 ends half expired (the emulator picks the same half of the same requests in any batch), so
    each sends a follow-up batch of its expired requests. Killed throughout, each part and each follow-up is created
    once and the results equal an uninterrupted run's. OpenAI only: its fault subject (the client key) tells a
    follow-up (`...-resend-...`) from its part; Anthropic's follow-ups go through the same task code and the same
    `submit` as its parts, which the torture above covers."""
    faults = [{"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5,
               "match": r"^ex-t0-[a-z]{4}-p[0-9]{2}-[0-9a-f]{10}$", "times": 0}]
    result = tortured(tmp_path, "openai", KillPlan(seed=SEED + 2, body_kills=30, tail_max_step=8, parent_kills=2),
                      faults)
    assert len(result.kills) >= 30, result.summary()
