"""Cost summaries: rate resolution (batch, discounts, fallbacks, key lookup) and the per-condition/temperature split."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from pipeline.costs import summarize_costs
from pipeline.pricing import resolve_rates

BIG = "accounts/fireworks/models/gpt-oss-120b"
SMALL = "accounts/fireworks/models/gpt-oss-20b"
PRICING = {
    "input_per_million": 0.15,
    "output_per_million": 0.60,
    "batch_discount": 0.5,
    "providers": {
        "fireworks": {
            BIG: {"input_per_mtok": 0.15, "output_per_mtok": 0.60,
                  "input_per_mtok_batch": 0.075, "output_per_mtok_batch": 0.30},
            SMALL: {"input_per_mtok": 0.07, "output_per_mtok": 0.30, "batch_discount": 0.5},
        }
    },
}


def test_explicit_batch_rates_are_not_discounted_again() -> None:
    rates = resolve_rates(PRICING, provider="fireworks", model=BIG, use_batch_api=True)
    assert (rates["input_rate_per_mtok"], rates["output_rate_per_mtok"]) == (0.075, 0.30)
    assert rates["rate_type"] == "batch"
    assert rates["table_found"] is True
    assert "input_per_mtok_batch" in rates["source"] and "batch_discount" not in rates["source"]


def test_standard_rates_without_batch_api() -> None:
    rates = resolve_rates(PRICING, provider="fireworks", model=BIG, use_batch_api=False)
    assert (rates["input_rate_per_mtok"], rates["output_rate_per_mtok"], rates["rate_type"]) == (0.15, 0.60, "standard")


def test_entry_discount_applies_to_standard_rates_in_batch_mode() -> None:
    rates = resolve_rates(PRICING, provider="fireworks", model=SMALL, use_batch_api=True)
    assert rates["input_rate_per_mtok"] == pytest.approx(0.035)
    assert rates["output_rate_per_mtok"] == pytest.approx(0.15)
    assert rates["rate_type"] == "batch_discount"
    assert f"pricing.providers.fireworks['{SMALL}'].batch_discount" in rates["source"]


@pytest.mark.parametrize("discount", [0, 0.0, 1, None])
def test_discount_zero_one_or_none_means_no_discount_never_free(discount: float | None) -> None:
    pricing = {**PRICING, "batch_discount": discount}
    fallback = resolve_rates(pricing, provider="fireworks", model="unknown/model", use_batch_api=True)
    assert (fallback["input_rate_per_mtok"], fallback["output_rate_per_mtok"]) == (0.15, 0.60)
    assert fallback["rate_type"] == "default"
    table = {"providers": {"fireworks": {"m": {"input_per_mtok": 1.0, "output_per_mtok": 2.0,
                                               **({} if discount is None else {"batch_discount": discount})}}},
             "batch_discount": discount}
    entry = resolve_rates(table, provider="fireworks", model="m", use_batch_api=True)
    assert (entry["input_rate_per_mtok"], entry["output_rate_per_mtok"], entry["rate_type"]) == (1.0, 2.0, "standard")


def test_fallback_rates_and_global_discount() -> None:
    batch = resolve_rates(PRICING, provider="fireworks", model="unknown/model", use_batch_api=True)
    assert batch["input_rate_per_mtok"] == pytest.approx(0.075)
    assert batch["output_rate_per_mtok"] == pytest.approx(0.30)
    assert batch["rate_type"] == "default_batch"
    assert batch["table_found"] is False
    assert batch["model_key"] == "unknown/model"
    assert "pricing.input_per_million" in batch["source"] and "pricing.batch_discount" in batch["source"]
    standard = resolve_rates(PRICING, provider="openai", model=BIG, use_batch_api=False)
    assert (standard["input_rate_per_mtok"], standard["output_rate_per_mtok"]) == (0.15, 0.60)
    assert standard["rate_type"] == "default"


def test_lookup_is_case_insensitive_and_reports_the_table_key() -> None:
    rates = resolve_rates(PRICING, provider="FireWorks", model=BIG.upper(), use_batch_api=True)
    assert rates["table_found"] is True
    assert rates["model_key"] == BIG
    assert rates["provider"] == "fireworks"
    assert rates["input_rate_per_mtok"] == 0.075


def test_exact_key_wins_over_case_insensitive_match() -> None:
    pricing = {"providers": {"p": {"M": {"input_per_mtok": 9.0, "output_per_mtok": 9.0},
                                   "m": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}}}
    assert resolve_rates(pricing, provider="p", model="m", use_batch_api=False)["input_rate_per_mtok"] == 1.0


def test_batch_only_entry_without_batch_api_uses_batch_rates_and_says_so() -> None:
    pricing = {"providers": {"p": {"m": {"input_per_mtok_batch": 0.5, "output_per_mtok_batch": 1.5}}}}
    rates = resolve_rates(pricing, provider="p", model="m", use_batch_api=False)
    assert (rates["input_rate_per_mtok"], rates["output_rate_per_mtok"]) == (0.5, 1.5)
    assert "no input_per_mtok" in rates["source"]


def _usage() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "condition": ["control", "treatment", "control", "treatment", "control"],
            "temp": [0.0, 0.0, 0.7, 0.7, 0.25],
            "prompt_tokens": [1000, 2000, None, 3000, 500],
            "completion_tokens": ["10", "", 30, float("nan"), 5],
            "total_tokens": [1010, None, 30, 3000, 505],
        }
    )


def test_summary_totals_and_usd() -> None:
    result = summarize_costs(_usage(), pricing=PRICING, provider="fireworks", model=BIG, use_batch_api=True)
    assert (result["prompt_tokens"], result["completion_tokens"], result["total_tokens"]) == (6500, 45, 6545)
    assert result["usd"] == round(6500 / 1e6 * 0.075 + 45 / 1e6 * 0.30, 6)
    assert result["usage_records"] == 5
    assert result["batch_discount_applied"] is True
    assert result["pricing"]["rate_type"] == "batch"
    assert result["pricing"]["source"]


def test_split_by_condition_and_temperature_sums_to_total() -> None:
    result = summarize_costs(_usage(), pricing=PRICING, provider="fireworks", model=SMALL, use_batch_api=False)
    assert list(result["by_temp"]) == ["0.0", "0.25", "0.7"]
    assert set(result["by_condition"]) == {"control", "treatment"}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert sum(b[key] for b in result["by_condition"].values()) == result[key]
        assert sum(b[key] for b in result["by_temp"].values()) == result[key]
        cells = [c for per_temp in result["by_condition_temp"].values() for c in per_temp.values()]
        assert sum(c[key] for c in cells) == result[key]
    assert math.isclose(sum(b["usd"] for b in result["by_condition"].values()), result["usd"], abs_tol=1e-5)
    assert result["by_condition_temp"]["0.25"]["treatment"] == {
        "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0,
        "usd": 0.0}
    assert result["by_condition_temp"]["0.0"]["control"]["prompt_tokens"] == 1000
    assert result["batch_discount_applied"] is False


def test_summary_is_deterministic_and_json_safe() -> None:
    usage = _usage()
    first = summarize_costs(usage, pricing=PRICING, provider="fireworks", model=BIG, use_batch_api=True)
    second = summarize_costs(usage.iloc[::-1], pricing=PRICING, provider="fireworks", model=BIG, use_batch_api=True)
    assert json.dumps(first) == json.dumps(second)


def test_empty_usage_costs_nothing() -> None:
    empty = pd.DataFrame(columns=["condition", "temp", "prompt_tokens", "completion_tokens", "total_tokens"])
    result = summarize_costs(empty, pricing=PRICING, provider="fireworks", model=BIG, use_batch_api=True)
    assert (result["usd"], result["total_tokens"], result["usage_records"], result["by_temp"]) == (0.0, 0, 0, {})


def test_missing_usage_columns_are_named() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        summarize_costs(pd.DataFrame({"condition": [], "temp": []}), pricing=PRICING, provider="fireworks",
                        model=BIG, use_batch_api=True)


def test_the_provider_that_answered_is_recorded_and_the_rates_table_keeps_the_numbers() -> None:
    emulated = summarize_costs(_usage(), pricing=PRICING, provider="fireworks", model=BIG, use_batch_api=True,
                               served_by="emulator")
    real = summarize_costs(_usage(), pricing=PRICING, provider="fireworks", model=BIG, use_batch_api=True)
    assert emulated["provider"] == "emulator" and real["provider"] == "fireworks"
    assert emulated["pricing"]["provider"] == "fireworks"  # the emulator is priced with Fireworks' rates
    assert {k: v for k, v in emulated.items() if k != "provider"} == {k: v for k, v in real.items() if k != "provider"}
