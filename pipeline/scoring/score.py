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
Text work is done once per distinct value of each column (keys, status), once per distinct response
(abstention, normalization) and once per distinct (normalized response, item) pair (em, f1, unsupported); rows
are then filled by integer indexing, so a million rows with repeated answers cost little more than their
distinct answers. `scored_row_arrays` / `scored_from_arrays` keep the per-row scores so that a later reader of
the same predictions does not score them again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.gcpause import gc_paused
from pipeline.naming import TYPES
from pipeline.scoring.abstention import DEFAULT_MARKERS, is_abstention
from pipeline.scoring.squad import bag_f1, normalize_answer
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
_CSV_SPECIAL = re.compile(r'[,"\r\n]')
# every predictions column score_predictions reads (`error` is optional, `custom_id` is only passed through)
SCORING_INPUT_COLUMNS: tuple[str, ...] = (*_REQUIRED_PREDICTION_COLUMNS, "error")
_ROW_BLOCK = 1 << 20  # rows (or pairs) whose temporaries are held at once
_CSV_BLOCK = 100_000  # per-item rows formatted at once


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks required columns {missing}")


def _text(series: pd.Series) -> pd.Series:
    return series.fillna("").astype(str)


def _key(dataset: pd.Series, item_id: pd.Series) -> pd.Series:
    return _text(dataset) + "|" + _text(item_id)


def _factorize(values: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """`pd.factorize(values, use_na_sentinel=False)` (missing values are one more distinct value), but faster."""
    codes, uniques = pd.factorize(values)
    distinct = list(uniques)
    missing = codes < 0
    if missing.any():
        codes[missing] = len(distinct)
        distinct.append(None)
    return codes, distinct


def _as_text(value: Any) -> str:
    """`_text` of one value: missing → "", anything else → str(value)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


class _Codes:
    """A column as integer codes into its distinct `_text` values (text work once per distinct value, not per row)."""

    __slots__ = ("codes", "texts")

    def __init__(self, series: pd.Series) -> None:
        codes, uniques = _factorize(series.to_numpy())
        texts = [_as_text(u) for u in uniques]
        merged, distinct = pd.factorize(np.array(texts, dtype=object))  # e.g. 1 and "1" are the same text
        self.codes = merged[codes] if len(merged) else codes
        self.texts = np.asarray(distinct, dtype=object)

    @classmethod
    def of(cls, codes: np.ndarray, texts: Any) -> _Codes:
        """Codes into `texts`, which must be distinct (as `PredictionColumns` keeps them) and, indexed with an array
        of positions, give those texts (an object array, or `pipeline.parsing.PackedTexts`)."""
        column = cls.__new__(cls)
        column.codes = codes
        column.texts = texts
        return column

    def values(self) -> np.ndarray:
        return self.texts[self.codes]


def _answers(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _bag(normalized: str) -> tuple[dict[str, int], int]:
    """Token multiset (token → count) and token count; a plain dict, as Counter() costs more for a few tokens."""
    tokens_ = normalized.split()
    bag: dict[str, int] = {}
    for token in tokens_:
        bag[token] = bag.get(token, 0) + 1
    return bag, len(tokens_)


class _Item:
    """Per-item text prepared once: normalized golds and their token multisets, normalized context."""

    __slots__ = ("gold_norms", "gold_bags", "gold_vocab", "context_norm", "context_padded", "context_tokens")

    def __init__(self, answers: Any, context: Any, overlap: bool) -> None:
        golds = [norm for norm in map(normalize_answer, _answers(answers)) if norm] or [""]  # as gold_answers keeps them
        self.gold_norms = frozenset(golds)
        self.gold_bags = [_bag(g) for g in golds]
        self.gold_vocab = frozenset(token for g in golds for token in g.split())
        self.context_norm = normalize_answer(context) if isinstance(context, str) else ""
        self.context_padded = f" {self.context_norm} "
        self.context_tokens = frozenset(tokens(self.context_norm)) if overlap else None


def _item_index(items: pd.DataFrame) -> dict[tuple[str, str], int]:
    """(dataset|id, type) → row position in `items`; ValueError on duplicate rows."""
    item_keys = _key(items["dataset"], items["id"]) + "\x1f" + _text(items["type"])
    duplicated = item_keys[item_keys.duplicated()]
    if len(duplicated):
        shown = sorted(set(duplicated.str.replace("\x1f", " type=", regex=False)))[:5]
        raise ValueError(f"items hold {len(duplicated)} duplicate (dataset|id, type) rows, e.g. {shown}")
    pairs = zip(_key(items["dataset"], items["id"]).tolist(), _text(items["type"]).tolist(), strict=True)
    return {pair: pos for pos, pair in enumerate(pairs)}


def _item_positions(keys: list[str], types: list[str], n_rows: np.ndarray, items: pd.DataFrame) -> np.ndarray:
    """Row in `items` of each (dataset|id, type); ValueError naming up to five missing items (`n_rows`: rows per item)."""
    index = _item_index(items)
    positions = np.array([index.get(pair, -1) for pair in zip(keys, types, strict=True)], dtype=np.int64)
    if (positions < 0).any():
        missing = np.flatnonzero(positions < 0)
        shown = [f"{keys[m]} type={types[m]}" for m in missing[:5]]
        raise ValueError(
            f"{len(missing)} predicted item(s) are missing from the prepared items "
            f"({int(n_rows[missing].sum())} prediction rows), e.g. {shown}"
        )
    return positions


def _flag(column: _Codes, test: Any) -> np.ndarray:
    """`test(value.strip())` per row, evaluated once per distinct value (these columns repeat a handful of values)."""
    return np.array([bool(test(u.strip())) for u in column.texts], dtype=bool)[column.codes]


def _row_status(finish_reason: _Codes, error: _Codes | None) -> np.ndarray:
    status = np.where(_flag(finish_reason, lambda v: v == "length"), "truncated", "ok").astype(object)
    if error is not None:
        status[_flag(error, bool)] = "provider_error"
    return status


def _numbers(series: pd.Series, dtype: type) -> np.ndarray:
    """`pd.to_numeric(series).astype(dtype)`, converting each distinct value once."""
    codes, uniques = _factorize(series.to_numpy())
    return pd.to_numeric(pd.Series(uniques, dtype=series.dtype)).astype(dtype).to_numpy()[codes]


class _Rows:
    """The key columns and status of scored rows, from the predictions (text work once per distinct value).

    `item` is each row's code of its (dataset|id, type); `keys[code]`, `types[code]` name it.
    """

    def __init__(self, predictions: pd.DataFrame) -> None:
        _require(predictions, _REQUIRED_PREDICTION_COLUMNS, "predictions")
        type_ = _Codes(predictions["type"])
        bad_types = sorted(set(type_.texts.tolist()) - set(TYPES))
        if bad_types:
            raise ValueError(f"predictions have unknown type(s) {bad_types[:5]}; expected {TYPES}")
        dataset, item_id = _Codes(predictions["dataset"]), _Codes(predictions["item_id"])
        n_ids, n_types = len(item_id.texts), len(type_.texts)
        self.item, firsts = pd.factorize((dataset.codes.astype(np.int64) * n_ids + item_id.codes) * n_types + type_.codes)
        self.keys = [f"{d}|{i}" for d, i in zip(dataset.texts[firsts // n_types // n_ids].tolist(),
                                                  item_id.texts[(firsts // n_types) % n_ids].tolist(), strict=True)]
        self.types: list[str] = type_.texts[firsts % n_types].tolist()
        self.status = _row_status(_Codes(predictions["finish_reason"]),
                                  _Codes(predictions["error"]) if "error" in predictions.columns else None)
        self.frame = pd.DataFrame(
            {
                **({"custom_id": _text(predictions["custom_id"]).to_numpy()} if "custom_id" in predictions else {}),
                "item_key": np.array(self.keys, dtype=object)[self.item],
                "dataset": dataset.values(),
                "type": type_.values(),
                "condition": _Codes(predictions["condition"]).values(),
                "temp": _numbers(predictions["temp"], float),
                "sample_index": _numbers(predictions["sample_index"], int),
                "status": self.status,
            }
        )


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
    with gc_paused():
        rows = _Rows(predictions)
        _require(items, _REQUIRED_ITEM_COLUMNS, "items")
        positions = _item_positions(rows.keys, rows.types, np.bincount(rows.item, minlength=len(rows.keys)), items)
        metrics = {m: np.full(len(predictions), np.nan) for m in ROW_METRICS}
        ok = np.flatnonzero(rows.status == "ok")
        if len(ok):
            _score_ok_rows(
                ok, rows.item[ok], positions, _Codes(predictions["response_text"]), items, metrics,
                markers=tuple(markers), strategy=unsupported_strategy, threshold=unsupported_threshold,
                min_token_overlap=min_token_overlap,
            )
    out = rows.frame
    for name in ROW_METRICS:
        out[name] = metrics[name]
    return out


def scored_row_arrays(scored: pd.DataFrame) -> dict[str, np.ndarray]:
    """What `scored_from_arrays` needs to rebuild `scored` without scoring again: status codes and the metrics."""
    _require(scored, ("status", *ROW_METRICS), "scored predictions")
    status = scored["status"].to_numpy()
    codes = np.full(len(status), -1, dtype=np.int8)
    for code, name in enumerate(STATUSES):
        codes[status == name] = code
    if (codes < 0).any():
        raise ValueError(f"scored predictions hold unknown statuses {sorted(set(status[codes < 0].tolist()))[:5]}")
    return {"status": codes, **{m: scored[m].to_numpy(dtype=float) for m in ROW_METRICS}}


def scored_from_arrays(predictions: pd.DataFrame, arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """`score_predictions` output for `predictions`, its metrics taken from `scored_row_arrays` of an earlier scoring.

    ValueError when the arrays do not fit the predictions (other length, or statuses that differ from the ones
    the predictions give), so arrays from another predictions file are not silently used.
    """
    rows = _Rows(predictions)
    status = np.asarray(arrays["status"])
    if len(status) != len(predictions) or any(len(arrays[m]) != len(predictions) for m in ROW_METRICS):
        raise ValueError(f"scored rows hold {len(status)} rows for {len(predictions)} predictions")
    if not np.array_equal(np.asarray(STATUSES, dtype=object)[status], rows.status):
        raise ValueError("scored rows do not match the predictions' statuses; score the predictions again")
    out = rows.frame
    for name in ROW_METRICS:
        out[name] = np.asarray(arrays[name], dtype=float)
    return out


def _score_ok_rows(
    ok: np.ndarray,
    ok_item: np.ndarray,
    positions: np.ndarray,
    response: _Codes,
    items: pd.DataFrame,
    metrics: dict[str, np.ndarray],
    *,
    markers: tuple[str, ...],
    strategy: str,
    threshold: float,
    min_token_overlap: float,
) -> None:
    """Fill `metrics` in place for the ok rows; text work once per unique response / (response, item) pair.

    `ok_item` are the ok rows' item codes (their rows of `items` are in `positions`).
    """
    item_code, used_codes = _in_use(ok_item, len(positions))
    used_items = positions[used_codes]
    item_type = _text(items["type"]).to_numpy()[used_items]
    is_open = item_type == "open"
    if "is_unanswerable" in items.columns:
        flags = items["is_unanswerable"].to_numpy()[used_items]
        unanswerable = np.array([bool(f) and not (isinstance(f, float) and math.isnan(f)) for f in flags], dtype=bool)
    else:
        unanswerable = np.zeros(len(used_items), dtype=bool)
    unanswerable &= is_open
    contexts = items["context"].to_numpy()[used_items] if "context" in items.columns else [None] * len(used_items)
    answers = items["answers"].to_numpy()[used_items]

    resp_code, resp_distinct = _in_use(response.codes[ok], len(response.texts))
    responses = response.texts[resp_distinct].tolist()
    resp_abst = np.array([is_abstention(r, markers) for r in responses], dtype=bool)
    # em, f1 and unsupported depend on the normalized text only: one pair per (normalized response, item)
    norm_of_resp, norms = pd.factorize(np.array([normalize_answer(r) for r in responses], dtype=object))
    norm_of_resp = norm_of_resp.astype(np.int64)
    norm_texts: list[str] = norms.tolist()
    del responses, norms  # only their normalized forms are needed from here

    n_used = len(used_items)
    pair_code, pairs = _factorize_blocks(lambda rows: norm_of_resp[resp_code[rows]] * n_used + item_code[rows], len(ok))
    pair_em = np.zeros(len(pairs))
    pair_f1 = np.zeros(len(pairs))
    pair_unsup = np.zeros(len(pairs))
    baseline = strategy == "baseline"
    # pairs item by item: one item's prepared text is alive at a time (all of them would take kilobytes per item)
    order = np.argsort(pairs % n_used, kind="stable")
    current, item = -1, None
    for start in range(0, len(order), _ROW_BLOCK):  # Python ints for a block of pairs at a time
        block = order[start:start + _ROW_BLOCK]
        keys = pairs[block]
        for p, r, i in zip(block.tolist(), (keys // n_used).tolist(), (keys % n_used).tolist(), strict=True):
            if i != current:
                current, item = i, _Item(answers[i], contexts[i] if is_open[i] else None, strategy == "overlap")
            norm = norm_texts[r]
            if not unanswerable[i]:  # unanswerable em/f1 follow abstention, set below
                if norm in item.gold_norms:
                    pair_em[p] = pair_f1[p] = 1.0  # equal normalized text has equal tokens
                elif not item.gold_vocab.isdisjoint(norm.split()):  # no shared token: F1 is 0
                    bag, n_tokens = _bag(norm)
                    pair_f1[p] = max(bag_f1(bag, n_tokens, gold, n_gold) for gold, n_gold in item.gold_bags)
            if is_open[i]:  # abstained rows get unsupported = 0 below, whatever this says
                if baseline:  # unsupported_normalized's baseline rule, against the context padded once per item
                    pair_unsup[p] = not norm or f" {norm} " not in item.context_padded
                else:
                    pair_unsup[p] = unsupported_normalized(
                        norm, item.context_norm, item.context_tokens, strategy=strategy,
                        min_token_overlap=min_token_overlap)

    del norm_texts, item  # the text is done with: the row fill below needs only codes and scores
    for start in range(0, len(ok), _ROW_BLOCK):  # row-level temporaries for a block of rows at a time
        block = slice(start, start + _ROW_BLOCK)
        _fill_rows(metrics, ok[block], item_code[block], resp_abst[resp_code[block]].astype(float), pair_code[block],
                   is_open, unanswerable, (pair_em, pair_f1, pair_unsup), threshold)


def _fill_rows(metrics: dict[str, np.ndarray], rows: np.ndarray, item_code: np.ndarray, abst: np.ndarray,
               pair_code: np.ndarray, is_open: np.ndarray, unanswerable: np.ndarray,
               pair_scores: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float) -> None:
    """The metrics of ok `rows` from their item, abstention and (response, item) pair scores."""
    pair_em, pair_f1, pair_unsup = pair_scores
    row_open = is_open[item_code]
    row_unans = unanswerable[item_code]
    metrics["abstained"][rows] = abst
    metrics["em"][rows] = np.where(row_unans, abst, pair_em[pair_code])
    metrics["f1"][rows] = np.where(row_unans, abst, pair_f1[pair_code])
    metrics["false_answer"][rows] = np.where(row_open, np.where(row_unans, 1.0 - abst, 0.0), np.nan)
    metrics["unsupported"][rows] = np.where(row_open, np.where(abst >= threshold, 0.0, pair_unsup[pair_code]), np.nan)


def _in_use(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(new code per row, old code of each new code) for the codes 0..n-1 that occur, in increasing order: a
    factorization without a hash table as large as the rows."""
    used = np.flatnonzero(np.bincount(codes, minlength=n))
    remap = np.zeros(max(n, 1), dtype=np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)
    return remap[codes], used


def _factorize_blocks(keys: Any, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """`pd.factorize` of the int64 keys of rows 0..n_rows-1, `keys(slice)` giving a block of them: codes (int32)
    and distinct keys, without the whole key array and a hash table sized for every row at once."""
    codes = np.empty(n_rows, dtype=np.int32)
    block_uniques = []
    for start in range(0, n_rows, _ROW_BLOCK):
        block = slice(start, min(start + _ROW_BLOCK, n_rows))
        local, uniques = pd.factorize(keys(block))
        codes[block] = local
        block_uniques.append(uniques)
    merged, distinct = pd.factorize(np.concatenate(block_uniques) if block_uniques else np.zeros(0, dtype=np.int64))
    offset = 0
    for start, uniques in zip(range(0, n_rows, _ROW_BLOCK), block_uniques, strict=True):
        block = slice(start, min(start + _ROW_BLOCK, n_rows))
        codes[block] = merged[offset + codes[block]]
        offset += len(uniques)
    return codes, np.asarray(distinct, dtype=np.int64)


def _groups(frame: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(group code per row, first row of each group) over `columns`; codes follow first appearance, NaN keys group."""
    group = np.zeros(len(frame), dtype=np.int64)
    for column in columns:
        codes, uniques = _factorize(frame[column].to_numpy())
        group, _ = pd.factorize(group * max(len(uniques), 1) + codes)
    _, first = np.unique(group, return_index=True)
    return group, first


def _aggregate(metrics: pd.DataFrame, group: np.ndarray, ok: np.ndarray, keys: pd.DataFrame) -> pd.DataFrame:
    """Per-group means, stds and counts of the `ROW_METRICS` columns of `metrics` (see `per_item_scores`), unsorted.

    `group` codes the rows 0..G-1 (every code used); `keys` holds the `KEY_COLUMNS` of each group, in code order.
    """
    # pandas' grouped mean/std over integer group codes: the same per-group arithmetic as grouping by the key columns
    grouped = metrics.loc[:, list(ROW_METRICS)].groupby(group, sort=True)
    means = grouped.mean()
    stds = grouped.std(ddof=1)
    counts = grouped.count()
    stds = stds.mask((counts <= 1) & means.notna(), 0.0)
    result = keys.loc[:, list(KEY_COLUMNS)].reset_index(drop=True)
    for metric, stem in ITEM_METRICS.items():
        result[stem] = means[metric].to_numpy()
        result[f"{stem}_std"] = stds[metric].to_numpy()
    result["n_samples"] = np.bincount(group, weights=ok, minlength=len(keys)).astype(np.int64)
    result["n_excluded"] = np.bincount(group, weights=~ok, minlength=len(keys)).astype(np.int64)
    return result


def _sorted_per_item(result: pd.DataFrame) -> pd.DataFrame:
    result = result.sort_values(["temp", "type", "condition", "item_key"], kind="mergesort")
    return result.loc[:, list(PER_ITEM_COLUMNS)].reset_index(drop=True)


def per_item_scores(scored: pd.DataFrame) -> pd.DataFrame:
    """Aggregate scored rows per (item_key, type, condition, temp) over the ok rows.

    Columns: the original's alphabetically sorted ones (mean and sample std with ddof=1, std 0 when only one
    value; NaN where a metric does not apply, e.g. false_answer_rate for closed-book), then `n_samples` (ok rows)
    and `n_excluded` (rows that are not ok). A group whose rows all failed is kept with NaN metrics so the
    failures stay visible. Rows are sorted by (temp, type, condition, item_key).
    """
    _require(scored, (*KEY_COLUMNS, "status", *ROW_METRICS), "scored predictions")
    group, first = _groups(scored, KEY_COLUMNS)
    ok = scored["status"].to_numpy() == "ok"
    return _sorted_per_item(_aggregate(scored, group, ok, scored.loc[:, list(KEY_COLUMNS)].iloc[first]))


def _plain_text(values: list[Any]) -> bool:
    return all(type(v) is str and not _CSV_SPECIAL.search(v) for v in values)


def per_item_csv(table: pd.DataFrame) -> str:
    """Exactly `table.to_csv(index=False, lineterminator="\\n")`: the `per_item_csv_blocks` joined."""
    return "".join(per_item_csv_blocks(table))


def per_item_csv_blocks(table: pd.DataFrame) -> Iterator[str]:
    """`table.to_csv(index=False, lineterminator="\\n")` in pieces: the header, then blocks of `_CSV_BLOCK` rows
    (pandas formats each value on its own, so blocks join to its bytes); a million rows never become 17 million
    strings at once.

    A block is built column-wise when every cell is plain: float64 columns (repr, NaN as empty, as pandas writes
    them), integer columns, and text cells without a comma, quote or line break (which need no quoting).
    Anything else goes through pandas.
    """
    names = [str(name) for name in table.columns]
    yield ",".join(names) + "\n" if _plain_text(names) else table.iloc[:0].to_csv(index=False, lineterminator="\n")
    for start in range(0, len(table), _CSV_BLOCK):
        yield _csv_rows(table.iloc[start:start + _CSV_BLOCK])


def _csv_rows(block: pd.DataFrame) -> str:
    columns: list[list[str]] = []
    for name in block.columns:
        values = block[name]
        kind = values.dtype.kind
        if values.dtype == np.float64:
            columns.append(["" if v != v else repr(v) for v in values.tolist()])
        elif kind in "iu":
            columns.append([str(v) for v in values.tolist()])
        elif kind == "O" and _plain_text(text := values.tolist()):
            columns.append(text)
        else:
            return block.to_csv(index=False, header=False, lineterminator="\n")
    return "".join([",".join(row) + "\n" for row in zip(*columns, strict=True)])


def _mean_or_none(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if len(finite) else None


def score_summary(scored: pd.DataFrame) -> dict[str, Any]:
    """Row counts per status and per (temp, type, condition), with row-level means over ok rows (JSON-safe).

    Groups are sorted by (temp, type, condition); rows with a missing key are left out of the groups.
    """
    _require(scored, (*KEY_COLUMNS, "status", *ROW_METRICS), "scored predictions")
    status_code, status_names = _factorize(scored["status"].to_numpy())
    keys = ["temp", "type", "condition"]
    group, first = _groups(scored, keys)
    key_rows = scored.loc[:, keys].iloc[first]
    complete = key_rows.notna().all(axis=1).to_numpy()
    group_keys = [tuple(key_rows.iloc[g]) if complete[g] else None for g in range(len(first))]
    return _summary(status_code, status_names, group, group_keys, _factorize(scored["item_key"].to_numpy())[0],
                    {m: scored[m].to_numpy(dtype=float) for m in ROW_METRICS})


def _summary(status_code: np.ndarray, status_names: list[Any], group: np.ndarray, group_keys: list[tuple | None],
             item_code: np.ndarray, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """`score_summary` from per-row codes: `group` indexes `group_keys` ((temp, type, condition), None when one is
    missing), `status_code` indexes `status_names`, `item_code` tells the items apart."""

    def counts(codes: np.ndarray) -> dict[str, int]:
        found = np.bincount(codes, minlength=len(status_names))
        return {s: int(found[status_names.index(s)]) if s in status_names else 0 for s in STATUSES}

    ok = status_code == status_names.index("ok") if "ok" in status_names else np.zeros(len(status_code), dtype=bool)
    order = sorted((g for g, key in enumerate(group_keys) if key is not None), key=lambda g: group_keys[g])
    groups = []
    for g in order:
        rows = group == g
        temp, type_, condition = group_keys[g]  # type: ignore[misc]
        ok_rows = rows & ok
        groups.append(
            {
                "temp": float(temp),
                "type": str(type_),
                "condition": str(condition),
                "n_rows": int(rows.sum()),
                "n_items": len(np.unique(item_code[rows])),
                "status_counts": counts(status_code[rows]),
                "means": {ITEM_METRICS[m]: _mean_or_none(values[m][ok_rows]) for m in ROW_METRICS},
            }
        )
    return {"n_rows": int(len(status_code)), "status_counts": counts(status_code), "groups": groups}


class ScoredColumns:
    """Scores of predictions given as `pipeline.parsing.LoadedColumns` (the columnar hand-off): the same per-row
    metrics, per-item table, summary and row arrays as `score_predictions` and the functions over its frame give
    for the same predictions.csv, without a per-row Python object.

    Memory is about 60 bytes per row (codes and the five float64 metrics) plus the distinct texts; the per-item
    table is built a million rows at a time, each group's rows in one block and in file order, with pandas'
    per-group arithmetic, so its numbers are the ones `per_item_scores` gives.
    """

    def __init__(self, columns: Any, items: pd.DataFrame, *, markers: Sequence[str] = DEFAULT_MARKERS,
                 unsupported_strategy: str = "baseline", unsupported_threshold: float = 0.5,
                 min_token_overlap: float = 0.6) -> None:
        if unsupported_strategy not in STRATEGIES:
            raise ValueError(f"unknown unsupported strategy {unsupported_strategy!r}; expected one of {STRATEGIES}")
        cells = columns.cells
        bad_types = sorted(set(cells["type"]) - set(TYPES))
        if bad_types:
            raise ValueError(f"predictions have unknown type(s) {bad_types[:5]}; expected {TYPES}")
        self.n_rows = len(columns.cell)
        self.status = np.asarray(columns.status, dtype=np.int8)
        cell = np.asarray(columns.cell)
        # integer codes per cell field; temps are grouped by value (cells "0.7" and "0.70" are one group)
        dataset, item_id, type_, condition = (_codes(cells[name]) for name in ("dataset", "item_id", "type", "condition"))
        temp_text, temp_texts = pd.factorize(np.asarray(cells["temp"], dtype=object))
        temp_of_text, temp_values = pd.factorize(np.array([float(t) for t in temp_texts], dtype=float))
        temp = (temp_of_text[temp_text], len(temp_values))
        cell_item, first_of_item = _combine(dataset, item_id, type_)
        item_keys = [f"{cells['dataset'][c]}|{cells['item_id'][c]}" for c in first_of_item.tolist()]
        cell_group, first_cell = _combine((cell_item, len(first_of_item)), condition, temp)
        self.group = cell_group.astype(np.int32)[cell]  # per row: its (item_key, type, condition, temp)
        first = first_cell.tolist()
        self.group_keys = pd.DataFrame({
            "item_key": [item_keys[i] for i in cell_item[first_cell].tolist()], "type": [cells["type"][c] for c in first],
            "condition": [cells["condition"][c] for c in first], "temp": temp_values[temp[0][first_cell]]})
        summary_cell, summary_first = _combine(temp, type_, condition)
        self._summary_group = summary_cell.astype(np.int32)[cell]
        self._summary_keys = [(float(temp_values[temp[0][c]]), cells["type"][c], cells["condition"][c])
                              for c in summary_first.tolist()]
        keys = item_keys
        types = [cells["type"][c] for c in first_of_item.tolist()]
        self._item_of_row = cell_item.astype(np.int32)[cell]
        with gc_paused():
            positions = _item_positions(keys, types, np.bincount(self._item_of_row, minlength=len(keys)), items)
            # untouched pages until the ok rows are filled, after the text work's peak; the other rows get NaN then
            self.metrics = {m: np.empty(self.n_rows) for m in ROW_METRICS}
            ok = np.flatnonzero(self.status == 0).astype(np.int32 if self.n_rows < 2**31 else np.int64)
            if len(ok):
                _score_ok_rows(
                    ok, self._item_of_row[ok], positions,
                    _Codes.of(np.asarray(columns.response), columns.responses), items, self.metrics,
                    markers=tuple(markers), strategy=unsupported_strategy, threshold=unsupported_threshold,
                    min_token_overlap=min_token_overlap,
                )
            del ok
            failed = self.status != 0
            for values in self.metrics.values():
                values[failed] = np.nan

    def row_arrays(self) -> dict[str, np.ndarray]:
        """`scored_row_arrays` of the scored predictions."""
        return {"status": self.status, **self.metrics}

    def per_item_scores(self) -> pd.DataFrame:
        """`per_item_scores` of the scored predictions."""
        keys = self.group_keys
        n_parts = max(1, -(-self.n_rows // _ROW_BLOCK))
        row_part = (self.group.astype(np.int64) * n_parts // max(len(keys), 1)).astype(np.int32)
        tables = []
        for part in range(n_parts):  # about a million rows at a time; a group's rows are all in one part
            rows = np.flatnonzero(row_part == part)
            if not len(rows):
                continue
            local, groups = pd.factorize(self.group[rows])
            metrics = pd.DataFrame({m: self.metrics[m][rows] for m in ROW_METRICS})
            tables.append(_aggregate(metrics, local, self.status[rows] == 0, keys.iloc[groups]))
        if not tables:
            return pd.DataFrame(columns=list(PER_ITEM_COLUMNS))
        return _sorted_per_item(pd.concat(tables, ignore_index=True))

    def summary(self) -> dict[str, Any]:
        """`score_summary` of the scored predictions."""
        return _summary(self.status, list(STATUSES), self._summary_group, self._summary_keys, self._item_of_row,
                        self.metrics)


def _codes(values: list[str]) -> tuple[np.ndarray, int]:
    """Codes of `values` (first-appearance order) and how many distinct values there are."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))
    return codes, len(uniques)


def _combine(*columns: tuple[np.ndarray, int]) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the distinct combinations of code columns (each with its number of codes), in first-appearance
    order, and the position where each combination first appears."""
    key = np.zeros(len(columns[0][0]), dtype=np.int64)
    for codes, n in columns:
        key = key * n + codes
    combined, _ = pd.factorize(key)
    return combined, np.unique(combined, return_index=True)[1]
