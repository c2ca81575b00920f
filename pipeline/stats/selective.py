"""Selective prediction: accuracy on the items the abstention gate keeps, as the gate loosens.

Definitions, per threshold τ (items are the paired items of one block; `em` and `abstain` are per-item rates):
- kept(τ) = items with abstain_rate ≤ τ. Kept is not "answered": at τ = 1 every item is kept, abstentions
  included (an abstention then counts with its EM: 0, or 1 on an unanswerable item under the detector rule);
  `n_answered` keeps its historical name for |kept(τ)|;
- coverage = |kept| / |all items| (the original divided by the kept items, so coverage was always ~1);
- selective_accuracy = mean EM over the kept items (≤ 1 by construction; None when none is kept);
- risk = 1 − selective_accuracy.
AURC = trapezoid area of risk over coverage through the points with a defined risk, sorted by coverage
(ties in coverage keep threshold order); None when fewer than two distinct coverages are available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def selective_risk(em: np.ndarray, abstain: np.ndarray, thresholds: Sequence[float]) -> dict[str, Any]:
    """Risk–coverage points per threshold and their AURC (see module docstring)."""
    em = np.asarray(em, dtype=float)
    abstain = np.asarray(abstain, dtype=float)
    if em.shape != abstain.shape:
        raise ValueError("em and abstain must have the same shape")
    n = len(em)
    points = []
    for tau in thresholds:
        answered = abstain <= tau
        n_answered = int(answered.sum())
        accuracy = float(em[answered].mean()) if n_answered else None
        points.append(
            {
                "threshold": float(tau),
                "n_answered": n_answered,
                "coverage": n_answered / n if n else None,
                "selective_accuracy": accuracy,
                "risk": None if accuracy is None else 1.0 - accuracy,
            }
        )
    curve = sorted(
        ((p["coverage"], p["risk"]) for p in points if p["risk"] is not None),
        key=lambda cr: cr[0],
    )
    aurc = None
    if len({c for c, _ in curve}) >= 2:
        cov = np.array([c for c, _ in curve])
        risk = np.array([r for _, r in curve])
        aurc = float(np.sum(np.diff(cov) * (risk[1:] + risk[:-1]) / 2.0))
    return {"thresholds": [float(t) for t in thresholds], "points": points, "aurc": aurc}
