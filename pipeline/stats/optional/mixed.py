"""mixed_models.json: a linear mixed model of EM with random intercepts per item (statsmodels MixedLM).

Model: `em ~ condition * C(temp)` fitted by REML with `groups` = item (item_key and type), i.e. a linear
probability model whose random intercept absorbs item difficulty; `condition[T.treatment]` is the treatment
effect at the lowest temperature and the interaction terms its change at the others. MixedLM rather than
BinomialBayesMixedGLM: it gives frequentist standard errors and p-values comparable with significance.json,
and the variational Bayes GLM has no p-values and depends on its prior.
Input: per-sample scored rows (then only rows with status "ok") or per-item rows; rows whose em is missing are
dropped. Rows are sorted before fitting, so any row order of the same data gives the same fit.
Bounded time: above `max_rows` rows whole items are kept in the order of a seeded hash until the budget is
reached (all rows of an item stay together), and `subsample` records it.
Outcome: `status` "ok" (fit converged), "skipped" (disabled, or nothing to model; `reason`), or "failed"
(the fit raised or did not converge; `error` holds the message, never raised, and the warnings are kept).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from pipeline.naming import CONDITIONS, temp_str
from pipeline.stats.optional.common import require
from pipeline.stats.significance import json_safe, stable_hash

FORMULA = "em ~ condition * C(temp)"
DEFAULT_MAX_ROWS = 200_000
_MAX_WARNINGS = 10


def _design(rows: pd.DataFrame) -> pd.DataFrame:
    require(rows, ("item_key", "condition", "temp", "em"), "mixed-model rows")
    if "status" in rows.columns:
        rows = rows[rows["status"].astype(str) == "ok"]
    group = rows["item_key"].astype(str)
    if "type" in rows.columns:
        group = group + "|" + rows["type"].astype(str)
    data = pd.DataFrame(
        {
            "item": group.to_numpy(),
            "condition": rows["condition"].astype(str).to_numpy(),
            "temp": [temp_str(float(t)) for t in rows["temp"]],
            "em": pd.to_numeric(rows["em"], errors="coerce").to_numpy(dtype=float),
        }
    )
    data = data[np.isfinite(data["em"]) & data["condition"].isin(CONDITIONS)]
    return data.sort_values(["item", "condition", "temp", "em"], kind="mergesort").reset_index(drop=True)


def _subsample(data: pd.DataFrame, max_rows: int, seed: int) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    if len(data) <= max_rows:
        return data, None
    sizes = data.groupby("item", sort=True).size()
    order = sorted(sizes.index, key=lambda item: stable_hash(seed, "mixed_effects", item))
    cumulative = np.cumsum(sizes.loc[order].to_numpy())
    kept = set(np.asarray(order, dtype=object)[cumulative <= max_rows].tolist())
    sampled = data[data["item"].isin(kept)].reset_index(drop=True)
    return sampled, {
        "rows_before": int(len(data)),
        "items_before": int(len(sizes)),
        "max_rows": int(max_rows),
        "method": "whole items in the order of a hash seeded by `seed`, until max_rows is reached",
    }


def _skip_reason(data: pd.DataFrame) -> str | None:
    if data.empty:
        return "no rows with an em value"
    missing = sorted(set(CONDITIONS) - set(data["condition"]))
    if missing:
        return f"no rows for condition(s) {missing}"
    if data["item"].nunique() < 2:
        return "needs at least 2 items"
    if float(data["em"].max()) == float(data["em"].min()):
        return "em is constant across rows: nothing to model"
    return None


def _messages(records: list[warnings.WarningMessage]) -> list[str]:
    """Distinct warning texts, sorted (deterministic), at most _MAX_WARNINGS."""
    return sorted({f"{r.category.__name__}: {r.message}" for r in records})[:_MAX_WARNINGS]


def _fit(data: pd.DataFrame) -> tuple[dict[str, Any], str | None]:
    """(model block, error or None) — never raises."""
    import statsmodels.formula.api as smf

    records: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            with np.errstate(all="ignore"):
                result = smf.mixedlm(FORMULA, data, groups=data["item"]).fit(reml=True)
    except Exception as exc:  # any failure of the fit is reported in the document, never raised
        return {"warnings": _messages(records)}, f"{type(exc).__name__}: {exc}"
    caught = _messages(records)
    block = {
        "params": result.params.to_dict(),
        "bse": result.bse.to_dict(),
        "pvalues": result.pvalues.to_dict(),
        "converged": bool(result.converged),
        "n_obs": int(result.nobs),
        "warnings": caught,
    }
    error = None if result.converged else "MixedLM did not converge (see warnings)"
    return block, error


def mixed_effects(
    rows: pd.DataFrame, *, enabled: bool, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 1337
) -> dict[str, Any]:
    """The mixed_models.json document (module docstring): `{status, n_rows, n_items, formula, groups, subsample,
    models: {em: {params, bse, pvalues, converged, n_obs, warnings}}}` plus `reason` or `error` when not ok."""
    out: dict[str, Any] = {"status": "skipped", "n_rows": 0, "n_items": 0, "formula": FORMULA,
                           "groups": "item (item_key|type)", "subsample": None, "models": {}}
    if not enabled:
        return {**out, "reason": "disabled"}
    data, subsample = _subsample(_design(rows), max_rows, seed)
    out.update(n_rows=int(len(data)), n_items=int(data["item"].nunique()), subsample=subsample)
    reason = _skip_reason(data)
    if reason:
        return json_safe({**out, "reason": reason})
    block, error = _fit(data)
    out["models"] = {"em": block}
    out["status"] = "failed" if error else "ok"
    if error:
        out["error"] = error
    return json_safe(out)
