"""Crash torture on every other provider API (the scheme of `tests/test_torture.py`, which tortures Fireworks').

For OpenAI, Anthropic and a local OpenAI-compatible server, the default experiment runs uninterrupted once against
the emulator speaking that API (the reference), then again in a fresh root, SIGKILLed at 50+ points and resumed each
time. Afterwards: every part's batch was created exactly once (OpenAI: by client_key, its input file uploaded once;
Anthropic: one batch per part, though it has neither client ids nor metadata; local: every request answered, at most
the requests in flight at a kill answered twice), the results are byte-identical to the reference, the manifests
validate, nothing is left behind and `plan` finds nothing to run (`torture_support.tortured_provider_run`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.torture_support import KillPlan, tortured_provider_run

pytestmark = [pytest.mark.torture, pytest.mark.slow]
SEED = int(os.environ.get("TORTURE_SEED", "20251124"))
# Anthropic and local runs have fewer crash points per part (no upload step): a denser body plan for 50+ kills.
# (A sparser OpenAI plan of 24 body kills gave 59 kills on a quiet machine but 49 under CI load, where the parent
# kills land elsewhere: the plans keep a wide margin over 50.)
PLANS = {"openai": KillPlan(seed=SEED, body_kills=56, tail_max_step=6, parent_kills=3),
         "anthropic": KillPlan(seed=SEED, body_kills=90, tail_max_step=4, parent_kills=3),
         "local": KillPlan(seed=SEED, body_kills=90, tail_max_step=4, parent_kills=3)}


@pytest.mark.parametrize("api", sorted(PLANS))
def test_kill_nine_at_fifty_points_is_exactly_once_and_identical(tmp_path: Path, api: str) -> None:
    result = tortured_provider_run(tmp_path, api, PLANS[api])
    assert len(result.kills) >= 50, result.summary()


def test_kill_nine_around_follow_up_batches_sends_each_once(tmp_path: Path) -> None:
    """Every part at T=0 ends half expired (the emulator picks the same half of the same requests in any batch), so
    each sends a follow-up batch of its expired requests. Killed throughout, each part and each follow-up is created
    once and the results equal an uninterrupted run's. OpenAI only: its fault subject (the client key) tells a
    follow-up (`...-resend-...`) from its part; Anthropic's follow-ups go through the same task code and the same
    `submit` as its parts, which the torture above covers."""
    faults = [{"fault": "job_state", "state": "JOB_STATE_EXPIRED", "partial": 0.5,
               "match": r"^ex-t0-[a-z]{4}-p[0-9]{2}-[0-9a-f]{10}$", "times": 0}]
    plan = KillPlan(seed=SEED + 2, body_kills=30, tail_max_step=8, parent_kills=2)
    result = tortured_provider_run(tmp_path, "openai", plan, faults)
    assert len(result.kills) >= 30, result.summary()
