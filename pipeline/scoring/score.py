"""Score parsed predictions against the prepared items; aggregate them per item.

`score_predictions` contract (one output row per prediction row, same order):
- `status`: `provider_error` when `error` is non-empty, else `truncated` when `finish_reason == "length"`,
  else `ok`. Rows that are not ok get NaN metrics: they are failures to count, not wrong answers.
- Open-book, unanswerable: abstained → em = f1 = 1, false_answer = 0; otherwise em = f1 = 0, false_answer = 1.
- Open-book, answerable: em/f1 best over the gold answers (official SQuAD v2), false_answer = 0.
- Closed-book: em and f1 best over the gold answers; false_answer and unsupported are NaN.
- unsupported (open-book only, unanswerable items included): 0 when abstained ≥ `unsupported_threshold`,
  else `is_unsupported(response, context)` with the configured strategy.
- `abstained` follows `pipeline.scoring.abstention.is_abstention`; an empty (ok) response counts as an
  abstention, matching the official metric where the empty prediction is the no-answer prediction.
Text work is done once per unique response and once per unique (response, item) pair; rows are then filled
by integer indexing, so a million rows with repeated answers cost little more than their distinct answers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.naming import TYPES
from pipeline.scoring.abstention import DEFAULT_MARKERS, is_abstention
from pipeline.scoring.squad import bag_f1, gold_answers, normalize_answer
from pipeline.scoring.unsupported import STRATEGIES, tokens, unsupported_normalized

STATUSES: tuple[str, ...] = ("ok", "provider_error", "truncated")
KEY_COLUMNS: tuple[str, ...] = ("item_key", "type", "condition", "temp")
ROW_METRICS: tuple[str, ...] = ("em", "f1", "abstained", "false_answer", "unsupported")
# per-row metric -> per-item column stem, as in the original per_item_scores.csv
ITEM_METRICS: dict[str, str] = {
    "em": "em",
    "f1": "f1",
    "abstained": "abstain_rate",
    "false_answer": "false_answer_rate",
    "unsupported": "unsupported_rate",
}
PER_ITEM_COLUMNS: tuple[str, ...] = (
    *sorted([*KEY_COLUMNS, *ITEM_METRICS.values(), *(f"{m}_std" for m in ITEM_METRICS.values())]),
    "n_samples",
    "n_excluded",
)
_REQUIRED_PREDICTION_COLUMNS = (
    "dataset", "item_id", "condition", "temp", "sample_index", "type", "finish_reason", "response_text",
)
_REQUIRED_ITEM_COLUMNS = ("dataset", "id", "type", "answers")


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks required columns {missing}")


def _text(series: pd.Series) -> pd.Series:
    return series.fillna("").astype(str)


def _key(dataset: pd.Series, item_id: pd.Series) -> pd.Series:
    return _text(dataset) + "|" + _text(item_id)


def _answers(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _bag(normalized: str) -> tuple[Counter[str], int]:
    tokens_ = normalized.split()
    return Counter(tokens_), len(tokens_)


class _Item:
    """Per-item text prepared once: normalized golds and their token multisets, normalized context."""

    __slots__ = ("gold_norms", "gold_bags", "gold_vocab", "context_norm", "context_tokens")

    def __init__(self, answers: Any, context: Any, overlap: bool) -> None:
        golds = [normalize_answer(g) for g in gold_answers(_answers(answers))]
        self.gold_norms = frozenset(golds)
        self.gold_bags = [_bag(g) for g in golds]
        self.gold_vocab = frozenset(token for g in golds for token in g.split())
        self.context_norm = normalize_answer(context) if isinstance(context, str) else ""
        self.context_tokens = frozenset(tokens(self.context_norm)) if overlap else None


def _item_positions(pred_key: pd.Series, pred_type: pd.Series, items: pd.DataFrame) -> np.ndarray:
    """Row position in `items` of each prediction's (dataset|id, type); ValueError on missing or ambiguous items."""
    item_keys = _key(items["dataset"], items["id"]) + "\x1f" + _text(items["type"])
    duplicated = item_keys[item_keys.duplicated()]
    if len(duplicated):
        shown = sorted(set(duplicated.str.replace("\x1f", " type=", regex=False)))[:5]
        raise ValueError(f"items hold {len(duplicated)} duplicate (dataset|id, type) rows, e.g. {shown}")
    pred_keys = pred_key + "\x1f" + pred_type
    positions = pd.Index(item_keys).get_indexer(pred_keys)
    if (positions < 0).any():
        missing = pd.unique(pred_keys[positions < 0]).tolist()
        shown = [k.replace("\x1f", " type=") for k in missing[:5]]
        raise ValueError(
            f"{len(missing)} predicted item(s) are missing from the prepared items "
            f"({int((positions < 0).sum())} prediction rows), e.g. {shown}"
        )
    return positions


def _flag(series: pd.Series, test: Any) -> np.ndarray:
    """`test(value.strip())` per row, evaluated once per distinct value (these columns repeat a handful of values)."""
    codes, uniques = pd.factorize(_text(series).to_numpy())
    return np.array([bool(test(u.strip())) for u in uniques], dtype=bool)[codes]


def _row_status(predictions: pd.DataFrame) -> np.ndarray:
    status = np.where(_flag(predictions["finish_reason"], lambda v: v == "length"), "truncated", "ok").astype(object)
    if "error" in predictions.columns:
        status[_flag(predictions["error"], bool)] = "provider_error"
    return status


def score_predictions(
    predictions: pd.DataFrame,
    items: pd.DataFrame,
    *,
    markers: Sequence[str] = DEFAULT_MARKERS,
    unsupported_strategy: str = "baseline",
    unsupported_threshold: float = 0.5,
    min_token_overlap: float = 0.6,
) -> pd.DataFrame:
    """One scored row per prediction (see module docstring); raises ValueError on unknown items or types."""
    if unsupported_strategy not in STRATEGIES:
        raise ValueError(f"unknown unsupported strategy {unsupported_strategy!r}; expected one of {STRATEGIES}")
    _require(predictions, _REQUIRED_PREDICTION_COLUMNS, "predictions")
    _require(items, _REQUIRED_ITEM_COLUMNS, "items")
    pred_type = _text(predictions["type"])
    bad_types = sorted(set(pred_type.unique()) - set(TYPES))
    if bad_types:
        raise ValueError(f"predictions have unknown type(s) {bad_types[:5]}; expected {TYPES}")

    pred_key = _key(predictions["dataset"], predictions["item_id"])
    positions = _item_positions(pred_key, pred_type, items)
    status = _row_status(predictions)
    n_rows = len(predictions)
    out = pd.DataFrame(
        {
            **({"custom_id": _text(predictions["custom_id"]).to_numpy()} if "custom_id" in predictions else {}),
            "item_key": pred_key.to_numpy(),
            "dataset": _text(predictions["dataset"]).to_numpy(),
            "type": pred_type.to_numpy(),
            "condition": _text(predictions["condition"]).to_numpy(),
            "temp": pd.to_numeric(predictions["temp"]).astype(float).to_numpy(),
            "sample_index": pd.to_numeric(predictions["sample_index"]).astype(int).to_numpy(),
            "status": status,
        }
    )
    metrics = {m: np.full(n_rows, np.nan) for m in ROW_METRICS}
    ok = np.flatnonzero(status == "ok")
    if len(ok):
        _score_ok_rows(
            ok, positions, predictions, items, metrics, markers=tuple(markers), strategy=unsupported_strategy,
            threshold=unsupported_threshold, min_token_overlap=min_token_overlap,
        )
    for name in ROW_METRICS:
        out[name] = metrics[name]
    return out


def _score_ok_rows(
    ok: np.ndarray,
    positions: np.ndarray,
    predictions: pd.DataFrame,
    items: pd.DataFrame,
    metrics: dict[str, np.ndarray],
    *,
    markers: tuple[str, ...],
    strategy: str,
    threshold: float,
    min_token_overlap: float,
) -> None:
    """Fill `metrics` in place for the ok rows; text work once per unique response / (response, item) pair."""
    item_pos = positions[ok]
    used_items, item_code = np.unique(item_pos, return_inverse=True)
    item_type = _text(items["type"]).to_numpy()[used_items]
    is_open = item_type == "open"
    if "is_unanswerable" in items.columns:
        flags = items["is_unanswerable"].to_numpy()[used_items]
        unanswerable = np.array([bool(f) and not (isinstance(f, float) and math.isnan(f)) for f in flags])
    else:
        unanswerable = np.zeros(len(used_items), dtype=bool)
    unanswerable &= is_open
    contexts = items["context"].to_numpy()[used_items] if "context" in items.columns else [None] * len(used_items)
    answers = items["answers"].to_numpy()[used_items]
    prepared = [
        _Item(answers[i], contexts[i] if is_open[i] else None, strategy == "overlap") for i in range(len(used_items))
    ]

    resp_code, responses = pd.factorize(_text(predictions["response_text"]).to_numpy()[ok])
    resp_norm = [normalize_answer(r) for r in responses]
    resp_abst = np.array([is_abstention(r, markers) for r in responses], dtype=bool)

    n_used = len(used_items)
    pairs, pair_code = np.unique(resp_code.astype(np.int64) * n_used + item_code, return_inverse=True)
    resp_bags = [_bag(norm) for norm in resp_norm]
    pair_em = np.zeros(len(pairs))
    pair_f1 = np.zeros(len(pairs))
    pair_unsup = np.zeros(len(pairs))
    for p, (r, i) in enumerate(zip((pairs // n_used).tolist(), (pairs % n_used).tolist(), strict=True)):
        item = prepared[i]
        norm = resp_norm[r]
        if not unanswerable[i]:  # unanswerable em/f1 follow abstention, set below
            if norm in item.gold_norms:
                pair_em[p] = pair_f1[p] = 1.0  # equal normalized text has equal tokens
            else:
                bag, n_tokens = resp_bags[r]
                if not bag.keys().isdisjoint(item.gold_vocab):
                    pair_f1[p] = max(bag_f1(bag, n_tokens, gold, n_gold) for gold, n_gold in item.gold_bags)
        if is_open[i] and float(resp_abst[r]) < threshold:
            pair_unsup[p] = unsupported_normalized(
                norm, item.context_norm, item.context_tokens, strategy=strategy, min_token_overlap=min_token_overlap
            )

    abst = resp_abst[resp_code].astype(float)
    row_open = is_open[item_code]
    row_unans = unanswerable[item_code]
    metrics["abstained"][ok] = abst
    metrics["em"][ok] = np.where(row_unans, abst, pair_em[pair_code])
    metrics["f1"][ok] = np.where(row_unans, abst, pair_f1[pair_code])
    metrics["false_answer"][ok] = np.where(row_open, np.where(row_unans, 1.0 - abst, 0.0), np.nan)
    metrics["unsupported"][ok] = np.where(row_open, np.where(abst >= threshold, 0.0, pair_unsup[pair_code]), np.nan)


def per_item_scores(scored: pd.DataFrame) -> pd.DataFrame:
    """Aggregate scored rows per (item_key, type, condition, temp) over the ok rows.

    Columns: the original's alphabetically sorted ones (mean and sample std with ddof=1, std 0 when only one
    value; NaN where a metric does not apply, e.g. false_answer_rate for closed-book), then `n_samples` (ok rows)
    and `n_excluded` (rows that are not ok). A group whose rows all failed is kept with NaN metrics so the
    failures stay visible. Rows are sorted by (temp, type, condition, item_key).
    """
    _require(scored, (*KEY_COLUMNS, "status", *ROW_METRICS), "scored predictions")
    frame = scored.loc[:, [*KEY_COLUMNS, *ROW_METRICS]].copy()
    ok = scored["status"].to_numpy() == "ok"
    frame["n_samples"] = ok.astype(np.int64)
    frame["n_excluded"] = (~ok).astype(np.int64)
    grouped = frame.groupby(list(KEY_COLUMNS), sort=False, observed=True, dropna=False)
    means = grouped[list(ROW_METRICS)].mean()
    stds = grouped[list(ROW_METRICS)].std(ddof=1)
    counts = grouped[list(ROW_METRICS)].count()
    stds = stds.mask((counts <= 1) & means.notna(), 0.0)
    result = pd.DataFrame(index=means.index)
    for metric, stem in ITEM_METRICS.items():
        result[stem] = means[metric]
        result[f"{stem}_std"] = stds[metric]
    sums = grouped[["n_samples", "n_excluded"]].sum()
    result["n_samples"] = sums["n_samples"].astype(np.int64)
    result["n_excluded"] = sums["n_excluded"].astype(np.int64)
    result = result.reset_index().sort_values(["temp", "type", "condition", "item_key"], kind="mergesort")
    return result.loc[:, list(PER_ITEM_COLUMNS)].reset_index(drop=True)


def _mean_or_none(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if len(finite) else None


def score_summary(scored: pd.DataFrame) -> dict[str, Any]:
    """Row counts per status and per (temp, type, condition), with row-level means over ok rows (JSON-safe)."""
    _require(scored, (*KEY_COLUMNS, "status", *ROW_METRICS), "scored predictions")

    def counts(status: pd.Series) -> dict[str, int]:
        found = status.value_counts()
        return {s: int(found.get(s, 0)) for s in STATUSES}

    groups = []
    for (temp, type_, condition), part in scored.groupby(["temp", "type", "condition"], sort=True):
        ok = part[part["status"] == "ok"]
        groups.append(
            {
                "temp": float(temp),
                "type": str(type_),
                "condition": str(condition),
                "n_rows": int(len(part)),
                "n_items": int(part["item_key"].nunique()),
                "status_counts": counts(part["status"]),
                "means": {ITEM_METRICS[m]: _mean_or_none(ok[m].to_numpy(dtype=float)) for m in ROW_METRICS},
            }
        )
    return {"n_rows": int(len(scored)), "status_counts": counts(scored["status"]), "groups": groups}
