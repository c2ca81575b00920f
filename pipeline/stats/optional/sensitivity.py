"""unsupported_sensitivity.json: how the unsupported-rate delta moves with the overlap strategy's threshold.

What is swept is `min_token_overlap` of the `overlap` strategy (pipeline.scoring.unsupported); the original
swept the abstention gate instead and got a nearly constant curve. Each row's unsupported flag at threshold θ
is exactly what `score_predictions(unsupported_strategy="overlap", min_token_overlap=θ)` gives:
- only open-book rows with status "ok" count (others are failures, not answers);
- 0 when the row's `abstained` ≥ `abstain_gate` (the scorer's `unsupported_threshold`, default 0.5);
- else 1 when the normalized response has no token, else 1 when the fraction of its tokens (with multiplicity)
  found in the context's token set is < θ.
The fraction is computed once per distinct (response, item) pair and then compared with every threshold.
Per (item, condition) the rate is the mean over the ok samples; deltas (treatment − control) are over the
items paired at that temperature. ci_95 is the percentile bootstrap of the mean delta
(`pipeline.stats.paired.bootstrap_ci`); at one temperature every threshold uses the same resampled items
(one stream seeded by (seed, "unsupported_sensitivity", temp)), so differences between thresholds are not
resampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.naming import temp_str
from pipeline.scoring.squad import normalize_answer
from pipeline.scoring.unsupported import tokens
from pipeline.stats.optional.common import require, rng, temp_keys
from pipeline.stats.paired import bootstrap_ci
from pipeline.stats.significance import json_safe

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(i / 10 for i in range(11))
STREAM = "unsupported_sensitivity"
_ROW_COLUMNS = ("item_key", "type", "condition", "temp", "status", "abstained", "response_text")


def threshold_key(threshold: float) -> str:
    """`0.60`; more digits when two decimals would change the value (like naming.temp_str)."""
    two = f"{threshold:.2f}"
    return two if float(two) == float(threshold) else repr(float(threshold))


def _context_vocab(items: pd.DataFrame) -> dict[str, frozenset[str]]:
    require(items, ("dataset", "id", "type"), "items")
    open_items = items[items["type"].astype(str) == "open"]
    keys = (open_items["dataset"].astype(str) + "|" + open_items["id"].astype(str)).tolist()
    contexts = open_items["context"].tolist() if "context" in open_items.columns else [None] * len(keys)
    if len(set(keys)) != len(keys):
        raise ValueError("items hold duplicate open-book (dataset|id) rows")
    return {k: frozenset(tokens(normalize_answer(c) if isinstance(c, str) else "")) for k, c in zip(keys, contexts,
                                                                                                       strict=True)}


def overlap_fractions(responses: Sequence[str], item_keys: Sequence[str], items: pd.DataFrame) -> np.ndarray:
    """Per row: the fraction of the normalized response's tokens found in its item's context; NaN without tokens.

    Work is done once per distinct response and once per distinct (response, item) pair. ValueError when an
    item is not an open-book item of `items`.
    """
    vocab = _context_vocab(items)
    missing = sorted(set(item_keys) - set(vocab))
    if missing:
        raise ValueError(f"{len(missing)} scored open-book item(s) are missing from the prepared items, e.g. {missing[:5]}")
    resp_code, uniq_resp = pd.factorize(np.asarray(responses, dtype=object))
    item_code, uniq_items = pd.factorize(np.asarray(item_keys, dtype=object))
    resp_tokens = [tokens(normalize_answer(r)) for r in uniq_resp]
    n_items = max(len(uniq_items), 1)
    pairs, pair_code = np.unique(resp_code.astype(np.int64) * n_items + item_code, return_inverse=True)
    frac = np.full(len(pairs), np.nan)
    for p, (r, i) in enumerate(zip((pairs // n_items).tolist(), (pairs % n_items).tolist(), strict=True)):
        toks = resp_tokens[r]
        if toks:
            context = vocab[uniq_items[i]]
            frac[p] = sum(1 for t in toks if t in context) / len(toks)
    return frac[pair_code.ravel()]


def _unsupported_matrix(frac: np.ndarray, gated: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """rows × thresholds of 0/1: no tokens → 1, fraction < θ → 1, abstention-gated rows → 0."""
    with np.errstate(invalid="ignore"):
        flags = np.isnan(frac)[:, None] | (frac[:, None] < thresholds[None, :])
    flags[gated] = False
    return flags.astype(float)


def _empty_point() -> dict[str, Any]:
    return {"n_items": 0, "control_rate": None, "treatment_rate": None, "delta_mean": None, "ci_95": [None, None]}


def unsupported_sensitivity(
    scored_rows: pd.DataFrame,
    items: pd.DataFrame,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    strategy: str = "overlap",
    abstain_gate: float = 0.5,
    temps: Sequence[float] | None = None,
    n_bootstrap: int = 5000,
    seed: int = 1337,
) -> dict[str, Any]:
    """The unsupported_sensitivity.json document (module docstring).

    `scored_rows`: `score_predictions` output plus the predictions' `response_text` column (score_predictions
    keeps row order, so `scored.assign(response_text=predictions["response_text"].to_numpy())`). `items`: the
    prepared items (dataset, id, type, context). `temps` defaults to the temperatures in the rows.
    Returns `{strategy, thresholds, abstain_gate, n_bootstrap, seed, ci_method, results: {temp_str:
    {threshold_key: {delta_mean, ci_95, n_items, control_rate, treatment_rate}}}}`.
    """
    if strategy != "overlap":
        raise ValueError(f"only the overlap strategy has a threshold to sweep, got {strategy!r}")
    grid = sorted({float(t) for t in thresholds})
    if not grid or any(not math.isfinite(t) for t in grid):
        raise ValueError(f"thresholds must be finite numbers, got {list(thresholds)}")
    require(scored_rows, _ROW_COLUMNS, "scored rows (score_predictions output plus response_text)")
    rows = scored_rows[(scored_rows["type"].astype(str) == "open") & (scored_rows["status"].astype(str) == "ok")]
    item_keys = rows["item_key"].astype(str).to_numpy()
    frac = overlap_fractions(rows["response_text"].fillna("").astype(str).tolist(), item_keys.tolist(), items)
    gated = pd.to_numeric(rows["abstained"], errors="coerce").fillna(0.0).to_numpy(dtype=float) >= abstain_gate
    flags = _unsupported_matrix(frac, gated, np.asarray(grid))
    columns = [threshold_key(t) for t in grid]
    rates = (
        pd.DataFrame(flags, columns=columns)
        .assign(temp_key=[temp_str(float(t)) for t in rows["temp"]], item_key=item_keys,
                condition=rows["condition"].astype(str).to_numpy())
        .groupby(["temp_key", "condition", "item_key"], sort=True)[columns]
        .mean()
    )
    wanted = temp_keys(temps if temps is not None else rows["temp"].astype(float).unique())
    results: dict[str, Any] = {}
    for tkey in wanted:
        results[tkey] = _temp_block(rates, tkey, columns, n_bootstrap=n_bootstrap, seed=seed)
    return json_safe(
        {
            "strategy": strategy,
            "thresholds": grid,
            "swept": "min_token_overlap",
            "abstain_gate": float(abstain_gate),
            "n_bootstrap": int(n_bootstrap),
            "seed": int(seed),
            "ci_method": "percentile_bootstrap",
            "results": results,
        }
    )


def _temp_block(rates: pd.DataFrame, tkey: str, columns: list[str], *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    def side(condition: str) -> pd.DataFrame:
        try:
            return rates.loc[(tkey, condition)]
        except KeyError:
            return pd.DataFrame(columns=columns, dtype=float)

    ctrl, trt = side("control"), side("treatment")
    paired = ctrl.index.intersection(trt.index).sort_values()
    if len(paired) == 0:
        return {key: _empty_point() for key in columns}
    c = ctrl.loc[paired, columns].to_numpy(dtype=float)
    t = trt.loc[paired, columns].to_numpy(dtype=float)
    block = {}
    for j, key in enumerate(columns):
        deltas = t[:, j] - c[:, j]
        block[key] = {
            "n_items": int(len(paired)),
            "control_rate": float(c[:, j].mean()),
            "treatment_rate": float(t[:, j].mean()),
            "delta_mean": float(deltas.mean()),
            "ci_95": bootstrap_ci(deltas, n_resamples=n_bootstrap, rng=rng(seed, STREAM, tkey)),
        }
    return block
