"""significance.json (schema_version 2): paired control-vs-treatment statistics per temperature and task type.

Structure (all floats JSON-safe: NaN/inf become None):
    {"schema_version": 2, "temps": [trial temps], "stats_config": {effective settings},
     "fdr": {"method", "n_tests", "scope", "family": [test ids], "excluded": [{"test", "reason"}]},
     "results": {temp_str(T): {"closed"|"open": BLOCK}}}
    BLOCK = {"n_items", "item_set", "counts", "mcnemar", "metrics", "selective_risk",
             "subgroups": {"dataset": {<dataset>: BLOCK without counts/subgroups/meta/noninferiority}},
             "meta": {"em"|"f1": …}, "noninferiority": {"em"|"f1": …}}
    metrics[m] = {"n_items", "control_mean", "treatment_mean", "delta_mean", "ci_95", "ci_method", "ci_95_bca",
                  "bootstrap_samples", "wilcoxon", "hodges_lehmann", "d_z", "cliffs_delta_unpaired", "perm_p_value"}
Rules:
- Pairing: an item is paired when per_item has both a control and a treatment row for (item_key, type, temp);
  each metric then uses the paired items where both values are present (`n_items` per metric).
- Deltas are treatment − control. `d_z` is mean/sd of the paired deltas (files before this version called it
  `cohens_d`). McNemar binarizes the per-item EM rate at ≥ 0.5 (`mcnemar.rule`; with one sample per item that is
  the item's EM). `cliffs_delta_unpaired` compares the treatment and control per-item values as two independent
  samples (it ignores the pairing). `noninferiority` is the one-sided t test H0: mean delta ≤ −margin, i.e. the
  lower half of a TOST only (files before this version called it `tost`).
- Subgroups: the dataset, i.e. the item_key prefix before "|". Meta-analysis (em, f1) runs across dataset
  subgroups with ≥ 2 items when there are at least two of them (else `{"status": "insufficient_groups"}`;
  a subgroup whose deltas are all equal has no sampling variance: `{"status": "zero_variance"}`).
- Benjamini–Hochberg q-values over one explicit family, one test per hypothesis (`_family`): its members are
  listed in `fdr.family`, the tests left out (duplicates of a member's hypothesis) in `fdr.excluded`. `q_value`
  is written next to each member's p, None elsewhere (and when FDR is disabled or the p-value is undefined).
- Every randomized test draws from its own generator, seeded by (random_seed, digest of the sorted item keys
  (`item_set`), metric, test): the same items always get the same resamples, so a block and a subgroup holding
  the same items report the same interval and permutation p, and results do not depend on the order of
  computation; rows are sorted by item_key first, so the same per-item table in any row order gives
  byte-identical JSON.
- The per-metric blocks run on a few threads (numpy releases the GIL while resampling); each block is a pure
  function of its data and its own stream, so the document does not depend on the scheduling.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from pipeline.naming import TYPES, temp_str
from pipeline.stats.fdr import benjamini_hochberg
from pipeline.stats.meta import meta_analysis
from pipeline.stats.paired import (
    bootstrap_cis,
    cliffs_delta,
    cohens_dz,
    hodges_lehmann,
    mcnemar_exact,
    sign_flip_permutation_p,
    tost_noninferiority,
    wilcoxon,
)
from pipeline.stats.selective import selective_risk

SCHEMA_VERSION = 2
DEFAULT_STATS_CFG: dict[str, Any] = {
    "bootstrap_samples": 5000,
    "permutation_samples": 5000,
    "random_seed": 1337,
    "enable_permutation": True,
    "enable_fdr": True,
    "risk_thresholds": [0.0, 0.25, 0.5, 0.75, 1.0],
    "tost_alpha": 0.05,
    "tost_margins": {"em": 0.01, "f1": 0.01},
}
METRICS: dict[str, tuple[str, ...]] = {
    "closed": ("em", "f1", "abstain_rate"),
    "open": ("em", "f1", "abstain_rate", "false_answer_rate", "unsupported_rate"),
}
PAIRED_METRICS: tuple[str, ...] = ("em", "f1")  # meta-analysis and non-inferiority
CI_METHOD = "percentile_bootstrap"
MCNEMAR_RULE = "per-item EM binarised at >= 0.5 (with K > 1 samples per item: EM on at least half of them)"
NONINFERIORITY_TEST = "one-sided paired t test of H0: mean delta <= -margin (not a two-sided TOST)"
FAMILY_SCOPE = (
    "one test per hypothesis: per temperature x task type x scope (all items; each dataset whose items differ "
    "from all items), the Wilcoxon signed-rank test of every metric, and McNemar on binarised EM unless per-item "
    "EM is binary (then it is the EM Wilcoxon hypothesis); members in `family`, left-out tests in `excluded`"
)
MIN_SUBGROUP_ITEMS = 2
_THREADS = max(1, min(4, os.cpu_count() or 1))
Submit = Callable[..., Future]
_KEYS = ("item_key", "type", "condition", "temp")


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of `parts` that is the same in every process (unlike `hash`)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(cfg: dict[str, Any], *stream: object) -> np.random.Generator:
    return np.random.default_rng([int(cfg["random_seed"]), stable_hash(*stream)])


def effective_stats_cfg(stats_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with the given settings (tost_margins merged per metric); unknown keys are kept."""
    cfg = copy.deepcopy(DEFAULT_STATS_CFG)
    given = {k: v for k, v in (stats_cfg or {}).items() if v is not None}
    margins = {**cfg["tost_margins"], **(given.pop("tost_margins", None) or {})}
    cfg.update(given)
    cfg["tost_margins"] = margins
    cfg["risk_thresholds"] = sorted(float(t) for t in cfg["risk_thresholds"])
    return cfg


def _paired_values(ctrl: pd.DataFrame, trt: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Control values, treatment values and item keys of `metric` on the paired items where both are present."""
    if metric not in ctrl.columns:
        return np.empty(0), np.empty(0), np.empty(0, dtype=object)
    c = ctrl[metric].to_numpy(dtype=float)
    t = trt[metric].to_numpy(dtype=float)
    valid = ~(np.isnan(c) | np.isnan(t))
    return c[valid], t[valid], ctrl.index.to_numpy(dtype=object)[valid]


def _metric_values(ctrl: pd.DataFrame, trt: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Control and treatment values of `metric` on the paired items where both are present."""
    c, t, _ = _paired_values(ctrl, trt, metric)
    return c, t


def item_set_key(keys: np.ndarray) -> str:
    """A digest of the sorted item keys: the identity of an item set, whatever block it was computed in."""
    return hashlib.sha256("\x1f".join(sorted(str(k) for k in keys)).encode()).hexdigest()


def _metric_block(c: np.ndarray, t: np.ndarray, keys: np.ndarray, cfg: dict[str, Any], metric: str) -> dict[str, Any]:
    """Paired tests of one metric. The resampling streams are keyed by (item set, metric, test) only, so the same
    items give the same interval and permutation p in every block that holds them (e.g. a block and its only
    dataset); `keys` are in the same (sorted) order as `c` and `t`."""
    d = t - c
    n = len(d)
    if n == 0:
        return {
            "n_items": 0, "control_mean": None, "treatment_mean": None, "delta_mean": None,
            "ci_95": [None, None], "ci_method": CI_METHOD, "ci_95_bca": [None, None],
            "bootstrap_samples": int(cfg["bootstrap_samples"]),
            "wilcoxon": {"W": None, "p_value": None, "q_value": None},
            "hodges_lehmann": None, "d_z": None, "cliffs_delta_unpaired": None, "perm_p_value": None,
        }
    items = item_set_key(keys)
    cis = bootstrap_cis(d, n_resamples=int(cfg["bootstrap_samples"]), rng=_rng(cfg, items, metric, "bootstrap"))
    perm_p = None
    if cfg["enable_permutation"]:
        perm_p = sign_flip_permutation_p(
            d, n_resamples=int(cfg["permutation_samples"]), rng=_rng(cfg, items, metric, "sign_flip")
        )
    return {
        "n_items": n,
        "control_mean": float(c.mean()),
        "treatment_mean": float(t.mean()),
        "delta_mean": float(d.mean()),
        "ci_95": cis["percentile"],
        "ci_method": CI_METHOD,
        "ci_95_bca": cis["bca"],  # the same resamples: the two intervals differ only by the method
        "bootstrap_samples": int(cfg["bootstrap_samples"]),
        "wilcoxon": {**wilcoxon(d), "q_value": None},
        "hodges_lehmann": hodges_lehmann(d),
        "d_z": cohens_dz(d),
        # two independent samples (treatment vs control values), ignoring the pairing: see the module docstring
        "cliffs_delta_unpaired": cliffs_delta(t, c),
        "perm_p_value": perm_p,
    }


def _selective(ctrl: pd.DataFrame, trt: pd.DataFrame, thresholds: list[float]) -> dict[str, Any]:
    cols = ["em", "abstain_rate"]
    valid = ~(ctrl[cols].isna().any(axis=1).to_numpy() | trt[cols].isna().any(axis=1).to_numpy())
    per_cond = {
        name: selective_risk(frame["em"].to_numpy(float)[valid], frame["abstain_rate"].to_numpy(float)[valid],
                             thresholds)
        for name, frame in (("control", ctrl), ("treatment", trt))
    }
    return {
        "n_items": int(valid.sum()),
        "thresholds": list(thresholds),
        "points": {name: res["points"] for name, res in per_cond.items()},
        "aurc": {name: res["aurc"] for name, res in per_cond.items()},
    }


def _compare(ctrl: pd.DataFrame, trt: pd.DataFrame, type_: str, cfg: dict[str, Any], submit: Submit) -> dict[str, Any]:
    """McNemar, per-metric tests and selective risk for aligned control/treatment rows of paired items.

    The per-metric blocks are submitted to `submit` and left as futures (see `_resolved`)."""
    c_em, t_em = _metric_values(ctrl, trt, "em")
    mcnemar = {**mcnemar_exact(c_em >= 0.5, t_em >= 0.5), "q_value": None, "rule": MCNEMAR_RULE,
               "em_binary": bool(np.isin(c_em, (0.0, 1.0)).all() and np.isin(t_em, (0.0, 1.0)).all())}
    if len(c_em) == 0:
        mcnemar["p_exact"] = None  # no pairs: nothing was tested, keep it out of the FDR family
    return {
        "n_items": int(len(ctrl)),
        "item_set": item_set_key(ctrl.index.to_numpy(dtype=object)),
        "mcnemar": mcnemar,
        "metrics": {m: submit(_metric_block, *_paired_values(ctrl, trt, m), cfg, m) for m in METRICS[type_]},
        "selective_risk": _selective(ctrl, trt, cfg["risk_thresholds"]),
    }


def _meta(ctrl: pd.DataFrame, trt: pd.DataFrame, datasets: np.ndarray, metric: str) -> dict[str, Any]:
    groups, effects, variances, flat = [], [], [], []
    for name in sorted(set(datasets.tolist())):
        mask = datasets == name
        c, t = _metric_values(ctrl[mask], trt[mask], metric)
        d = t - c
        if len(d) < MIN_SUBGROUP_ITEMS:
            continue
        groups.append(name)
        effects.append(float(d.mean()))
        variances.append(float(d.var(ddof=1)) / len(d) if np.ptp(d) > 0 else 0.0)
        if variances[-1] <= 0:
            flat.append(name)
    if len(groups) < 2:
        return {"status": "insufficient_groups", "groups": groups, "min_items_per_group": MIN_SUBGROUP_ITEMS}
    if flat:
        return {"status": "zero_variance", "groups": groups, "zero_variance_groups": flat}
    return {"status": "ok", "groups": groups, **meta_analysis(effects, variances)}


def _counts(part: pd.DataFrame, paired: int) -> dict[str, Any]:
    out: dict[str, Any] = {"paired_items": paired}
    for cond in ("control", "treatment"):
        rows = part[part["condition"] == cond]
        entry: dict[str, Any] = {"n_items": int(len(rows)), "unpaired_items": int(len(rows)) - paired}
        for col in ("n_samples", "n_excluded"):
            if col in rows.columns:
                entry[col] = int(pd.to_numeric(rows[col], errors="coerce").fillna(0).sum())
        out[cond] = entry
    return out


def _type_block(part: pd.DataFrame, type_: str, cfg: dict[str, Any], submit: Submit) -> dict[str, Any]:
    ctrl = part[part["condition"] == "control"].set_index("item_key")
    trt = part[part["condition"] == "treatment"].set_index("item_key")
    paired = ctrl.index.intersection(trt.index).sort_values()
    ctrl, trt = ctrl.loc[paired], trt.loc[paired]
    block = _compare(ctrl, trt, type_, cfg, submit)
    block["counts"] = _counts(part, len(paired))
    datasets = np.array([key.split("|", 1)[0] for key in paired], dtype=object)
    block["subgroups"] = {
        "dataset": {
            name: _compare(ctrl[datasets == name], trt[datasets == name], type_, cfg, submit)
            for name in sorted(set(datasets.tolist()))
        }
    }
    block["meta"] = {m: _meta(ctrl, trt, datasets, m) for m in PAIRED_METRICS}
    block["noninferiority"] = {}
    for m in PAIRED_METRICS:
        c, t = _metric_values(ctrl, trt, m)
        margin = float(cfg["tost_margins"][m])
        test = tost_noninferiority(t - c, margin=margin, alpha=float(cfg["tost_alpha"]))
        block["noninferiority"][m] = {"test": NONINFERIORITY_TEST, **test}
    return block


def _prepare(per_item: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in (*_KEYS, "em", "abstain_rate") if c not in per_item.columns]
    if missing:
        raise ValueError(f"per-item scores lack required columns {missing}")
    frame = per_item.copy()
    for col in ("item_key", "type", "condition"):
        frame[col] = frame[col].astype(str)
    frame["temp_key"] = [temp_str(float(t)) for t in frame["temp"]]
    dup = frame.duplicated(["item_key", "type", "condition", "temp_key"])
    if dup.any():
        shown = frame.loc[dup, ["item_key", "type", "condition", "temp_key"]].head(5).values.tolist()
        raise ValueError(f"per-item scores have {int(dup.sum())} duplicate (item, type, condition, temp) rows: {shown}")
    return frame.sort_values(["temp_key", "type", "condition", "item_key"], kind="mergesort").reset_index(drop=True)


class _Copy:
    """A metric block already submitted for the same items and values: resolved to a copy of that block's result
    (each scope keeps its own dict, as the FDR step writes q-values into the family's members only)."""

    def __init__(self, future: Future) -> None:
        self.future = future


class _OncePerItemSet:
    """`submit` for `_metric_block`s that runs each distinct (items, values, metric) once: a dataset subgroup
    holding the same items as its block (e.g. the only dataset of a type) has the same resamples and so the same
    result, which is copied instead of computed again."""

    def __init__(self, submit: Submit) -> None:
        self.submit = submit
        self.seen: dict[tuple[str, str], Future] = {}

    def __call__(self, fn: Callable[..., Any], c: np.ndarray, t: np.ndarray, keys: np.ndarray,
                 cfg: dict[str, Any], metric: str) -> Future | _Copy:
        digest = hashlib.sha256(np.ascontiguousarray(c).tobytes() + np.ascontiguousarray(t).tobytes())
        key = (f"{item_set_key(keys)}:{digest.hexdigest()}", metric)
        if key in self.seen:
            return _Copy(self.seen[key])
        self.seen[key] = self.submit(fn, c, t, keys, cfg, metric)
        return self.seen[key]


def _resolved(obj: Any) -> Any:
    """`obj` with every future replaced by its result (dicts and lists are rebuilt, key order kept)."""
    if isinstance(obj, Future):
        return obj.result()
    if isinstance(obj, _Copy):
        return copy.deepcopy(obj.future.result())
    if isinstance(obj, dict):
        return {key: _resolved(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_resolved(value) for value in obj]
    return obj


def _family(results: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, str]]]:
    """The BH family: one test per hypothesis, as (test id, test dict) in a fixed order, and the excluded tests
    with the reason. Test ids read `T=<temp>/<type>/<scope>/<test>`, scope `all` or `dataset=<name>`.

    Per temperature × task type × scope: the Wilcoxon test of every metric, and McNemar on binarised EM. Excluded:
    - a dataset subgroup with the same item set as its block (the block's only dataset): the same hypotheses;
    - McNemar where every per-item EM is 0 or 1 (one sample per item): it then tests the same null as the EM
      Wilcoxon test (P(ctrl 0 → trt 1) = P(ctrl 1 → trt 0)); the Wilcoxon test is kept, so every metric row of a
      scope has its q;
    - a test without a p-value (no paired items).
    """
    members: list[tuple[str, dict[str, Any]]] = []
    excluded: list[dict[str, str]] = []
    for tkey in sorted(results, key=float):
        for type_, block in results[tkey].items():
            scopes = [("all", block)] + [(f"dataset={name}", sub) for name, sub in block["subgroups"]["dataset"].items()]
            for scope, data in scopes:
                prefix = f"T={tkey}/{type_}/{scope}"
                tests = [(f"{prefix}/mcnemar", data["mcnemar"], data["mcnemar"]["p_exact"])]
                tests += [(f"{prefix}/{m}/wilcoxon", res["wilcoxon"], res["wilcoxon"]["p_value"])
                          for m, res in data["metrics"].items()]
                for test_id, test, p_value in tests:
                    reason = None
                    if p_value is None:
                        reason = "no p-value (no paired items)"
                    elif scope != "all" and data["item_set"] == block["item_set"]:
                        reason = f"same items as T={tkey}/{type_}/all: the same hypothesis as the test there"
                    elif test is data["mcnemar"] and data["mcnemar"]["em_binary"]:
                        reason = f"per-item EM is binary: the same hypothesis as {prefix}/em/wilcoxon, which is kept"
                    if reason is None:
                        members.append((test_id, test))
                    else:
                        excluded.append({"test": test_id, "reason": reason})
    return members, excluded


def _apply_fdr(results: dict[str, Any], enabled: bool) -> dict[str, Any]:
    """Write BH q-values into the family's tests (see `_family`); the others keep q_value None."""
    if not enabled:
        return {"method": None, "n_tests": 0, "scope": "disabled", "family": [], "excluded": []}
    members, excluded = _family(results)
    qvals = benjamini_hochberg([test.get("p_exact", test.get("p_value")) for _, test in members])
    for (_, test), q in zip(members, qvals, strict=True):
        test["q_value"] = q
    return {
        "method": "benjamini_hochberg",
        "n_tests": len(members),
        "scope": FAMILY_SCOPE,
        "family": [test_id for test_id, _ in members],
        "excluded": excluded,
    }


def json_safe(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars unwrapped, NaN/inf → None, tuples → lists, keys → str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def compute_significance(per_item: pd.DataFrame, *, temps: list[float], stats_cfg: dict[str, Any]) -> dict[str, Any]:
    """The significance.json document for one trial (see module docstring); `temps` are the trial's temps.

    A temperature with no rows gets an empty entry; a type with no rows at a temperature is omitted.
    """
    cfg = effective_stats_cfg(stats_cfg)
    frame = _prepare(per_item)
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="stats") as pool:
        submit = _OncePerItemSet(pool.submit)
        for temp in temps:
            tkey = temp_str(float(temp))
            at_temp = frame[frame["temp_key"] == tkey]
            results[tkey] = {
                type_: _type_block(at_temp[at_temp["type"] == type_], type_, cfg, submit)
                for type_ in TYPES
                if (at_temp["type"] == type_).any()
            }
        results = _resolved(results)
    fdr = _apply_fdr(results, bool(cfg["enable_fdr"]))
    return json_safe(
        {
            "schema_version": SCHEMA_VERSION,
            "temps": [float(t) for t in temps],
            "stats_config": cfg,
            "fdr": fdr,
            "results": results,
        }
    )
