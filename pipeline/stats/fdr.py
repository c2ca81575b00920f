"""Benjamini–Hochberg false discovery rate adjustment."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def benjamini_hochberg(pvals: Sequence[float | None]) -> list[float]:
    """BH q-values in input order: q_(i) = min over j ≥ i of p_(j)·m/j, capped at 1 (the step-up).

    NaN (or None) p-values stay NaN and do not count in m. Equal to statsmodels
    `multipletests(p, method="fdr_bh")[1]` on the finite entries.
    """
    p = np.array([math.nan if v is None else float(v) for v in pvals], dtype=float)
    q = np.full(p.shape, math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return q.tolist()
    order = valid[np.argsort(p[valid], kind="mergesort")]
    scaled = p[order] * m / np.arange(1, m + 1)
    # running minimum from the largest p downwards: the original ran it upwards, which is anti-conservative
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q.tolist()
