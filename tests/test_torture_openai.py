"""Crash torture on OpenAI's batch API (the scheme of `tests/test_torture.py`, which tortures Fireworks'). One file per
API, so that the tortures run on different test workers.

The default experiment runs uninterrupted once against the emulator speaking OpenAI's API (the reference), then again
in a fresh root, SIGKILLed at 50+ points and resumed each time. Afterwards: every part's batch was created exactly once
(by its client_key) and its input file uploaded once, the results are byte-identical to the reference, the manifests
validate, nothing is left behind and `plan` finds nothing to run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.torture_support import KillPlan, tortured_provider_run

pytestmark = [pytest.mark.torture, pytest.mark.slow]
SEED = int(os.environ.get("TORTURE_SEED", "20251124"))


def test_kill_nine_at_fifty_points_is_exactly_once_and_identical(tmp_path: Path) -> None:
    plan = KillPlan(seed=SEED, body_kills=24, tail_max_step=12, parent_kills=3)
    result = tortured_provider_run(tmp_path, "openai", plan)
    assert len(result.kills) >= 50, result.summary()
