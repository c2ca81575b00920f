"""A straightforward reimplementation of the ORIGINAL system's parse, scoring and statistics, for benchmarking only.

Written from /work/shared/reference/original_system.md §4-§5 (and the algorithms of the original's
`fireworks/parse_results.py`, `scoring/*.py`, `scoring/stats.py`), keeping their cost model on purpose:
- parse: one pure-Python loop per result line into `csv.DictWriter`, plus the original's validation passes
  (the custom_ids of the JSONL collected before and after writing, the CSV rows counted again);
- scoring: `csv.DictReader` rows, per-row normalize / EM / greedy F1 / abstention-substring / unsupported-substring,
  per-item aggregation in Python dicts, per_item_scores.csv with alphabetically sorted columns;
- statistics: one shared `default_rng(seed)`, a bootstrap loop of B `rng.choice` draws, a sign-flip loop of R
  `rng.choice` draws, Hodges–Lehmann as the O(n²) pure-Python Walsh loop for n ≤ 2000 (median of the deltas
  above, as shipped), scipy's wilcoxon, the original's (ascending running-minimum) BH step-up, meta, TOST.
Nothing here is used by the pipeline; its outputs are not checked against ours (different, fixed rules).
"""

from __future__ import annotations

import csv
import json
import math
import string
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy import stats

# ---------------------------------------------------------------- parse (fireworks/parse_results.py, spec §4)

FIELDNAMES = ["custom_id", "dataset", "item_id", "condition", "temp", "sample_index", "type", "request_id",
              "finish_reason", "response_text", "prompt_tokens", "completion_tokens", "total_tokens"]


def iter_jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                yield json.loads(line)


def parse_custom_id(cid: str) -> tuple[str, str, str, float, int, str]:
    parts = cid.split("|")
    if len(parts) != 6:
        raise ValueError(f"Bad custom_id: {cid}")
    dataset, item_id, condition, temp, sample, typ = parts
    return dataset, item_id, condition, float(temp), int(sample), typ


def _text_from_body(body: dict) -> str:
    choices = body.get("choices") or []
    if choices and isinstance(choices[0], dict):
        return ((choices[0].get("message", {}) or {}).get("content") or "").strip()
    if isinstance(body.get("message"), dict):
        return (body["message"].get("content") or "").strip()
    if isinstance(body.get("content"), str):
        return body["content"].strip()
    return ""


def _unique_custom_ids(path: str) -> set[str]:
    seen: set[str] = set()
    for obj in iter_jsonl(path):
        cid = obj.get("custom_id") or obj.get("customId")
        if cid:
            seen.add(str(cid))
    return seen


def _count_rows(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        return max(0, sum(1 for _ in csv.reader(fh)) - 1)


def parse_results(results_jsonl: str, out_csv: str) -> int:
    """predictions.csv from one results file; SystemExit when the row count does not match the custom_ids."""
    _unique_custom_ids(results_jsonl)  # the original computes the expected ids before writing (skip check)
    with open(out_csv, "w", encoding="utf-8", newline="") as fcsv:
        writer = csv.DictWriter(fcsv, fieldnames=FIELDNAMES, quoting=csv.QUOTE_MINIMAL, escapechar="\\")
        writer.writeheader()
        for row in iter_jsonl(results_jsonl):
            cid = row.get("custom_id") or row.get("customId")
            resp = row.get("response") or {}
            body = resp.get("body") or resp or {}
            usage = resp.get("usage") or body.get("usage") or {}
            finish = None
            choices = body.get("choices") or []
            if choices and isinstance(choices[0], dict):
                finish = choices[0].get("finish_reason")
            dataset, item_id, condition, temp, idx, typ = parse_custom_id(cid)
            writer.writerow({
                "custom_id": cid, "dataset": dataset, "item_id": item_id, "condition": condition, "temp": temp,
                "sample_index": idx, "type": typ,
                "request_id": resp.get("request_id") or resp.get("id") or body.get("id"),
                "finish_reason": finish, "response_text": _text_from_body(body),
                "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                "total_tokens": usage.get("total_tokens"),
            })
    actual = _count_rows(out_csv)
    expected = len(_unique_custom_ids(results_jsonl))
    if expected != actual:
        raise SystemExit(f"Parsed row count mismatch: expected {expected} rows but wrote {actual}")
    return actual


# ---------------------------------------------------------------- scoring (scoring/*.py, spec §5)

_ARTICLES = {"a", "an", "the"}
_PUNC_TABLE = str.maketrans("", "", string.punctuation)
ABSTAIN_MARKERS = ["i don't know", "i do not know", "unknown", "not sure", "cannot answer", "can't answer",
                   "insufficient information", "not enough information", "not provided in the passage"]


def normalize_answer(s: str) -> str:
    s = s.lower().strip().translate(_PUNC_TABLE)
    s = " ".join(s.split())
    return " ".join(t for t in s.split() if t not in _ARTICLES)


def f1_score(prediction: str, ground_truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens and not truth_tokens:
        return 1.0
    if not pred_tokens or not truth_tokens:
        return 0.0
    common = 0
    used = [False] * len(truth_tokens)
    for token in pred_tokens:  # the original's greedy multiset match, O(|pred|·|truth|)
        for i, gold in enumerate(truth_tokens):
            if not used[i] and token == gold:
                used[i] = True
                common += 1
                break
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def best_em(pred: str, truths: list[str]) -> float:
    return 1.0 if any(normalize_answer(pred) == normalize_answer(g) for g in (truths or [""])) else 0.0


def is_abstention(text: str) -> bool:
    normalized = normalize_answer(text)
    return any(marker in normalized for marker in ABSTAIN_MARKERS)


def score_open(pred: str, truths: list[str], unanswerable: bool) -> dict[str, float]:
    if unanswerable:
        if is_abstention(pred):
            return {"em": 1.0, "f1": 1.0, "abstained": 1.0, "false_answer": 0.0}
        return {"em": 0.0, "f1": 0.0, "abstained": 0.0, "false_answer": 1.0}
    return {"em": best_em(pred, truths), "f1": max(f1_score(pred, g) for g in truths or [""]),
            "abstained": 1.0 if is_abstention(pred) else 0.0, "false_answer": 0.0}


def score_closed(pred: str, truths: list[str]) -> dict[str, float]:
    return {"em": best_em(pred, truths), "abstained": 1.0 if is_abstention(pred) else 0.0}


def is_unsupported(pred: str, context: str, abstained: float, threshold: float = 0.5) -> int:
    """Baseline strategy: unsupported unless the normalized prediction is a substring of the normalized context."""
    if abstained >= threshold:
        return 0
    p = normalize_answer(pred)
    return 0 if (p and p in normalize_answer(context)) else 1


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _stdev(values: list[float]) -> float:
    n = len(values)
    if n <= 1:
        return 0.0
    mean = sum(values) / n
    return (sum((x - mean) ** 2 for x in values) / (n - 1)) ** 0.5


def score_predictions(pred_csv: str, open_jsonl: str, closed_jsonl: str, out_csv: str) -> int:
    """per_item_scores.csv from predictions.csv and the prepared items; returns the number of per-item rows."""
    canon: dict[str, dict[str, dict]] = {"open": {}, "closed": {}}
    for kind, path in (("open", open_jsonl), ("closed", closed_jsonl)):
        for row in iter_jsonl(path):
            canon[kind][f"{row['dataset']}|{row['id']}"] = row
    with open(pred_csv, encoding="utf-8") as fh:
        pred_rows = [dict(r) for r in csv.DictReader(fh)]
    bucket: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in pred_rows:
        key_item = f"{r['dataset']}|{r['item_id']}"
        pred = r["response_text"] or ""
        key = (key_item, r["type"], r["condition"], float(r["temp"]))
        if r["type"] == "open":
            ex = canon["open"][key_item]
            score = score_open(pred, ex["answers"], ex["is_unanswerable"])
            score["unsupported"] = float(is_unsupported(pred, ex["context"], score["abstained"]))
        else:
            score = score_closed(pred, canon["closed"][key_item]["answers"])
        for name, value in score.items():
            bucket[key][name].append(value)
    rows = []
    for (item_key, typ, condition, temp), metrics in bucket.items():
        row: dict[str, Any] = {"item_key": item_key, "type": typ, "condition": condition, "temp": temp}
        names = {"em": "em", "abstained": "abstain_rate"}
        if typ == "open":
            names.update({"f1": "f1", "false_answer": "false_answer_rate", "unsupported": "unsupported_rate"})
        for metric, column in names.items():
            row[column] = _mean(metrics[metric])
            row[f"{column}_std"] = _stdev(metrics[metric])
        rows.append(row)
    with open(out_csv, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return len(rows)


# ---------------------------------------------------------------- statistics (scoring/stats.py, spec §4)

HL_CUTOFF = 2000


def bootstrap_ci(deltas: np.ndarray, n_resamples: int, rng: np.random.Generator, alpha: float = 0.05) -> list[float]:
    n = len(deltas)
    if n == 0:
        return [0.0, 0.0]
    if n == 1:
        return [float(deltas[0]), float(deltas[0])]
    idx = np.arange(n)
    boots = np.empty(n_resamples, dtype=float)
    for i in range(n_resamples):
        boots[i] = float(np.mean(deltas[rng.choice(idx, size=n, replace=True)]))
    return [float(np.percentile(boots, 100 * alpha / 2)), float(np.percentile(boots, 100 * (1 - alpha / 2)))]


def perm_p_value(deltas: np.ndarray, n_resamples: int, rng: np.random.Generator) -> float:
    if deltas.size == 0:
        return 1.0
    observed = abs(float(np.mean(deltas)))
    if observed == 0.0 or n_resamples <= 0:
        return 1.0
    hits = 0
    signs_pool = np.array([-1.0, 1.0])
    for _ in range(n_resamples):
        signs = rng.choice(signs_pool, size=deltas.size, replace=True)
        if abs(float(np.mean(signs * deltas))) >= observed - 1e-15:
            hits += 1
    return hits / n_resamples


def wilcoxon_p(deltas: np.ndarray) -> tuple[float, float]:
    nonzero = deltas[np.abs(deltas) > 1e-12]
    if nonzero.size == 0:
        return 0.0, 1.0
    if nonzero.size == 1:
        return 1.0, 1.0
    res = stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def walsh_median(deltas: np.ndarray) -> float:
    """The O(n²) pure-Python Walsh loop of the original (median of (x_i + x_j)/2, i ≤ j), for any n."""
    n = deltas.size
    if n == 0:
        return 0.0
    vals = []
    for i in range(n):
        for j in range(i, n):
            vals.append(0.5 * (float(deltas[i]) + float(deltas[j])))
    return float(np.median(np.array(vals)))


def hodges_lehmann(deltas: np.ndarray, sizes: list[int] | None = None) -> float:
    """As shipped: the Walsh loop up to HL_CUTOFF items, the median of the deltas above; `sizes` records each n."""
    if sizes is not None:
        sizes.append(int(deltas.size))
    if deltas.size > HL_CUTOFF:
        return float(np.median(deltas))
    return walsh_median(deltas)


def _cohens_d(deltas: np.ndarray) -> float:
    if deltas.size < 2:
        return 0.0
    sd = float(np.std(deltas, ddof=1))
    return float(np.mean(deltas)) / sd if sd else 0.0


def _cliffs_delta(deltas: np.ndarray) -> float:
    pos, neg = int(np.sum(deltas > 0)), int(np.sum(deltas < 0))
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def _mcnemar(b: int, c: int) -> dict[str, Any]:
    n = b + c
    p_exact = float(stats.binomtest(min(b, c), n, 0.5).pvalue) if n else 1.0
    lo = hi = None
    if n:
        lo_p = float(stats.beta.ppf(0.025, b, c + 1)) if b > 0 else 0.0
        hi_p = float(stats.beta.ppf(0.975, b + 1, c)) if c > 0 else 1.0
        lo = lo_p / (1 - lo_p) if lo_p < 1 else math.inf
        hi = hi_p / (1 - hi_p) if hi_p < 1 else math.inf
    return {"b": b, "c": c, "p_exact": p_exact, "odds_ratio": (b + 0.5) / (c + 0.5), "or_ci_95": [lo, hi]}


def _risk_points(em: list[float], abst: list[float], thresholds: list[float]) -> list[dict[str, Any]]:
    points = []
    for thr in thresholds:
        keep = [a <= thr for a in abst]
        if not any(keep):
            points.append({"threshold": thr, "coverage": 0.0, "selective_accuracy": None, "risk": None})
            continue
        sum_em = sum(e for e, k in zip(em, keep, strict=True) if k)
        answered = sum(1.0 - a for a, k in zip(abst, keep, strict=True) if k)
        accuracy = sum_em / answered if answered > 0 else None
        points.append({"threshold": thr, "coverage": answered / sum(keep), "selective_accuracy": accuracy,
                       "risk": None if accuracy is None else 1.0 - accuracy})
    return points


def _aurc(points: list[dict[str, Any]]) -> float | None:
    pairs = sorted((p["coverage"], p["risk"]) for p in points if p["risk"] is not None)
    if len(pairs) < 2:
        return None
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pairs[:-1], pairs[1:], strict=True))


def _block(items: list[tuple[str, dict, dict]], typ: str, cfg: dict[str, Any], rng: np.random.Generator,
           hl: Callable[[np.ndarray], float]) -> dict[str, Any]:
    metrics = ["em", "abstain_rate"] if typ == "closed" else ["em", "f1", "abstain_rate", "false_answer_rate",
                                                              "unsupported_rate"]
    deltas: dict[str, list[float]] = {m: [] for m in metrics}
    b = c = 0
    em_c, ab_c, em_t, ab_t = [], [], [], []
    for _key, rc, rt in items:
        for m in metrics:
            if rc.get(m) not in (None, "") and rt.get(m) not in (None, ""):
                deltas[m].append(float(rt[m]) - float(rc[m]))
        em_c.append(float(rc.get("em", 0.0)))
        ab_c.append(float(rc.get("abstain_rate", 0.0)))
        em_t.append(float(rt.get("em", 0.0)))
        ab_t.append(float(rt.get("abstain_rate", 0.0)))
        ctrl_bin, trt_bin = float(rc.get("em", 0.0)) >= 0.5, float(rt.get("em", 0.0)) >= 0.5
        b += int(not ctrl_bin and trt_bin)
        c += int(ctrl_bin and not trt_bin)
    out: dict[str, Any] = {}
    for m, values in deltas.items():
        arr = np.array(values, dtype=float)
        w, p = wilcoxon_p(arr)
        out[m] = {
            "n_items": int(arr.size), "delta_mean": float(np.mean(arr)) if arr.size else 0.0,
            "ci_95": bootstrap_ci(arr, int(cfg["bootstrap_samples"]), rng),
            "wilcoxon": {"W": w, "p_value": p}, "hodges_lehmann": hl(arr), "cohens_d": _cohens_d(arr),
            "cliffs_delta": _cliffs_delta(arr),
            "perm_p_value": perm_p_value(arr, int(cfg["permutation_samples"]), rng) if cfg["enable_permutation"]
            else None,
        }
    thresholds = list(cfg["risk_thresholds"])
    ctrl_pts, trt_pts = _risk_points(em_c, ab_c, thresholds), _risk_points(em_t, ab_t, thresholds)
    return {"n_items": len(items), "mcnemar": _mcnemar(b, c), "metrics": out,
            "selective_risk": {"thresholds": thresholds, "points": {"control": ctrl_pts, "treatment": trt_pts},
                               "aurc": {"control": _aurc(ctrl_pts), "treatment": _aurc(trt_pts)}}}


def _meta(subgroups: dict[str, dict[str, Any]], metric: str) -> dict[str, Any] | None:
    groups = []
    for block in subgroups.values():
        m = block["metrics"].get(metric, {})
        n = int(m.get("n_items") or 0)
        if n <= 1:
            continue
        half = abs(m["ci_95"][1] - m["ci_95"][0]) / 2
        se = half / 1.96 if half > 0 else None
        groups.append((float(m["delta_mean"]), se * se if se else max(1e-8, 0.25 / n)))
    if not groups:
        return None
    w = [1 / v for _, v in groups]
    sw = sum(w)
    mu_fe = sum(wi * mi for (mi, _), wi in zip(groups, w, strict=True)) / sw
    q = sum(wi * (mi - mu_fe) ** 2 for (mi, _), wi in zip(groups, w, strict=True))
    df = max(1, len(groups) - 1)
    denom = sw - sum(wi * wi for wi in w) / sw
    tau2 = max(0.0, (q - df) / denom) if denom > 0 else 0.0
    wr = [1 / (v + tau2) for _, v in groups]
    mu_re = sum(wi * mi for (mi, _), wi in zip(groups, wr, strict=True)) / sum(wr)
    se_fe, se_re = (1 / sw) ** 0.5, (1 / sum(wr)) ** 0.5
    return {"fixed": {"delta_mean": mu_fe, "ci_95": [mu_fe - 1.96 * se_fe, mu_fe + 1.96 * se_fe]},
            "random": {"delta_mean": mu_re, "ci_95": [mu_re - 1.96 * se_re, mu_re + 1.96 * se_re], "tau2": tau2},
            "heterogeneity": {"Q": q, "df": df, "p_value": float(1 - stats.chi2.cdf(q, df)),
                              "I2": max(0.0, (q - df) / q) if q > 0 else 0.0}}


def _tost(deltas: list[float], margin: float, alpha: float) -> dict[str, Any]:
    arr = np.array(deltas, dtype=float)
    n = arr.size
    if n == 0:
        return {"margin": margin, "alpha": alpha, "p_value": None, "non_inferior": None}
    mean = float(np.mean(arr))
    sd = float(np.std(arr, ddof=1)) if n > 1 else 0.0
    if sd == 0.0:
        p = 0.0 if mean > -margin else 1.0
    else:
        p = 1.0 - float(stats.t.cdf((mean + margin) / (sd / math.sqrt(n)), df=n - 1))
    half = float(stats.t.ppf(0.975, df=max(n - 1, 1))) * (sd / math.sqrt(n))
    return {"margin": margin, "alpha": alpha, "p_value": p, "non_inferior": p < alpha, "mean_delta": mean,
            "ci_95": [mean - half, mean + half]}


def _bh_original(tests: list[dict[str, Any]]) -> None:
    """The original's step-up: running minimum in ascending p order (anti-conservative, weak spot 4)."""
    vals = sorted(((i, float(t["p"])) for i, t in enumerate(tests) if not math.isnan(float(t["p"]))),
                  key=lambda x: x[1])
    m = len(vals)
    best = 1.0
    for rank, (i, p) in enumerate(vals, start=1):
        best = min(best, p * m / rank)
        tests[i]["ref"]["q_value"] = min(1.0, best)


def compute_stats(per_item_csv: str, cfg: dict[str, Any], hl_sizes: list[int] | None = None) -> dict[str, Any]:
    """significance.json (schema_version 2) as the original computed it; `hl_sizes` records every HL call's n."""
    rows = []
    with open(per_item_csv, encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            row["temp"] = float(row["temp"])
            for k in ("em", "f1", "abstain_rate", "false_answer_rate", "unsupported_rate"):
                if row.get(k) not in (None, "", "nan"):
                    row[k] = float(row[k])
            rows.append(row)
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_key[(r["item_key"], r["type"], r["temp"])].append(r)
    paired: dict[tuple[float, str], list[tuple[str, dict, dict]]] = defaultdict(list)
    for (item_key, typ, temp), group in by_key.items():
        rc = next((x for x in group if x["condition"] == "control"), None)
        rt = next((x for x in group if x["condition"] == "treatment"), None)
        if rc is not None and rt is not None:
            paired[(temp, typ)].append((item_key, rc, rt))
    rng = np.random.default_rng(int(cfg["random_seed"]))  # one stream shared by every test, in call order

    def hl(arr: np.ndarray) -> float:
        return hodges_lehmann(arr, hl_sizes)

    out: dict[str, Any] = {}
    tests: list[dict[str, Any]] = []
    for (temp, typ), items in sorted(paired.items()):
        tkey = f"{temp:.1f}"
        block = out.setdefault(tkey, {})[typ] = _block(items, typ, cfg, rng, hl)
        by_ds: dict[str, list[tuple[str, dict, dict]]] = defaultdict(list)
        for item in items:
            by_ds[item[0].split("|", 1)[0]].append(item)
        block["subgroups"] = {"dataset": {ds: _block(sub, typ, cfg, rng, hl) for ds, sub in sorted(by_ds.items())}}
        for scope in (block, *block["subgroups"]["dataset"].values()):
            tests.append({"ref": scope["mcnemar"], "p": scope["mcnemar"]["p_exact"]})
            tests.extend({"ref": info["wilcoxon"], "p": info["wilcoxon"]["p_value"]} for info in scope["metrics"].values())
        block["meta"] = {m: _meta(block["subgroups"]["dataset"], m) for m in (("em", "f1") if typ == "open" else ("em",))}
    if cfg["enable_fdr"]:
        _bh_original(tests)
    for (temp, typ), items in sorted(paired.items()):
        tost = out[f"{temp:.1f}"][typ]["tost"] = {}
        for m in ("em", "f1") if typ == "open" else ("em",):
            deltas = [float(rt[m]) - float(rc[m]) for _k, rc, rt in items]
            tost[m] = _tost(deltas, float(cfg["tost_margins"][m]), float(cfg["tost_alpha"]))
    return {"schema_version": 2, "stats_config": cfg, "results": out}
