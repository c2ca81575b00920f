"""Money counted once: a part shared by two trials is priced in its owner's costs, and every run figure agrees.

A finished run of the default config (two prompt sets with the same control prompt, so the control parts are
shared) is priced independently here from the distinct parts' results files; each trial's costs.json must mark the
parts it reads from the other trial, and `status`, `list` and the aggregate report must show the distinct sum.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.costs import trial_costs
from pipeline.parsing import iter_jsonl, prediction_fields
from pipeline.report.render import render_aggregate_report
from tests.conftest import REPO, finished_run, small_experiment

# config/experiment.yaml prices gpt-oss-120b at $0.15 / $0.60 per million tokens with a 0.5 batch discount
INPUT_RATE, OUTPUT_RATE = 0.075, 0.30
PRICING = {"input_per_million": 0.15, "output_per_million": 0.60, "batch_discount": 0.5, "providers": {}}


def cli(*argv: str) -> dict | list:
    """`python -m pipeline <argv> --json`, parsed."""
    done = subprocess.run([sys.executable, "-m", "pipeline", *argv, "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def distinct_parts(run_dir: Path) -> dict[str, tuple[int, int]]:
    """`{owner/jkey: (prompt_tokens, completion_tokens)}` of every part results file in the run: each part once,
    since only its owner keeps one."""
    parts = {}
    for path in sorted(run_dir.glob("*/results/t*_p*/results.jsonl")):
        fields = [prediction_fields(obj) for _, obj in iter_jsonl(path)]
        parts[f"{path.parts[-4]}/{path.parts[-2]}"] = (sum(f[10] for f in fields), sum(f[11] for f in fields))
    return parts


def price(prompt: int, completion: int) -> float:
    return prompt / 1e6 * INPUT_RATE + completion / 1e6 * OUTPUT_RATE


def costs_of(run_dir: Path) -> dict[str, dict]:
    return {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(run_dir.glob("*/results/costs.json"))}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("money")
    return finished_run(base / "exp", small_experiment(base), "money")


def test_shared_parts_are_marked_and_priced_once(shared_run: Path) -> None:
    distinct = distinct_parts(shared_run)
    costs = costs_of(shared_run)
    assert len(costs) == 2 and len(distinct) == 12  # 8 parts of the owner + the borrower's 4 treatment parts
    borrower = next(slug for slug, c in costs.items() if any(p["shared"] for p in c["parts"].values()))
    owner = next(slug for slug in costs if slug != borrower)
    assert not any(p["shared"] for p in costs[owner]["parts"].values())
    shared = {key: p for key, p in costs[borrower]["parts"].items() if p["shared"]}
    assert len(shared) == 4 and all(p["owner"] == owner and key.startswith(f"{owner}/t") and "_control_" in key
                                    for key, p in shared.items())
    assert set(costs[owner]["parts"]) | set(costs[borrower]["parts"]) == set(distinct)
    for c in costs.values():
        assert c["pricing"]["input_rate_per_mtok"] == INPUT_RATE and c["pricing"]["output_rate_per_mtok"] == OUTPUT_RATE
        for key, part in c["parts"].items():  # each part block is that part's results, priced
            assert (part["prompt_tokens"], part["completion_tokens"]) == distinct[key]
            assert part["usd"] == round(price(*distinct[key]), 6)
        assert c["owned_usd"] + c["shared_usd"] == pytest.approx(c["usd"], abs=2e-6)  # consumption keeps its meaning
    assert costs[owner]["owned_usd"] == costs[owner]["usd"] and costs[owner]["shared_usd"] == 0
    assert costs[borrower]["shared_usd"] == round(price(*map(sum, zip(*(distinct[k] for k in shared), strict=True))), 6)

    expected = sum(price(*tokens) for tokens in distinct.values())
    spent = round(sum(c["owned_usd"] for c in costs.values()), 6)
    assert spent == pytest.approx(expected, abs=2e-6)  # one rounding per trial
    assert sum(c["usd"] for c in costs.values()) > spent + 1e-6  # the shared parts would have been counted twice

    status = cli("status", "--rid", "money", "--root", str(shared_run.parent))
    assert status["total_usd"] == status["budget"]["spent_usd"] == spent
    trials = {t["trial"]: t for t in status["trials"]}
    assert {slug: (t["usd"], t["owned_usd"], t["shared_usd"]) for slug, t in trials.items()} == {
        slug: (c["usd"], c["owned_usd"], c["shared_usd"]) for slug, c in costs.items()}
    listed = cli("list", "--root", str(shared_run.parent))
    assert [(r["rid"], r["total_usd"]) for r in listed] == [("money", spent)]
    for name in ("aggregate_report.md", "aggregate_report.html"):
        text = (shared_run / name).read_text()
        assert re.search(rf"Total cost: (<b>)?\${spent:.4f}(</b>)? over the run's distinct parts", text), name
        assert "Shared parts are counted once" in text


def test_one_trial_run_owns_everything(tmp_path: Path) -> None:
    config = small_experiment(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["sweep"]["prompt_sets"] = ["excellence"]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_dir = finished_run(tmp_path / "exp", config, "solo")
    [(slug, costs)] = costs_of(run_dir).items()
    assert costs["owned_usd"] == costs["usd"] and costs["shared_usd"] == 0
    assert costs["parts"] and not any(p["shared"] or p["owner"] != slug for p in costs["parts"].values())
    assert set(costs["parts"]) == set(distinct_parts(run_dir))
    assert cli("status", "--rid", "solo", "--root", str(tmp_path / "exp"))["total_usd"] == costs["usd"]


def _usage(*rows: tuple[str, str, int, int]) -> pd.DataFrame:
    return pd.DataFrame([{"custom_id": cid, "condition": cond, "temp": 0.0, "prompt_tokens": p,
                          "completion_tokens": c, "total_tokens": p + c} for cid, cond, p, c in rows])


def test_trial_costs_splits_owned_and_shared() -> None:
    usage = _usage(("a", "control", 1000, 10), ("b", "control", 3000, 30), ("c", "treatment", 2000, 20))
    parts = {"x/t00_control_p00": {"owner": "x", "custom_ids": ["a", "b"]},
             "y/t00_treatment_p00": {"owner": "y", "custom_ids": ["c"]}}
    costs = trial_costs(usage, trial="y", parts=parts, pricing=PRICING, provider="fireworks", model="m",
                        use_batch_api=True)
    assert costs["parts"] == {
        "x/t00_control_p00": {"prompt_tokens": 4000, "completion_tokens": 40, "total_tokens": 4040,
                              "cache_read_tokens": 0, "cache_write_tokens": 0, "usd": round(price(4000, 40), 6), "owner": "x",
                              "shared": True},
        "y/t00_treatment_p00": {"prompt_tokens": 2000, "completion_tokens": 20, "total_tokens": 2020,
                                "cache_read_tokens": 0, "cache_write_tokens": 0, "usd": round(price(2000, 20), 6), "owner": "y",
                                "shared": False}}
    assert (costs["owned_usd"], costs["shared_usd"]) == (round(price(2000, 20), 6), round(price(4000, 40), 6))
    assert costs["usd"] == round(price(6000, 60), 6)  # still what the trial consumed


@pytest.mark.parametrize(("parts", "message"), [
    ({"x/p0": {"owner": "x", "custom_ids": ["a"]}}, "'b' belongs to none of the trial's parts"),
    ({"x/p0": {"owner": "x", "custom_ids": ["a", "b"]}, "x/p1": {"owner": "x", "custom_ids": ["b"]}}, "in two parts"),
])
def test_trial_costs_refuses_rows_it_cannot_place(parts: dict, message: str) -> None:
    usage = _usage(("a", "control", 1, 1), ("b", "control", 1, 1))
    with pytest.raises(ValueError, match=message):
        trial_costs(usage, trial="x", parts=parts, pricing=PRICING, provider="fireworks", model="m", use_batch_api=True)


def test_aggregate_report_total_counts_shared_parts_once() -> None:
    def trial(slug: str, usd: float, owned: float, shared: float) -> dict:
        return {"slug": slug, "costs": {"usd": usd, "owned_usd": owned, "shared_usd": shared,
                                        "by_temp": {"0.0": {"usd": usd}}}}

    text = render_aggregate_report({"rid": "r", "trials": [trial("a", 0.0050, 0.0050, 0.0), trial("b", 0.0041, 0.0024, 0.0017),
                                                            {"slug": "c", "costs": {"usd": 0.9}}]})
    assert "Total cost: $0.0074 over the run's distinct parts, across 3 trials (1 without costs.json data)." in text
    assert "shared parts included: $0.0017 of it is in parts another trial pays for." in text
