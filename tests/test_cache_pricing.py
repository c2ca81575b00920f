"""Prompt caching priced end to end: cache counts in predictions.csv, cache read/write rates (derived and explicit,
batch and not), costs by the formula, the budget estimate an upper bound, and a run on the Anthropic emulator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import budget
from pipeline.control.config import Pricing
from pipeline.control.run import open_run
from pipeline.costs import summarize_costs, trial_costs
from pipeline.pricing import resolve_rates
from pipeline.tasks.analyze import read_predictions
from pipeline.views.plan import budget_lines
from tests.conftest import finished_run, small_experiment

HAIKU = "claude-haiku-4-5"
MINI = "gpt-4o-mini"


def pricing(**entries: dict[str, dict[str, float]]) -> dict:
    return {"input_per_million": 0.15, "output_per_million": 0.60, "batch_discount": 0.5, "providers": entries}


def rates(table: dict, provider: str, model: str, batch: bool) -> tuple[float, float, float, float]:
    r = resolve_rates(table, provider=provider, model=model, use_batch_api=batch)
    return (r["input_rate_per_mtok"], r["output_rate_per_mtok"], r["cache_read_rate_per_mtok"],
            r["cache_write_rate_per_mtok"])


# --- rates ----------------------------------------------------------------------------------------------------------
def test_anthropic_cache_rates_derive_from_the_effective_input_rate() -> None:
    table = pricing(anthropic={HAIKU: {"input_per_mtok": 1.0, "output_per_mtok": 5.0}})
    assert rates(table, "anthropic", HAIKU, False) == pytest.approx((1.0, 5.0, 0.1, 1.25))
    assert rates(table, "anthropic", HAIKU, True) == pytest.approx((0.5, 2.5, 0.05, 0.625))  # discount, then ×
    source = resolve_rates(table, provider="anthropic", model=HAIKU, use_batch_api=True)["source"]
    assert "cache read: input rate × 0.1 (default for provider anthropic)" in source
    assert "cache write: input rate × 1.25 (default for provider anthropic)" in source
    explicit_batch = pricing(anthropic={HAIKU: {"input_per_mtok": 1.0, "output_per_mtok": 5.0,
                                                "input_per_mtok_batch": 0.4, "output_per_mtok_batch": 2.0}})
    assert rates(explicit_batch, "anthropic", HAIKU, True) == pytest.approx((0.4, 2.0, 0.04, 0.5))


def test_explicit_cache_rates_follow_the_input_rules() -> None:
    entry = {"input_per_mtok": 1.0, "output_per_mtok": 5.0, "cache_read_per_mtok": 0.2, "cache_write_per_mtok": 2.0}
    table = pricing(anthropic={HAIKU: entry})
    assert rates(table, "anthropic", HAIKU, False) == pytest.approx((1.0, 5.0, 0.2, 2.0))
    assert rates(table, "anthropic", HAIKU, True) == pytest.approx((0.5, 2.5, 0.1, 1.0))  # standard × discount
    resolved = resolve_rates(table, provider="anthropic", model=HAIKU, use_batch_api=True)
    assert "cache read: pricing.providers.anthropic['claude-haiku-4-5'].cache_read_per_mtok × " \
           "pricing.batch_discount (0.5)" in resolved["source"]
    assert resolved["rate_type"] == "batch_discount"
    with_batch = pricing(anthropic={HAIKU: {**entry, "cache_read_per_mtok_batch": 0.15,
                                            "cache_write_per_mtok_batch": 1.6}})
    assert rates(with_batch, "anthropic", HAIKU, True) == pytest.approx((0.5, 2.5, 0.15, 1.6))  # as is
    assert rates(with_batch, "anthropic", HAIKU, False) == pytest.approx((1.0, 5.0, 0.2, 2.0))
    assert "cache_write_per_mtok_batch" in resolve_rates(with_batch, provider="anthropic", model=HAIKU,
                                                         use_batch_api=True)["source"]


def test_openai_cached_input_is_half_by_default_and_the_multiplier_is_a_table_field() -> None:
    table = pricing(openai={MINI: {"input_per_mtok": 0.15, "output_per_mtok": 0.60}})
    assert rates(table, "openai", MINI, False) == pytest.approx((0.15, 0.60, 0.075, 0.15))
    assert rates(table, "openai", MINI, True) == pytest.approx((0.075, 0.30, 0.0375, 0.075))
    own = pricing(openai={MINI: {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "cache_read_multiplier": 0.25}})
    assert rates(own, "openai", MINI, False)[2] == pytest.approx(0.0375)
    assert "cache_read_multiplier (0.25)" in resolve_rates(own, provider="openai", model=MINI,
                                                           use_batch_api=False)["source"]


def test_other_providers_fallbacks_and_local_servers() -> None:
    table = pricing(fireworks={"m": {"input_per_mtok": 0.2, "output_per_mtok": 0.8}})
    assert rates(table, "fireworks", "m", False) == pytest.approx((0.2, 0.8, 0.2, 0.2))  # as before: input rate
    assert rates(table, "anthropic", "unlisted", False) == pytest.approx((0.15, 0.60, 0.015, 0.1875))
    assert rates(table, "anthropic", "unlisted", True) == pytest.approx((0.075, 0.30, 0.0075, 0.09375))
    assert rates(table, "local", "llama", False) == (0.0, 0.0, 0.0, 0.0)


def test_the_config_accepts_the_cache_keys_and_refuses_a_rate_with_a_multiplier() -> None:
    entry = {"input_per_mtok": 1.0, "output_per_mtok": 5.0, "cache_read_per_mtok": 0.1, "cache_write_per_mtok": 1.25,
             "cache_read_per_mtok_batch": 0.05, "cache_write_per_mtok_batch": 0.625}
    Pricing(providers={"anthropic": {HAIKU: entry}})
    Pricing(providers={"openai": {MINI: {"input_per_mtok": 1, "output_per_mtok": 2, "cache_read_multiplier": 0.5,
                                         "cache_write_multiplier": 1}}})
    with pytest.raises(ValueError, match="cache_read_per_mtok .* or cache_read_multiplier, not both"):
        Pricing(providers={"openai": {MINI: {"input_per_mtok": 1, "output_per_mtok": 2, "cache_read_multiplier": 0.5,
                                             "cache_read_per_mtok_batch": 0.2}}})
    with pytest.raises(ValueError, match=">= 0"):
        Pricing(providers={"openai": {MINI: {"input_per_mtok": 1, "output_per_mtok": 2,
                                             "cache_write_multiplier": -1}}})
    with pytest.raises(ValueError, match="unknown keys"):
        Pricing(providers={"openai": {MINI: {"input_per_mtok": 1, "output_per_mtok": 2, "cached_per_mtok": 1}}})


# --- costs ----------------------------------------------------------------------------------------------------------
HAIKU_TABLE = pricing(anthropic={HAIKU: {"input_per_mtok": 1.0, "output_per_mtok": 5.0}})


def usage() -> pd.DataFrame:
    return pd.DataFrame({
        "custom_id": ["a", "b", "c"],
        "condition": ["control", "treatment", "treatment"],
        "temp": [0.0, 0.0, 0.7],
        "prompt_tokens": [1000, 2000, 100],
        "completion_tokens": [10, 20, 0],
        "total_tokens": [1010, 2020, 100],
        "cache_read_tokens": [600, 0, 150],   # the last row reports more than its prompt: capped at 100
        "cache_write_tokens": [300, 0, 10],   # ... and then no room is left for writes
    })


def test_costs_price_cache_reads_and_writes_by_the_formula() -> None:
    result = summarize_costs(usage(), pricing=HAIKU_TABLE, provider="anthropic", model=HAIKU, use_batch_api=False)
    # rates: input 1, output 5, read 0.1, write 1.25 per 1M tokens
    # a: 100·1 + 600·0.1 + 300·1.25 + 10·5 = 585; b: 2000·1 + 20·5 = 2100; c: 100·0.1 = 10
    assert result["by_condition"]["control"]["usd"] == 0.000585
    assert result["by_condition"]["treatment"]["usd"] == 0.00211
    assert result["usd"] == 0.002695
    assert (result["cache_read_tokens"], result["cache_write_tokens"]) == (700, 300)
    assert result["by_temp"]["0.7"] == {"prompt_tokens": 100, "completion_tokens": 0, "total_tokens": 100,
                                        "cache_read_tokens": 100, "cache_write_tokens": 0, "usd": 0.00001}
    batch = summarize_costs(usage(), pricing=HAIKU_TABLE, provider="anthropic", model=HAIKU, use_batch_api=True)
    assert batch["usd"] == pytest.approx(0.0013475, abs=1e-6)  # every rate halved; usd is rounded to 6 decimals


def test_parts_carry_cache_tokens() -> None:
    parts = {"x/t00_control_p00": {"owner": "x", "custom_ids": ["a"]},
             "y/t00_treatment_p00": {"owner": "x", "custom_ids": ["b", "c"]}}
    result = trial_costs(usage(), trial="x", parts=parts, pricing=HAIKU_TABLE, provider="anthropic", model=HAIKU,
                         use_batch_api=False)
    assert result["parts"]["x/t00_control_p00"]["cache_write_tokens"] == 300
    assert result["parts"]["y/t00_treatment_p00"]["cache_read_tokens"] == 100
    assert result["owned_usd"] == result["usd"] == 0.002695


def test_predictions_without_cache_columns_price_as_before(tmp_path: Path) -> None:
    old = usage().drop(columns=["cache_read_tokens", "cache_write_tokens"])
    path = tmp_path / "predictions.csv"
    old.assign(dataset="d", item_id="i", type="open", sample_index=0, request_id="", finish_reason="stop",
               response_text="x", error="").to_csv(path, index=False)
    read = read_predictions(path)
    assert read["cache_read_tokens"].tolist() == [0, 0, 0] and read["cache_write_tokens"].tolist() == [0, 0, 0]
    for frame in (old, read):
        result = summarize_costs(frame, pricing=HAIKU_TABLE, provider="anthropic", model=HAIKU, use_batch_api=False)
        assert result["usd"] == round((3100 * 1.0 + 30 * 5.0) / 1e6, 6)
        assert (result["cache_read_tokens"], result["cache_write_tokens"]) == (0, 0)


# --- budget ---------------------------------------------------------------------------------------------------------
def request(content: str) -> str:
    return json.dumps({"custom_id": "x", "body": {"messages": [{"role": "system", "content": content}]}})


def test_with_prompt_caching_the_estimate_prices_prompts_at_the_larger_of_input_and_cache_write() -> None:
    lines = [request("a" * 396)]  # 99 + 4 tokens
    haiku = resolve_rates(HAIKU_TABLE, provider="anthropic", model=HAIKU, use_batch_api=False)
    assert budget.estimate_lines(lines, max_tokens=10, rates=haiku).usd == round((103 * 1.0 + 10 * 5.0) / 1e6, 6)
    cached = budget.estimate_lines(lines, max_tokens=10, rates=haiku, prompt_caching=True)
    assert cached.usd == round((103 * 1.25 + 10 * 5.0) / 1e6, 6)
    cheap_writes = resolve_rates(pricing(anthropic={HAIKU: {"input_per_mtok": 1.0, "output_per_mtok": 5.0,
                                                            "cache_write_per_mtok": 0.5}}),
                                 provider="anthropic", model=HAIKU, use_batch_api=False)
    assert budget.estimate_lines(lines, max_tokens=10, rates=cheap_writes, prompt_caching=True).usd == \
        round((103 * 1.0 + 10 * 5.0) / 1e6, 6)


def anthropic_experiment(base: Path, *, prompt_caching: bool) -> Path:
    """The small experiment on the emulator speaking Anthropic's API (see tests/test_providers.py)."""
    config = small_experiment(base, api="anthropic", prompt_caching=prompt_caching)
    raw = yaml.safe_load(config.read_text())
    raw.update(top_k=None, top_p=None)
    raw["pricing"]["allow_unlisted_models"] = True
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def test_plan_names_the_prompt_rate(tmp_path: Path) -> None:
    plain = open_run("p", tmp_path / "plain", anthropic_experiment(tmp_path / "a", prompt_caching=False))
    cached = open_run("p", tmp_path / "cached", anthropic_experiment(tmp_path / "b", prompt_caching=True))
    assert "at the input rate)" in budget_lines(plain)[0]
    assert "at the max(input, cache write) rate: prompt caching is on)" in budget_lines(cached)[0]
    before, after = budget.plan_estimate(plain)["total"], budget.plan_estimate(cached)["total"]
    assert after.prompt_tokens == before.prompt_tokens
    rates = budget.part_rates(cached, cached.trials[0].model_id)
    extra = after.prompt_tokens / 1e6 * (rates["cache_write_rate_per_mtok"] - rates["input_rate_per_mtok"])
    assert after.usd == pytest.approx(before.usd + extra, abs=1e-5)


# --- end to end on the Anthropic emulator ---------------------------------------------------------------------------
def priced(block: dict, rates: dict) -> float:
    """The costs.py formula over a costs.json block's own token counts and rates."""
    uncached = block["prompt_tokens"] - block["cache_read_tokens"] - block["cache_write_tokens"]
    return round((uncached * rates["input_rate_per_mtok"] + block["cache_read_tokens"] * rates["cache_read_rate_per_mtok"]
                  + block["cache_write_tokens"] * rates["cache_write_rate_per_mtok"]
                  + block["completion_tokens"] * rates["output_rate_per_mtok"]) / 1e6, 6)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("prompt_caching", [True, False])
def test_a_run_on_the_anthropic_emulator_prices_its_cache_tokens(tmp_path: Path, prompt_caching: bool) -> None:
    config = anthropic_experiment(tmp_path, prompt_caching=prompt_caching)
    run_dir = finished_run(tmp_path / "experiments", config, "cache")
    trials = sorted(run_dir.glob("*/results/costs.json"))
    assert len(trials) == 2
    for path in trials:
        costs = json.loads(path.read_text())
        rates = costs["pricing"]
        assert rates["provider"] == "anthropic" and rates["cache_read_rate_per_mtok"] == pytest.approx(
            0.1 * rates["input_rate_per_mtok"])
        with open(path.parent / "predictions.csv", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        for col in ("prompt_tokens", "cache_read_tokens", "cache_write_tokens"):
            assert costs[col] == sum(int(r[col]) for r in rows), col
        if prompt_caching:
            assert costs["cache_read_tokens"] > 0 and costs["cache_write_tokens"] > 0
            assert costs["cache_read_tokens"] + costs["cache_write_tokens"] < costs["prompt_tokens"]
        else:
            assert costs["cache_read_tokens"] == costs["cache_write_tokens"] == 0
        blocks = [costs, *costs["by_condition"].values(), *costs["by_temp"].values(), *costs["parts"].values(),
                  *(b for per_temp in costs["by_condition_temp"].values() for b in per_temp.values())]
        for block in blocks:
            assert block["usd"] == priced(block, rates)
        assert costs["usd"] > 0
