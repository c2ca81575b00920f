"""Fixed-effect and DerSimonian–Laird random-effects meta-analysis of K group effects.

Given per-group effects y_k and their sampling variances v_k (> 0):
- fixed: weights w = 1/v, mean = Σw·y/Σw, se = sqrt(1/Σw), normal 95% CI.
- Q = Σw·(y − mean_fixed)², df = K − 1, p_value = chi2.sf(Q, df) (None when df = 0).
- DerSimonian–Laird: tau² = max(0, (Q − df)/C) with C = Σw − Σw²/Σw (0 when K = 1);
  random weights 1/(v + tau²), mean and se as above.
- I² = max(0, (Q − df)/Q) (0 when Q = 0).
Equal to `statsmodels.stats.meta_analysis.combine_effects(method_re="dl")` when Q ≥ df; statsmodels does not
truncate tau² and I² at zero, the usual DerSimonian–Laird definitions (used here) do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats


def _ci(mean: float, se: float, crit: float) -> list[float]:
    return [mean - crit * se, mean + crit * se]


def meta_analysis(effects: Sequence[float], variances: Sequence[float]) -> dict[str, Any]:
    """Fixed and random effects with heterogeneity; ValueError on K = 0, mismatched lengths or variance ≤ 0."""
    y = np.asarray(effects, dtype=float)
    v = np.asarray(variances, dtype=float)
    if y.ndim != 1 or y.shape != v.shape or len(y) == 0:
        raise ValueError("meta_analysis needs equally long, non-empty 1-D effects and variances")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError("meta_analysis needs finite effects and finite, strictly positive variances")
    k = len(y)
    crit = float(stats.norm.isf(0.025))
    w = 1.0 / v
    w_total = w.sum()
    mean_fe = float((w * y).sum() / w_total)
    se_fe = float(np.sqrt(1.0 / w_total))
    q = float((w * (y - mean_fe) ** 2).sum())
    df = k - 1
    c = float(w_total - (w**2).sum() / w_total)
    tau2 = max(0.0, (q - df) / c) if df > 0 and c > 0 else 0.0
    w_re = 1.0 / (v + tau2)
    mean_re = float((w_re * y).sum() / w_re.sum())
    se_re = float(np.sqrt(1.0 / w_re.sum()))
    return {
        "k": k,
        "fixed": {"delta_mean": mean_fe, "se": se_fe, "ci_95": _ci(mean_fe, se_fe, crit)},
        "random": {"delta_mean": mean_re, "se": se_re, "ci_95": _ci(mean_re, se_re, crit), "tau2": tau2},
        "heterogeneity": {
            "Q": q,
            "df": df,
            "p_value": float(stats.chi2.sf(q, df)) if df > 0 else None,
            "I2": max(0.0, (q - df) / q) if q > 0 else 0.0,
        },
    }
