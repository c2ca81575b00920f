"""Token usage and USD cost of one trial (`costs.json`), with the provenance of every rate, and the run's spend.

Rates come from `pipeline.pricing` (rules and provenance there). Per block (a trial, a condition, a part, ...):

    usd = ((prompt_tokens − cache_read_tokens − cache_write_tokens) · input_rate
           + cache_read_tokens · cache_read_rate + cache_write_tokens · cache_write_rate
           + completion_tokens · output_rate) / 1e6, rounded to 6 decimals,

with the block's token sums and the rates per million tokens. Cache reads and writes are part of prompt_tokens (as
every provider's canonical usage counts them); a row reporting more cached tokens than prompt tokens is counted as
all cached (reads first), so the uncached count is never negative. Usage without the cache columns (predictions of
older runs) has none: every prompt token at the input rate, as before.

Money is counted once: a part shared by several trials (same request bytes, see `pipeline.plan`) is paid by its
owner. A trial's `usd` is what its predictions consumed, shared parts included; its `owned_usd` is what it pays
for. The run's spend (`run_spent_usd`) is the sum of the trials' `owned_usd`, i.e. the sum over distinct parts:
`budget.spent_usd`, `status`, `list` and the aggregate report all take it from there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.naming import CONDITIONS, temp_str
from pipeline.pricing import resolve_rates

if TYPE_CHECKING:  # pandas is imported where frames are priced: `status` and `list` only sum owned_usd
    import pandas as pd

_TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")
CACHE_COLUMNS = ("cache_read_tokens", "cache_write_tokens")
_USAGE_COLUMNS = ("condition", "temp", *_TOKEN_COLUMNS)


def _tokens(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer token columns (blank/NaN/garbage → 0); a row without total_tokens counts prompt + completion; absent
    cache columns are 0, and cache counts are capped so reads ≤ prompt and reads + writes ≤ prompt per row."""
    import pandas as pd

    out = pd.DataFrame(index=frame.index)
    for col in (*_TOKEN_COLUMNS, *CACHE_COLUMNS):
        values = frame[col] if col in frame.columns else pd.Series(0, index=frame.index)
        out[col] = pd.to_numeric(values, errors="coerce").fillna(0).clip(lower=0).astype("int64")
    missing_total = out["total_tokens"] <= 0
    out.loc[missing_total, "total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    out["cache_read_tokens"] = out["cache_read_tokens"].clip(upper=out["prompt_tokens"])
    out["cache_write_tokens"] = out["cache_write_tokens"].clip(upper=out["prompt_tokens"] - out["cache_read_tokens"])
    return out


def block_usd(prompt: int, completion: int, cache_read: int, cache_write: int, rates: Mapping[str, Any]) -> float:
    """The module docstring's formula for token sums (cache_read + cache_write ≤ prompt) and `resolve_rates`
    rates, rounded to 6 decimals."""
    usd = ((prompt - cache_read - cache_write) * rates["input_rate_per_mtok"]
           + cache_read * rates["cache_read_rate_per_mtok"]
           + cache_write * rates["cache_write_rate_per_mtok"]
           + completion * rates["output_rate_per_mtok"]) / 1e6
    return round(usd, 6)


def _block(tokens: pd.DataFrame, rates: dict[str, Any]) -> dict[str, Any]:
    sums = {col: int(tokens[col].sum()) for col in (*_TOKEN_COLUMNS, *CACHE_COLUMNS)}
    usd = block_usd(sums["prompt_tokens"], sums["completion_tokens"], sums["cache_read_tokens"],
                    sums["cache_write_tokens"], rates)
    return {"prompt_tokens": sums["prompt_tokens"], "completion_tokens": sums["completion_tokens"],
            "total_tokens": sums["total_tokens"], "cache_read_tokens": sums["cache_read_tokens"],
            "cache_write_tokens": sums["cache_write_tokens"], "usd": usd}


def summarize_costs(
    usage: pd.DataFrame, *, pricing: dict[str, Any], provider: str, model: str, use_batch_api: bool,
    served_by: str | None = None,
) -> dict[str, Any]:
    """costs.json for one trial from its per-prediction usage rows (columns `condition, temp, prompt_tokens,
    completion_tokens, total_tokens`, optionally `cache_read_tokens, cache_write_tokens`: 0 when absent).

    `provider` picks the rates table; `served_by` is the provider that answered (the config's provider.name,
    default `provider`): the emulator is priced with Fireworks' rates but recorded as `emulator`.
    Returns `provider` (served_by), the totals (`prompt_tokens, completion_tokens, total_tokens, cache_read_tokens,
    cache_write_tokens, usd,
    batch_discount_applied, usage_records, pricing`, whose `pricing.provider` is the rates table's) plus the same
    token/usd block `by_condition` (control and treatment always present), `by_temp` and `by_condition_temp` (keys
    `temp_str(temp)`, in increasing temperature). Split usd values are priced and rounded per block, so they may
    differ from the total in the last decimal.
    """
    import pandas as pd

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
        "provider": served_by or provider,
        **total,
        "batch_discount_applied": use_batch_api and rates["rate_type"] in ("batch", "batch_discount", "default_batch"),
        "usage_records": len(usage),
        "pricing": rates,
        "by_condition": {c: _block(tokens[conditions == c], rates) for c in condition_names},
        "by_temp": by_temp,
        "by_condition_temp": by_condition_temp,
    }


def trial_costs(
    usage: pd.DataFrame, *, trial: str, parts: Mapping[str, Mapping[str, Any]], pricing: dict[str, Any], provider: str,
    model: str, use_batch_api: bool, served_by: str | None = None,
) -> dict[str, Any]:
    """costs.json for one trial: `summarize_costs` of its usage rows plus what each of its parts cost and who pays.

    `usage` has the columns `summarize_costs` needs plus `custom_id`; `parts` maps each part's key (`owner/jkey`) to
    `{"owner": slug, "custom_ids": [...]}` (the ids of the part's requests); a part whose owner is not `trial` is
    shared: another trial owns and pays for it. Adds `parts` ({key: the token block with its usd, owner,
    shared}, in key order), `owned_usd` (the usage of the parts `trial` owns, priced) and `shared_usd` (the same for
    the parts it reads from other trials). Each figure is priced and rounded on its own, so owned_usd + shared_usd
    and the sum of the parts' usd may differ from `usd` in the last decimal; with no shared part owned_usd == usd.
    Raises ValueError for a usage row whose custom_id is in no part, or in two.
    """
    if "custom_id" not in usage.columns:
        raise ValueError("usage lacks required column custom_id")
    costs = summarize_costs(usage, pricing=pricing, provider=provider, model=model, use_batch_api=use_batch_api,
                            served_by=served_by)
    part_of: dict[str, str] = {}
    for key, part in parts.items():
        for cid in part["custom_ids"]:
            if part_of.setdefault(cid, key) != key:
                raise ValueError(f"request {cid!r} is in two parts: {part_of[cid]} and {key}")
    keys = usage["custom_id"].astype(str).map(part_of)
    if keys.isna().any():
        raise ValueError(f"usage row {usage['custom_id'][keys.isna()].iloc[0]!r} belongs to none of the trial's parts")
    tokens = _tokens(usage)
    rates = costs["pricing"]
    owners = {key: str(part["owner"]) for key, part in parts.items()}
    blocks = {key: {**_block(tokens[keys == key], rates), "owner": owners[key], "shared": owners[key] != trial}
              for key in sorted(parts)}
    owned = keys.map(owners) == trial
    # priced from token totals like `usd`, so a trial that shares nothing has owned_usd == usd exactly
    return {**costs, "owned_usd": _block(tokens[owned], rates)["usd"], "shared_usd": _block(tokens[~owned], rates)["usd"],
            "parts": blocks}


def read_costs(path: Path) -> Any:
    """A trial's costs.json as parsed JSON, or None when it is missing or unreadable (that trial is not priced yet)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def owned_usd(costs: Any) -> float | None:
    """A trial's `owned_usd` from its costs.json (or the costs stage's manifest record); None when it has none."""
    value = costs.get("owned_usd") if isinstance(costs, Mapping) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_spent_usd(trials: Iterable[Any]) -> float | None:
    """Money the run spent per its priced results: the sum of each trial's `owned_usd`, which is the sum over the
    run's distinct parts (a shared part is priced in its owner's figure only). `trials` are costs.json dicts or the
    costs stage records (anything else, or a record without owned_usd, is a trial not priced yet and adds nothing).
    None when no trial is priced; rounded to 6 decimals.
    """
    known = [usd for usd in map(owned_usd, trials) if usd is not None]
    return round(sum(known), 6) if known else None
