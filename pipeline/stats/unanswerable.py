"""unanswerable_rules.json: open-book EM and F1 under the pipeline's unanswerable rule and under the official one.

The scorer (`pipeline.scoring.score`) gives an unanswerable (SQuAD v2 `is_impossible`) item EM = F1 = 1 when the
abstention detector flags the answer (a configured phrase such as "unknown", or an empty answer), else 0. The
official SQuAD v2 script scores such an item 1 only when the prediction normalizes to the empty string
(`normalize_answer`; its gold list is [""], and EM and F1 then agree). Answerable items score the same under both.

Document (all floats JSON-safe):
    {"rules": {"detector": str, "official": str},
     "results": {temp_str(T): {"control"|"treatment": CONDITION, "delta": DELTA}}}
    CONDITION = {"n_items", "n_unanswerable", "em_detector", "em_official", "f1_detector", "f1_official",
                 "unanswerable_em_detector", "unanswerable_em_official"}
    DELTA = {"n_items", "em_detector", "em_official", "f1_detector", "f1_official"}
Rows: open-book rows with status "ok" only (others are failures, not answers). Per item, each value is the mean
over its ok samples; a condition's value is the mean over its items (the `unanswerable_*` ones over its
unanswerable items only; None when it has none). DELTA is treatment − control over the items both conditions
scored at that temperature. A temperature without open-book rows gets an empty entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.naming import CONDITIONS, temp_str
from pipeline.scoring.squad import normalize_answer
from pipeline.stats.significance import json_safe

RULES = {
    "detector": "unanswerable item: EM = F1 = 1 when the abstention detector flags the answer (configured phrase "
                "or empty answer), else 0",
    "official": "unanswerable item: EM = F1 = 1 only when the prediction normalizes to the empty string "
                "(official SQuAD v2), else 0",
}
_ROW_COLUMNS = ("item_key", "type", "condition", "temp", "status", "em", "f1", "response_text")
_VALUES = ("em_detector", "em_official", "f1_detector", "f1_official")


def unanswerable_keys(items: pd.DataFrame) -> set[str]:
    """The `dataset|id` keys of the open-book items flagged `is_unanswerable` (none when the column is absent);
    a flag counts as the scorer reads it: truthy and not NaN."""
    if "is_unanswerable" not in items.columns:
        return set()
    flags = np.array([bool(f) and not (isinstance(f, float) and math.isnan(f)) for f in items["is_unanswerable"]],
                     dtype=bool)
    chosen = items[flags & (items["type"].astype(str) == "open").to_numpy()]
    return set((chosen["dataset"].astype(str) + "|" + chosen["id"].astype(str)).tolist())


def official_rows(rows: pd.DataFrame, unanswerable: set[str]) -> pd.DataFrame:
    """The ok open-book rows with the per-row values of both rules (columns `_VALUES` plus `unanswerable`)."""
    missing = [c for c in _ROW_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"scored rows lack required columns {missing}")
    ok = rows[(rows["status"].astype(str) == "ok") & (rows["type"].astype(str) == "open")]
    out = ok.loc[:, ["item_key", "condition", "temp"]].astype({"item_key": str, "condition": str}).copy()
    out["unanswerable"] = out["item_key"].isin(unanswerable).to_numpy()
    # once per distinct response: normalizing is the costly part
    texts = ok["response_text"].fillna("").astype(str)
    codes, distinct = pd.factorize(texts)
    empty = np.array([normalize_answer(t) == "" for t in distinct], dtype=float)[codes] if len(texts) else np.empty(0)
    for metric in ("em", "f1"):
        detector = ok[metric].to_numpy(dtype=float)
        out[f"{metric}_detector"] = detector
        out[f"{metric}_official"] = np.where(out["unanswerable"].to_numpy(), empty, detector)
    return out


def _condition(per_item: pd.DataFrame) -> dict[str, Any]:
    unans = per_item[per_item["unanswerable"]]
    return {
        "n_items": int(len(per_item)),
        "n_unanswerable": int(len(unans)),
        **{name: float(per_item[name].mean()) if len(per_item) else None for name in _VALUES},
        "unanswerable_em_detector": float(unans["em_detector"].mean()) if len(unans) else None,
        "unanswerable_em_official": float(unans["em_official"].mean()) if len(unans) else None,
    }


def unanswerable_rules(rows: pd.DataFrame, items: pd.DataFrame, *, temps: Sequence[float]) -> dict[str, Any]:
    """The unanswerable_rules.json document (see the module docstring) of `score_predictions` rows with
    `response_text`, for the prepared `items` and the trial's `temps`."""
    scored = official_rows(rows, unanswerable_keys(items))
    scored["temp_key"] = [temp_str(float(t)) for t in scored["temp"]]
    results: dict[str, Any] = {}
    for temp in temps:
        key = temp_str(float(temp))
        at_temp = scored[scored["temp_key"] == key]
        if at_temp.empty:
            results[key] = {}
            continue
        per_item = at_temp.groupby(["condition", "item_key"], sort=True).agg(
            {**{name: "mean" for name in _VALUES}, "unanswerable": "first"})
        by_condition = {c: per_item.loc[c] if c in per_item.index.get_level_values(0) else per_item.iloc[:0].droplevel(0)
                        for c in CONDITIONS}
        entry: dict[str, Any] = {c: _condition(by_condition[c]) for c in CONDITIONS}
        paired = by_condition["control"].index.intersection(by_condition["treatment"].index)
        diff = by_condition["treatment"].loc[paired, list(_VALUES)] - by_condition["control"].loc[paired, list(_VALUES)]
        entry["delta"] = {"n_items": int(len(paired)),
                          **{name: float(diff[name].mean()) if len(paired) else None for name in _VALUES}}
        results[key] = entry
    return json_safe({"rules": RULES, "results": results})
