"""Token usage and USD cost of one trial (`costs.json`), with the provenance of every rate.

Rates come from `pipeline.pricing` (rules and provenance there).
usd = prompt_tokens / 1e6 · input_rate + completion_tokens / 1e6 · output_rate, rounded to 6 decimals.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.naming import CONDITIONS, temp_str
from pipeline.pricing import resolve_rates

_TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")
_USAGE_COLUMNS = ("condition", "temp", *_TOKEN_COLUMNS)


def _tokens(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer token columns (blank/NaN/garbage → 0); a row without total_tokens counts prompt + completion."""
    out = pd.DataFrame(index=frame.index)
    for col in _TOKEN_COLUMNS:
        out[col] = pd.to_numeric(frame[col], errors="coerce").fillna(0).clip(lower=0).astype("int64")
    missing_total = out["total_tokens"] <= 0
    out.loc[missing_total, "total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def _block(tokens: pd.DataFrame, rates: dict[str, Any]) -> dict[str, Any]:
    prompt = int(tokens["prompt_tokens"].sum())
    completion = int(tokens["completion_tokens"].sum())
    usd = prompt / 1e6 * rates["input_rate_per_mtok"] + completion / 1e6 * rates["output_rate_per_mtok"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": int(tokens["total_tokens"].sum()),
            "usd": round(usd, 6)}


def summarize_costs(
    usage: pd.DataFrame, *, pricing: dict[str, Any], provider: str, model: str, use_batch_api: bool
) -> dict[str, Any]:
    """costs.json for one trial from its per-prediction usage rows (columns `condition, temp, *_tokens`).

    Returns the totals (`prompt_tokens, completion_tokens, total_tokens, usd, batch_discount_applied,
    usage_records, pricing`) plus the same token/usd block `by_condition` (control and treatment always present),
    `by_temp` and `by_condition_temp` (keys `temp_str(temp)`, in increasing temperature). Split usd values are
    priced and rounded per block, so they may differ from the total in the last decimal.
    """
    missing = [c for c in _USAGE_COLUMNS if c not in usage.columns]
    if missing:
        raise ValueError(f"usage lacks required columns {missing}")
    rates = resolve_rates(pricing, provider=provider, model=model, use_batch_api=use_batch_api)
    tokens = _tokens(usage)
    conditions = usage["condition"].fillna("").astype(str)
    temps = pd.to_numeric(usage["temp"], errors="raise").astype(float)
    condition_names = [*CONDITIONS, *sorted(set(conditions) - set(CONDITIONS))]
    by_temp: dict[str, Any] = {}
    by_condition_temp: dict[str, Any] = {}
    for temp in sorted(set(temps)):
        at_temp = temps == temp
        key = temp_str(temp)
        by_temp[key] = _block(tokens[at_temp], rates)
        by_condition_temp[key] = {c: _block(tokens[at_temp & (conditions == c)], rates) for c in condition_names}
    total = _block(tokens, rates)
    return {
        **total,
        "batch_discount_applied": use_batch_api and rates["rate_type"] in ("batch", "batch_discount", "default_batch"),
        "usage_records": len(usage),
        "pricing": rates,
        "by_condition": {c: _block(tokens[conditions == c], rates) for c in condition_names},
        "by_temp": by_temp,
        "by_condition_temp": by_condition_temp,
    }
