"""Helpers shared by the optional analyses: per-item validation, pairing, seeded streams, JSON safety.

Pairing is the one significance.json uses: an item is paired at a temperature when the per-item table has a
control and a treatment row for (item_key, type, temp); a metric then uses the paired items where both values
are present. Rows are sorted by (type, item_key) first, so any row order of the same table gives the same arrays.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.naming import temp_str
from pipeline.stats.significance import stable_hash

PER_ITEM_KEYS: tuple[str, ...] = ("item_key", "type", "condition", "temp")


def rng(seed: int, *stream: object) -> np.random.Generator:
    """The generator of one named random stream: the same (seed, stream) always gives the same draws."""
    return np.random.default_rng([int(seed), stable_hash(*stream)])


def require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks required columns {missing}")


def temp_keys(temps: Iterable[float]) -> list[str]:
    """`temp_str` labels of `temps`, unique, in increasing temperature."""
    return [temp_str(t) for t in sorted({float(t) for t in temps})]


def prepare_per_item(per_item: pd.DataFrame) -> pd.DataFrame:
    """A copy with str keys and a `temp_key` column, sorted; ValueError on missing keys or duplicate rows."""
    require(per_item, PER_ITEM_KEYS, "per-item scores")
    frame = per_item.copy()
    for col in ("item_key", "type", "condition"):
        frame[col] = frame[col].astype(str)
    frame["temp_key"] = [temp_str(float(t)) for t in frame["temp"]]
    keys = ["item_key", "type", "condition", "temp_key"]
    dup = frame.duplicated(keys)
    if dup.any():
        shown = frame.loc[dup, keys].head(5).values.tolist()
        raise ValueError(f"per-item scores have {int(dup.sum())} duplicate (item, type, condition, temp) rows: {shown}")
    return frame.sort_values(["temp_key", "type", "item_key", "condition"], kind="mergesort").reset_index(drop=True)


def paired_values(
    frame: pd.DataFrame, metric: str, temp_key: str, keep: pd.Series | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Control and treatment values of `metric` at `temp_key` over the paired items where both are present.

    `frame` comes from `prepare_per_item`; `keep` (a boolean Series on its index) restricts the rows first.
    Values are ordered by (type, item_key).
    """
    if metric not in frame.columns:
        return np.empty(0), np.empty(0)
    rows = frame[frame["temp_key"] == temp_key]
    if keep is not None:
        rows = rows[keep.loc[rows.index]]
    values = pd.to_numeric(rows[metric], errors="coerce")
    by_cond = {
        cond: values[rows["condition"] == cond].set_axis(
            pd.MultiIndex.from_frame(rows.loc[rows["condition"] == cond, ["type", "item_key"]])
        )
        for cond in ("control", "treatment")
    }
    both = pd.concat(by_cond, axis=1).dropna().sort_index()
    return both["control"].to_numpy(dtype=float), both["treatment"].to_numpy(dtype=float)
