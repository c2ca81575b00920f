"""power_analysis.json: minimum detectable effect and required sample sizes from the observed paired deltas.

Method (normal approximation of the paired two-sided test; the same closed form the original used):
- deltas d_i = treatment − control per paired item (see common.paired_values), n items, sd = sample sd (ddof=1);
- z = z_{1−α/2} + z_{power}; mde = z·sd/√n; required_n(target) = ceil((z·sd/target)²).
This is the exact solution of the one-sided normal power equation at level α/2 (statsmodels
`NormalIndPower(ratio=0, alternative="larger")` at alpha/2): it ignores the rejection probability in the
opposite tail, Φ(−2·z_{1−α/2} − z_power) ≈ 1e-6 at α = 0.05 and power 0.8, so statsmodels' two-sided
solution differs by about 1e-6 relative. A t-based calculation (`TTestPower`) needs about z_{1−α/2}²/2 ≈ 2
more items.
Population: `false_answer_rate` uses only open-book items flagged `is_unanswerable` in the prepared items,
as the original did (on answerable items the rate is 0 by definition, so including them only shrinks the
deltas); any other metric uses every paired item where it is defined, both task types pooled.
n < 2 or sd = 0 → sd/mde/required n are None and `reason` says why (None when everything is computable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from scipy import stats

from pipeline.stats.optional.common import paired_values, prepare_per_item, require, temp_keys
from pipeline.stats.significance import json_safe

DEFAULT_TARGETS: tuple[float, ...] = (0.02, 0.05, 0.1)
METHOD = "normal approximation, paired two-sided test: mde = (z_{1-alpha/2} + z_power)·sd/sqrt(n)"


def _unanswerable_keep(frame: pd.DataFrame, items: pd.DataFrame | None) -> pd.Series:
    if items is None:
        raise ValueError("power analysis of false_answer_rate needs the prepared items (is_unanswerable flags)")
    require(items, ("dataset", "id", "type", "is_unanswerable"), "items")
    flagged = items[items["type"].astype(str).eq("open") & items["is_unanswerable"].fillna(False).astype(bool)]
    keys = set((flagged["dataset"].astype(str) + "|" + flagged["id"].astype(str)).tolist())
    return frame["type"].eq("open") & frame["item_key"].isin(keys)


def _target_key(target: float) -> str:
    return f"{target:.3f}"


def _block(deltas: Any, z_sum: float, targets: Sequence[float]) -> dict[str, Any]:
    n = len(deltas)
    block: dict[str, Any] = {
        "n_items": n,
        "mean_delta": float(deltas.mean()) if n else None,
        "sd_delta": float(deltas.std(ddof=1)) if n >= 2 else None,
        "mde": None,
        "required_n_for_target": {_target_key(t): None for t in targets},
        "reason": None,
    }
    if n < 2:
        block["reason"] = f"needs at least 2 paired items, found {n}"
        return block
    sd = block["sd_delta"]
    if float(deltas.max()) == float(deltas.min()):  # exact: a constant array's std can be 1e-17 instead of 0
        block["sd_delta"] = 0.0
        block["reason"] = "the paired deltas have zero variance"
        return block
    block["mde"] = z_sum * sd / math.sqrt(n)
    block["required_n_for_target"] = {_target_key(t): math.ceil((z_sum * sd / t) ** 2) for t in targets}
    return block


def power_analysis(
    per_item: pd.DataFrame,
    *,
    temps: Sequence[float],
    alpha: float = 0.05,
    power: float = 0.8,
    metric: str = "false_answer_rate",
    targets: Sequence[float] = DEFAULT_TARGETS,
    items: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The power_analysis.json document (module docstring); `items` is required for false_answer_rate.

    Returns `{alpha, power, metric, targets, method, population, z_alpha, z_power,
    results: {temp_str: {n_items, mean_delta, sd_delta, mde, required_n_for_target: {"0.020": n}, reason}}}`.
    """
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie in (0, 1), got alpha={alpha}, power={power}")
    targets = sorted({float(t) for t in targets})
    if any(not (t > 0 and math.isfinite(t)) for t in targets):
        raise ValueError(f"targets must be positive, got {targets}")
    if len({_target_key(t) for t in targets}) != len(targets):
        raise ValueError(f"targets {targets} collide at 3 decimals")
    frame = prepare_per_item(per_item)
    if metric == "false_answer_rate":
        keep = _unanswerable_keep(frame, items)
        population = "open-book items flagged is_unanswerable, paired (control and treatment present)"
    else:
        keep = None
        population = f"every paired item where {metric} is defined (closed and open pooled)"
    z_alpha = float(stats.norm.ppf(1 - alpha / 2))
    z_power = float(stats.norm.ppf(power))
    results = {}
    for tkey in temp_keys(temps):
        ctrl, trt = paired_values(frame, metric, tkey, keep)
        results[tkey] = _block(trt - ctrl, z_alpha + z_power, targets)
    return json_safe(
        {
            "alpha": float(alpha),
            "power": float(power),
            "metric": metric,
            "targets": targets,
            "method": METHOD,
            "population": population,
            "z_alpha": z_alpha,
            "z_power": z_power,
            "results": results,
        }
    )
