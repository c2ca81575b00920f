"""Performance acceptance of parse → score → stats: our pipeline functions against the original's algorithms.

Usage (from the repository root, with the project's virtualenv):
    python bench/bench_score_stats.py            # full size: 1,000,000 result lines, 100,000 paired items
    python bench/bench_score_stats.py --quick    # smoke size: 40,000 lines, 5,000 items, 1,000 resamples
    python bench/bench_score_stats.py --workdir DIR   # keep the data in DIR; reused when size and seed match

What one run does (everything seeded, so every run sees the same data):
1. Writes (or reuses, see --workdir) synthetic prepared items (open-book squad_v2 with contexts, a third
   unanswerable; closed-book triviaqa and nq_open) and provider result lines in the Fireworks success-line shape
   (plus ~0.1 % error lines and ~0.5 % `finish_reason: "length"` rows) for 2 temps × 2 conditions × K samples,
   shuffled.
2. Runs pipeline A (ours: the functions ParsePredictions, ScorePredictions and ComputeStats call, in their
   order, with the files between the phases) and pipeline B (`original_impl.py`) on those files, each
   in its own subprocess, so that each peak RSS (VmHWM) is its own.
3. Statistics alone: one metric (EM replicate-mean deltas, K=10) on N paired items: ours
   (`pipeline.stats.paired`) against the original's per-resample loops, each in its own subprocess.
4. Prints the side-by-side table, the breakdown of our phases and PASS/FAIL against the targets
   (ours ≥ 20× faster overall and for statistics alone, our peak RSS < 4 GiB).
Hodges–Lehmann: the original ran its O(n²) pure-Python Walsh loop only for n ≤ 2000 and took the median of the
deltas above. Both are reported: "as shipped" (what the original spent) and "same-n" (the O(n²) loop on the same
n as ours, so the algorithms are compared). The same-n time above n = 2000 is EXTRAPOLATED from the loop's
measured per-pair cost (fastest of n = 1000/2000/4000, which favours the original: the real loop also slows
down as its list of n²/2 floats outgrows the caches). The script prints every extrapolation it makes.
File writes are plain writes (no fsync) on both sides; ParsePredictions' copy of the part files into
results_combined.jsonl (`combine_results`) is timed as a separate row and left out of the totals (the original had
its own combine step).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

TEMPS = (0.0, 0.7)
CONDITIONS = ("control", "treatment")
TARGET_RATIO = 20.0
TARGET_PEAK_BYTES = 4 * 1024**3
HL_CUTOFF = 2000  # the original's Walsh-loop limit
MODEL = "accounts/fireworks/models/llama-v3p1-8b-instruct"
ABSTAIN_TEXTS = ("unknown", "Unknown.", "I don't know.", "I do not know.", "Not enough information.",
                 "I cannot answer that from the passage.", "The passage does not say.", "not sure")
FILLER = ("of", "in", "the", "a", "was", "by", "and", "to", "for", "on", "as", "with", "at", "from", "is")


# ---------------------------------------------------------------- synthetic data

class _Words:
    """A seeded pseudo-vocabulary: 6,000 invented words plus common English filler."""

    def __init__(self, rnd: random.Random) -> None:
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
        vocab = {"".join(rnd.choice(syllables) for _ in range(rnd.randint(1, 4))) for _ in range(7000)}
        self.vocab = sorted(vocab)[:6000]
        self.rnd = rnd

    def word(self) -> str:
        return self.rnd.choice(FILLER) if self.rnd.random() < 0.3 else self.rnd.choice(self.vocab)

    def phrase(self, lo: int, hi: int, title: bool = False) -> str:
        words = [self.rnd.choice(self.vocab) for _ in range(self.rnd.randint(lo, hi))]
        return " ".join(w.capitalize() for w in words) if title else " ".join(words)

    def sentence(self, lo: int, hi: int) -> str:
        words = [self.word() for _ in range(self.rnd.randint(lo, hi))]
        words[0] = words[0].capitalize()
        if len(words) > 4 and self.rnd.random() < 0.3:
            words[2] += ","
        return " ".join(words) + "."


def _item_counts(lines: int, k: int) -> tuple[int, int, int]:
    items = lines // (len(TEMPS) * len(CONDITIONS) * k)
    n_open = items // 2
    n_trivia = (items - n_open) * 7 // 10
    return n_open, n_trivia, items - n_open - n_trivia


def _make_items(rnd: random.Random, words: _Words, lines: int, k: int) -> tuple[list[dict], list[dict]]:
    n_open, n_trivia, n_nq = _item_counts(lines, k)
    open_rows = []
    for i in range(n_open):
        sentences = [words.sentence(8, 16) for _ in range(rnd.randint(6, 12))]
        context = " ".join(sentences)
        unanswerable = rnd.random() < 1 / 3
        answers: list[str] = []
        if not unanswerable:
            tokens = rnd.choice(sentences).rstrip(".").replace(",", "").split()
            start = rnd.randrange(len(tokens))
            span = " ".join(tokens[start:start + rnd.randint(1, 4)])
            answers = [span] * rnd.randint(1, 3) + ([f"the {span}"] if rnd.random() < 0.3 else [])
        ident = hashlib.md5(f"sq{i}".encode()).hexdigest()[:24]
        open_rows.append({"dataset": "squad_v2", "id": ident, "context": context,
                          "question": f"What {words.phrase(3, 8)}?", "answers": answers,
                          "is_unanswerable": unanswerable})
    closed_rows = []
    for i in range(n_trivia):
        value = words.phrase(1, 3, title=True)
        aliases = {value, value.lower(), f"The {value}", value.split()[0], f"{value.lower()} ({words.phrase(1, 1)})"}
        closed_rows.append({"dataset": "triviaqa", "id": f"tc_{i}", "question": f"Which {words.phrase(4, 10)}?",
                            "answers": sorted(aliases)})
    for _ in range(n_nq):
        question = f"who {words.phrase(4, 9)}"
        answers = [words.phrase(1, 3)] + ([words.phrase(1, 2)] if rnd.random() < 0.3 else [])
        closed_rows.append({"dataset": "nq_open", "id": hashlib.md5(question.encode()).hexdigest(),
                            "question": question, "answers": answers})
    return open_rows, closed_rows


def _distractor(rnd: random.Random, words: _Words, item: dict) -> str:
    """A wrong answer: a span of the passage (open-book) or an invented name (closed-book)."""
    if "context" in item:
        tokens = item["context"].split()
        start = rnd.randrange(len(tokens))
        return " ".join(tokens[start:start + rnd.randint(1, 5)]).rstrip(".,")
    return words.phrase(1, 3, title=rnd.random() < 0.5)


def _response(rnd: random.Random, words: _Words, item: dict, condition: str, skill: float, distractors: list[str]) -> str:
    """One model answer: correct, decorated, partial, wrong, abstaining or long, by a per-item skill.

    Wrong answers mostly come from a small per-item pool, as a model's wrong answers concentrate on a few distractors.
    """
    abstain_p = 0.10 if condition == "treatment" else 0.06
    open_book = "context" in item
    if open_book and item["is_unanswerable"]:
        if rnd.random() < skill * 0.8 + abstain_p:
            return rnd.choice(ABSTAIN_TEXTS)
        return rnd.choice(distractors) if rnd.random() < 0.8 else _distractor(rnd, words, item)
    roll = rnd.random()
    gold = rnd.choice(item["answers"])
    if roll < abstain_p:
        return rnd.choice(ABSTAIN_TEXTS)
    if roll < abstain_p + skill * 0.7:
        form = rnd.random()
        if form < 0.6:
            return gold
        if form < 0.8:
            return gold.lower() if rnd.random() < 0.5 else gold.title()
        return rnd.choice((f"The answer is {gold}.", f"{gold}.", f"It is {gold}"))
    if roll < abstain_p + skill * 0.7 + 0.1:
        return f"{gold.split()[0]} {words.word()}"
    if roll < 0.97:
        return rnd.choice(distractors) if rnd.random() < 0.8 else _distractor(rnd, words, item)
    return f"{words.sentence(10, 25)} {gold} {words.sentence(5, 15)}"


def _line(rnd: random.Random, cid: str, text: str, finish: str, prompt_tokens: int) -> str:
    completion = max(1, int(len(text.split()) * 1.3))
    return json.dumps({"custom_id": cid, "response": {
        "id": f"chatcmpl-{rnd.getrandbits(96):024x}", "object": "chat.completion", "created": 1788062136,
        "model": MODEL, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion,
                  "completion_tokens": completion, "prompt_tokens_details": {"cached_tokens": 29}}}})


def generate(work: Path, lines: int, k: int, seed: int) -> dict[str, Any]:
    """Writes prepared/{open_book,closed_book}.jsonl and results.jsonl under `work`; returns what was written."""
    from pipeline.naming import make_custom_id

    rnd = random.Random(seed)
    words = _Words(rnd)
    open_rows, closed_rows = _make_items(rnd, words, lines, k)
    prepared = work / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    for name, rows in (("open_book", open_rows), ("closed_book", closed_rows)):
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out: list[str] = []
    texts: set[str] = set()
    errors = truncated = 0
    for item in [*closed_rows, *open_rows]:
        type_ = "open" if "context" in item else "closed"
        skill = rnd.betavariate(1.2, 1.0)
        distractors = [_distractor(rnd, words, item) for _ in range(3)]
        base_prompt = 220 + len(item.get("context", "")) // 5 if type_ == "open" else 60
        for temp in TEMPS:
            for condition in CONDITIONS:
                greedy = _response(rnd, words, item, condition, skill, distractors)
                for sample in range(k):
                    cid = make_custom_id(item["dataset"], item["id"], condition, temp, sample, type_)
                    roll = rnd.random()
                    if roll < 0.001:
                        errors += 1
                        out.append(json.dumps({"custom_id": cid, "error": {"code": 500, "message": "internal error"}}))
                        continue
                    if roll < 0.006:
                        truncated += 1
                        text, finish = words.sentence(60, 120), "length"
                    elif temp == 0.0 and rnd.random() < 0.9:  # greedy decoding mostly repeats itself
                        text, finish = greedy, "stop"
                    else:
                        text, finish = _response(rnd, words, item, condition, skill, distractors), "stop"
                    texts.add(text)
                    out.append(_line(rnd, cid, text, finish, base_prompt + rnd.randint(0, 20)))
    rnd.shuffle(out)  # providers do not preserve row order
    (work / "results.jsonl").write_text("\n".join(out) + "\n", encoding="utf-8")
    return {"lines": len(out), "k": k, "open_items": len(open_rows), "closed_items": len(closed_rows),
            "distinct_responses": len(texts), "error_lines": errors, "length_rows": truncated,
            "results_mb": round((work / "results.jsonl").stat().st_size / 1e6, 1)}


def stats_alone_deltas(n: int, seed: int) -> Any:
    """EM replicate-mean deltas of n paired items (K = 10 samples per condition, a small treatment effect)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = rng.beta(2.0, 2.0, n)
    ctrl = rng.binomial(10, p) / 10
    trt = rng.binomial(10, np.clip(p + 0.02, 0, 1)) / 10
    return trt - ctrl


# ---------------------------------------------------------------- measurement helpers

def peak_rss_bytes() -> int:
    """This process's peak RSS since it started: VmHWM on Linux.

    Not `ru_maxrss`: Linux carries it across fork + exec, so a worker would report the bench parent's own peak
    (about 1.5 GiB while it generates the data) when that is higher than the worker's.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Timer:
    """Wall time per (phase, step), and the process's peak RSS when each step ended."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    @contextmanager
    def __call__(self, phase: str, step: str) -> Iterator[None]:
        gc.collect()
        start = time.perf_counter()
        yield
        self.steps.append({"phase": phase, "step": step, "seconds": time.perf_counter() - start,
                           "peak_rss": peak_rss_bytes()})


def instrument(module: Any, names: tuple[str, ...], totals: dict[str, list[float]]) -> None:
    """Wraps module-level functions so their cumulative time and call count land in `totals` (hot-spot view)."""
    for name in names:
        original = getattr(module, name)

        def wrapper(*args: Any, _f: Callable[..., Any] = original, _n: str = name, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                entry = totals.setdefault(_n, [0.0, 0])
                entry[0] += time.perf_counter() - start
                entry[1] += 1

        setattr(module, name, wrapper)


def walsh_seconds_per_pair(sizes: tuple[int, ...]) -> dict[str, Any]:
    """The original Walsh loop's per-pair cost, measured at `sizes`; the fastest one is used to extrapolate."""
    import original_impl

    measured = {}
    for n in sizes:
        d = stats_alone_deltas(n, 7)
        start = time.perf_counter()
        original_impl.walsh_median(d)
        measured[n] = (time.perf_counter() - start) / (n * (n + 1) // 2)
    return {"per_pair": min(measured.values()), "measured": {str(n): s for n, s in measured.items()}}


# ---------------------------------------------------------------- workers (one subprocess each)

def worker_ours(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import orjson
    import pandas as pd

    import pipeline.stats.significance as significance
    from pipeline.data.prepared import read_prepared
    from pipeline.parsing import (
        PredictionColumns,
        combine_results,
        load_prediction_columns,
        parse_workers,
        write_predictions,
    )
    from pipeline.scoring.score import ScoredColumns, per_item_csv_blocks
    from targets.atomic import dumps_json

    timer = Timer()
    pred_path, per_item_path = work / "ours_predictions.csv", work / "ours_per_item_scores.csv"
    sources = [work / "results.jsonl"]
    # ParsePredictions.run: combine_results into results_combined.jsonl, then write_predictions into predictions.csv
    # and its columnar copy predictions.npz (the hand-off ScorePredictions reads)
    with timer("info", "combine_results (results_combined.jsonl)"):
        with open(work / "ours_results_combined.jsonl", "wb") as combined:
            combine_results(sources, combined)
    with timer("parse", "write_predictions + columns (as ParsePredictions.run)"):
        columns = PredictionColumns()
        with open(pred_path, "w", encoding="utf-8", newline="") as out:
            n_rows = write_predictions(sources, out, columns=columns).rows
    workers = parse_workers(sum(path.stat().st_size for path in sources))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    parse_cpu = {"workers": workers, "children_cpu": children.ru_utime + children.ru_stime,
                 "children_peak": children.ru_maxrss * 1024}
    with timer("parse", "save predictions.npz"):
        with open(work / "ours_predictions.npz", "wb") as fh:
            columns.save(fh)
        del columns
    with timer("floor", "orjson.loads of every line alone, nothing kept"):
        with open(work / "results.jsonl", "rb") as fh:
            for raw in fh:
                orjson.loads(raw)

    with timer("score", "load_prediction_columns (predictions.npz)"):
        loaded = load_prediction_columns(work / "ours_predictions.npz")
    with timer("score", "load prepared items"):
        items_rows = []
        for kind, type_ in (("open_book", "open"), ("closed_book", "closed")):  # as tasks.analyze.prepared_items
            for row in read_prepared(work / "prepared" / f"{kind}.jsonl", kind):
                items_rows.append({"dataset": row["dataset"], "id": row["id"], "type": type_, "question": row["question"],
                                   "answers": list(row["answers"]), "context": row.get("context"),
                                   "is_unanswerable": bool(row.get("is_unanswerable", False))})
        items = pd.DataFrame(items_rows, columns=["dataset", "id", "type", "question", "answers", "context",
                                                  "is_unanswerable"])
    with timer("score", "ScoredColumns (as ScorePredictions.run)"):
        scored = ScoredColumns(loaded, items)
    with timer("score", "per_item_scores"):
        table = scored.per_item_scores()
    with timer("score", "write per_item_scores.csv (per_item_csv_blocks)"):
        with open(per_item_path, "w", encoding="utf-8", newline="") as fh:
            fh.writelines(per_item_csv_blocks(table))
    with timer("score", "write scored_rows.npz (for OptionalAnalyses)"):
        with open(work / "ours_scored_rows.npz", "wb") as fh:
            np.savez(fh, **scored.row_arrays())
    with timer("score", "score summary"):
        scored.summary()
    n_per_item = len(table)
    del loaded, items, items_rows, scored, table

    hot: dict[str, list[float]] = {}
    instrument(significance, ("bootstrap_cis", "sign_flip_permutation_p", "hodges_lehmann", "wilcoxon", "mcnemar_exact",
                              "selective_risk", "tost_noninferiority", "cliffs_delta"), hot)
    with timer("stats", "read per_item_scores.csv"):
        per_item = pd.read_csv(per_item_path, dtype={"item_key": str, "condition": str, "type": str})
    with timer("stats", "compute_significance"):
        result = significance.compute_significance(per_item, temps=list(TEMPS), stats_cfg={})
    with timer("stats", "write significance.json"):
        (work / "ours_significance.json").write_text(dumps_json(result), encoding="utf-8")
    return {"steps": timer.steps, "rows": n_rows, "per_item_rows": n_per_item, "hot": hot, "peak_rss": peak_rss_bytes(),
            "parse_processes": parse_cpu}


def worker_original(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import original_impl

    timer = Timer()
    pred_path, per_item_path = work / "orig_predictions.csv", work / "orig_per_item_scores.csv"
    with timer("parse", "parse_results (validation passes + csv)"):
        n_rows = original_impl.parse_results(str(work / "results.jsonl"), str(pred_path))
    with timer("score", "score_predictions (csv in, csv out)"):
        n_per_item = original_impl.score_predictions(str(pred_path), str(work / "prepared" / "open_book.jsonl"),
                                                     str(work / "prepared" / "closed_book.jsonl"), str(per_item_path))
    hot: dict[str, list[float]] = {}
    if args.measure_walsh:  # the comparator: the O(n²) Walsh loop at every n, run for real (minutes, GiBs)
        original_impl.HL_CUTOFF = 1 << 62
    instrument(original_impl, ("bootstrap_ci", "perm_p_value", "hodges_lehmann", "wilcoxon_p"), hot)
    hl_sizes: list[int] = []
    cfg = {"bootstrap_samples": 5000, "permutation_samples": 5000, "random_seed": 1337, "enable_permutation": True,
           "enable_fdr": True, "risk_thresholds": [0.0, 0.25, 0.5, 0.75, 1.0], "tost_alpha": 0.05,
           "tost_margins": {"em": 0.01, "f1": 0.01}}
    with timer("stats", "compute_stats + json.dump"):
        result = original_impl.compute_stats(str(per_item_path), cfg, hl_sizes)
        with open(work / "orig_significance.json", "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    peak = peak_rss_bytes()  # before the Walsh calibration, which is not part of the pipeline
    walsh = walsh_seconds_per_pair(args.walsh_sizes)
    return {"steps": timer.steps, "rows": n_rows, "per_item_rows": n_per_item, "hot": hot, "peak_rss": peak,
            "hl_sizes": hl_sizes, "walsh": walsh}


def worker_stats_ours(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from pipeline.stats import paired

    d = stats_alone_deltas(args.stats_items, 11)
    continuous = np.random.default_rng(5).normal(0.01, 0.3, args.stats_items)
    timer = Timer()
    with timer("stats1", "bootstrap_ci"):
        paired.bootstrap_ci(d, n_resamples=args.resamples, rng=np.random.default_rng(1))
    with timer("stats1", "sign_flip_permutation_p"):
        paired.sign_flip_permutation_p(d, n_resamples=args.resamples, rng=np.random.default_rng(2))
    with timer("stats1", "hodges_lehmann"):
        paired.hodges_lehmann(d)
    with timer("stats1", "wilcoxon"):
        paired.wilcoxon(d)
    with timer("info", "hodges_lehmann on continuous deltas (all values distinct)"):
        paired.hodges_lehmann(continuous)
    return {"steps": timer.steps, "peak_rss": peak_rss_bytes()}


def worker_stats_original(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import original_impl

    d = stats_alone_deltas(args.stats_items, 11)
    rng = np.random.default_rng(1337)
    timer = Timer()
    with timer("stats1", "bootstrap loop"):
        original_impl.bootstrap_ci(d, args.resamples, rng)
    with timer("stats1", "sign-flip loop"):
        original_impl.perm_p_value(d, args.resamples, rng)
    with timer("stats1", "hodges_lehmann as shipped"):
        original_impl.hodges_lehmann(d)
    with timer("stats1", "wilcoxon (scipy)"):
        original_impl.wilcoxon_p(d)
    return {"steps": timer.steps, "peak_rss": peak_rss_bytes(), "walsh": walsh_seconds_per_pair(args.walsh_sizes)}


WORKERS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "ours": worker_ours, "original": worker_original, "stats-ours": worker_stats_ours,
    "stats-original": worker_stats_original,
}


def run_worker(name: str, work: Path, argv: list[str]) -> dict[str, Any]:
    print(f"  running {name} …", flush=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name, "--workdir", str(work)],
                          stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report

def _pairs(n: int) -> int:
    return n * (n + 1) // 2


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _ratio(orig: float, ours: float) -> float:
    return orig / ours if ours > 0 else float("inf")


def _row(label: str, ours: float | None, orig: float | None, note: str = "") -> str:
    o = f"{ours:10.2f}" if ours is not None else " " * 10
    g = f"{orig:12.2f}" if orig is not None else " " * 12
    r = f"{_ratio(orig, ours):8.1f}x" if ours is not None and orig is not None else " " * 9
    return f"{label:<46}{o}  {g}  {r}  {note}".rstrip()


def _same_n_extra(sizes: list[int], per_pair: float) -> tuple[float, list[int]]:
    """Extra seconds the O(n²) Walsh loop would have taken for the calls the original answered with a median."""
    big = [n for n in sizes if n > HL_CUTOFF]
    return sum(_pairs(n) * per_pair for n in big), big


def report(data: dict[str, Any], ours: dict[str, Any], orig: dict[str, Any], s_ours: dict[str, Any],
           s_orig: dict[str, Any], args: argparse.Namespace) -> bool:
    def phase(res: dict[str, Any], name: str) -> float:
        return sum(s["seconds"] for s in res["steps"] if s["phase"] == name)

    header = f"{'phase':<46}{'ours (s)':>10}  {'original (s)':>12}  {'ratio':>9}"
    shipped = sum(phase(orig, p) for p in ("parse", "score", "stats")) / sum(phase(ours, p) for p in ("parse", "score", "stats"))
    print(f"\nAS SHIPPED: parse + score + stats of {data['lines']:,} lines, original / ours = {shipped:.1f}x "
          f"(target {TARGET_RATIO:.0f}x: {'PASS' if shipped >= TARGET_RATIO else 'NOT REACHED'})")
    print(f"\nData: {data}")
    print(f"Rows: ours {ours['rows']:,} predictions -> {ours['per_item_rows']:,} per-item rows; "
          f"original {orig['rows']:,} -> {orig['per_item_rows']:,}")

    print(f"\n== Pipeline: parse -> score -> stats ({data['lines']:,} result lines) ==")
    print(header)
    extra, big = (0.0, []) if args.measure_walsh else _same_n_extra(orig["hl_sizes"], orig["walsh"]["per_pair"])
    totals = {"ours": 0.0, "orig": 0.0}
    for name in ("parse", "score", "stats"):
        a, b = phase(ours, name), phase(orig, name)
        totals["ours"] += a
        totals["orig"] += b
        print(_row(name, a, b))
    if args.measure_walsh:
        print(_row("total, same-n O(n²) HL (MEASURED: the loop ran)", totals["ours"], totals["orig"]))
    else:
        print(_row("total (original as shipped)", totals["ours"], totals["orig"]))
        print(_row("stats, same-n O(n²) HL (EXTRAPOLATED)", phase(ours, "stats"), phase(orig, "stats") + extra))
        print(_row("total, same-n O(n²) HL (EXTRAPOLATED)", totals["ours"], totals["orig"] + extra))
    print(_row("info: ours writes results_combined.jsonl too", phase(ours, "info"), None, "(not in totals)"))
    floor = phase(ours, "floor")
    print(_row("floor: orjson.loads of every line", floor, None,
               f"(any parse that decodes each line; caps the overall ratio at {_ratio(totals['orig'], floor):.1f}x)"))
    print(f"{'peak RSS (VmHWM, own subprocess)':<46}{_gib(ours['peak_rss']):>10}  {_gib(orig['peak_rss']):>12}")
    procs = ours["parse_processes"]
    if procs["workers"] > 1:
        print(f"  parse ran in {procs['workers']} worker processes (one per usable core, at most 4) besides ours: "
              f"their CPU {procs['children_cpu']:.2f} s; the largest one's peak RSS {_gib(procs['children_peak'])} "
              "(ru_maxrss, not in the peak above). The original parses in one process.")
    per_pair = orig["walsh"]["per_pair"]
    print(f"  HL: the original answered {len(big)} of {len(orig['hl_sizes'])} HL calls (n = {sorted(set(big))}) with the "
          f"median; EXTRAPOLATED their O(n²) loop from {per_pair * 1e9:.0f} ns/pair (measured at n = "
          f"{', '.join(orig['walsh']['measured'])}) = +{extra:.1f} s. Its peak RSS excludes those loops' lists "
          f"(~32 bytes per pair: {_gib(32 * max((_pairs(n) for n in big), default=0))} for the largest).")

    print("\n-- ours, step by step (peak RSS when the step ended) --")
    for s in ours["steps"]:
        print(f"  {s['phase']:<6} {s['step']:<46}{s['seconds']:9.2f} s  {_gib(s['peak_rss']):>10}")
    print("  inside compute_significance (cumulative s / calls):")
    for name, (sec, calls) in sorted(ours["hot"].items(), key=lambda kv: -kv[1][0]):
        print(f"    {name:<28}{sec:9.2f} s  {calls:5d} calls")
    print("-- original, inside compute_stats (cumulative s / calls) --")
    for name, (sec, calls) in sorted(orig["hot"].items(), key=lambda kv: -kv[1][0]):
        print(f"    {name:<28}{sec:9.2f} s  {calls:5d} calls")

    n = args.stats_items
    print(f"\n== Statistics alone: {n:,} paired items, one metric (EM replicate-mean deltas, K=10), "
          f"{args.resamples:,} bootstrap + {args.resamples:,} permutation resamples ==")
    print(header)
    steps_ours = {s["step"]: s["seconds"] for s in s_ours["steps"]}
    steps_orig = {s["step"]: s["seconds"] for s in s_orig["steps"]}
    hl_same_n = _pairs(n) * s_orig["walsh"]["per_pair"]
    for label, a, b in (("bootstrap CI", "bootstrap_ci", "bootstrap loop"),
                        ("sign-flip permutation p", "sign_flip_permutation_p", "sign-flip loop"),
                        ("wilcoxon", "wilcoxon", "wilcoxon (scipy)"),
                        ("hodges-lehmann vs original as shipped (median)", "hodges_lehmann", "hodges_lehmann as shipped")):
        print(_row(label, steps_ours[a], steps_orig[b]))
    print(_row("hodges-lehmann vs O(n²) loop, same n (EXTRAP.)", steps_ours["hodges_lehmann"], hl_same_n,
               f"{_pairs(n):,} pairs x {s_orig['walsh']['per_pair'] * 1e9:.0f} ns"))
    ours_total = sum(s["seconds"] for s in s_ours["steps"] if s["phase"] == "stats1")
    shipped_total = sum(s["seconds"] for s in s_orig["steps"] if s["phase"] == "stats1")
    same_n_total = shipped_total - steps_orig["hodges_lehmann as shipped"] + hl_same_n
    print(_row("total vs original as shipped", ours_total, shipped_total))
    print(_row("total vs same-n O(n²) HL (EXTRAPOLATED)", ours_total, same_n_total))
    print(_row("info: ours HL, continuous deltas", steps_ours[next(k for k in steps_ours if k.startswith("hodges_lehmann on"))],
               None))

    pipeline_label = ("pipeline total >= 20x faster (same-n O(n²) HL, measured)" if args.measure_walsh
                      else "pipeline total >= 20x faster (original as shipped)")
    checks = [
        (pipeline_label, _ratio(totals["orig"], totals["ours"]) >= TARGET_RATIO),
        ("pipeline total >= 20x faster (same-n HL, extrapolated)",
         _ratio(totals["orig"] + extra, totals["ours"]) >= TARGET_RATIO),
        ("our peak RSS < 4 GiB", ours["peak_rss"] < TARGET_PEAK_BYTES),
        ("statistics alone >= 20x faster (original as shipped)", _ratio(shipped_total, ours_total) >= TARGET_RATIO),
        ("statistics alone >= 20x faster (same-n HL, extrapolated)", _ratio(same_n_total, ours_total) >= TARGET_RATIO),
    ]
    print()
    for label, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {label}")
    passed = all(ok for _, ok in checks)
    size = "quick (smoke size)" if args.quick else "full size"
    print(f"\n{'PASS' if passed else 'FAIL'}: {sum(ok for _, ok in checks)}/{len(checks)} targets met ({size})")
    return passed


# ---------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke size: 40,000 lines, 5,000 items, 1,000 resamples")
    ap.add_argument("--lines", type=int, help="result lines (default 1,000,000; quick 40,000)")
    ap.add_argument("--samples", type=int, default=10, help="K samples per item, temp and condition (default 10)")
    ap.add_argument("--stats-items", type=int, help="paired items for statistics alone (default 100,000; quick 5,000)")
    ap.add_argument("--resamples", type=int, help="bootstrap and permutation resamples there (default 5,000; quick 1,000)")
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--measure-walsh", action="store_true",
                    help="run the original's O(n²) Hodges-Lehmann loop at every n instead of extrapolating it "
                         "(full size: about 8 more minutes and 3 GiB)")
    ap.add_argument("--workdir", type=Path, help="where to write the data (default: a temporary directory); data already "
                    "there for the same --lines, --samples and --seed is reused")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.lines = args.lines or (40_000 if args.quick else 1_000_000)
    args.stats_items = args.stats_items or (5_000 if args.quick else 100_000)
    args.resamples = args.resamples or (1_000 if args.quick else 5_000)
    args.walsh_sizes = (1000, 2000) if args.quick else (1000, 2000, 4000)
    return args


def data_in(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic data in `work`: generated, or reused when `work` already holds it for the same size and seed."""
    marker = work / "data.json"
    wanted = {"lines": args.lines, "k": args.samples, "seed": args.seed}
    if marker.exists() and (work / "results.jsonl").exists():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if recorded.get("params") == wanted:
            print(f"Reusing the {args.lines:,} result lines (K={args.samples}, seed {args.seed}) in {work}", flush=True)
            return recorded["data"]
    print(f"Generating {args.lines:,} result lines (K={args.samples}, seed {args.seed}) in {work} …", flush=True)
    start = time.perf_counter()
    data = generate(work, args.lines, args.samples, args.seed)
    marker.write_text(json.dumps({"params": wanted, "data": data}), encoding="utf-8")
    print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    return data


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.workdir, args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_score_stats_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = data_in(work, args)
        common = [*(["--quick"] if args.quick else []), "--lines", str(args.lines), "--samples", str(args.samples),
                  "--stats-items", str(args.stats_items), "--resamples", str(args.resamples),
                  *(["--measure-walsh"] if args.measure_walsh else [])]
        ours = run_worker("ours", work, common)
        orig = run_worker("original", work, common)
        s_ours = run_worker("stats-ours", work, common)
        s_orig = run_worker("stats-original", work, common)
        passed = report(data, ours, orig, s_ours, s_orig, args)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
