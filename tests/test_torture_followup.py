"""Crash torture around OpenAI follow-up batches (the scheme of `tests/test_torture.py`), in its own file so that it
runs on a test worker of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.torture_support import KillPlan, tortured_provider_run

pytestmark = [pytest.mark.torture, pytest.mark.slow]
SEED = int(os.environ.get("TORTURE_SEED", "20251124"))


def test_kill_nine_around_follow_up_batches_sends_each_once(tmp_path: Path) -> None:
    """Every part at T=0 ends half expired (the emulator picks the same half of the same requests in any batch), so
    each sends a follow-up batch of its expired requests. Killed throughout, each part and each follow-up is created
    once and the results equal an uninterrupted run's. OpenAI only: its fault subject (the client key) tells a
    follow-up (`...-resend-...`) from its part; Anthropic's follow-ups go through the same task code and the same
    `submit` as its parts, which `tests/test_torture_anthropic.py` covers."""
    faults = [{"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5,
               "match": r"^ex-t0-[a-z]{4}-p[0-9]{2}-[0-9a-f]{10}$", "times": 0}]
    plan = KillPlan(seed=SEED + 2, body_kills=30, tail_max_step=8, parent_kills=2)
    result = tortured_provider_run(tmp_path, "openai", plan, faults)
    assert len(result.kills) >= 30, result.summary()
