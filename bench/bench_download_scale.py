"""Scale acceptance: download, parse, score and stats stay linear in the result lines, with bounded memory.

Usage (from the repository root, with the project's virtualenv):
    python bench/bench_download_scale.py                      # 1,000,000 and 10,000,000 lines (about 15 min, 20 GB disk)
    python bench/bench_download_scale.py --quick              # 100,000 and 1,000,000 lines
    python bench/bench_download_scale.py --lines 200000,2000000 --workdir /tmp/scale_b   # keep (and reuse) the data

For each size, the data (seeded; `bench_score_stats.py`'s item and answer generator) is written as the parts of
a run: (temp, condition) shards of 2 temps x 2 conditions x K=10 samples, cut into parts of 50,000 requests (the
largest batch file OpenAI accepts). Each part has its request file (custom_ids in input order) and the
provider's output file (Fireworks output-line shape, shuffled, ~0.1 % error lines, ~0.5 % `length`).
Then, each phase in its own subprocess (its peak RSS is that process's VmHWM):
- download: per part, what DownloadPart.run / fetch / download do, over loopback HTTP from the offline emulator:
  the emulator (its own process, started before the phase and stopped after it, so neither its time nor its
  memory counts) serves each part's provider file as the `BIJOutputSet.jsonl` of a READY output dataset, as a
  finished job leaves it; the phase fetches it through `FireworksClient.download_dataset` (`:getDownloadEndpoint`,
  signed URLs) bounded by `DownloadLimits.for_part` and a `Deadline`, after `ensure_free_space`, then `unpack`,
  `merge_results` against the part's `input_custom_ids`, missing ids as `missing_result`, the atomic results.jsonl
  write (sorted-key JSON lines), then `check_part_results` (the done predicate); timed in steps (read requests,
  http fetch, unpack + merge, write, check);
- parse: what ParsePredictions.run does: `combine_results`, `write_predictions` into predictions.csv with the
  columnar `PredictionColumns`, saved as predictions.npz;
- score: what ScorePredictions.run does with the columnar hand-off: `load_prediction_columns`, the prepared
  items, `ScoredColumns`, per_item_scores.csv, scored_rows.npz, the summary;
- stats: what ComputeStats.run does: per_item_scores.csv, `compute_significance` (default stats config), JSON.
It prints the verdict first, then seconds per million lines at each size, the ratio largest/smallest size per
phase and in total (target <= 1.2x) and the peak RSS of each phase (target < 2 GiB), then the download and parse
steps per million lines. Exit 0 only when every target is met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_score_stats as gen  # noqa: E402 - the data generator shared with the score/stats bench

PART_REQUESTS = 50_000
K = 10
PHASES = ("download", "parse", "score", "stats")
TARGET_RATIO = 1.2
TARGET_PEAK = 2 * 1024**3
ACCOUNT = "emulator"  # the account pipeline.provider.client_environ gives the client of an emulator run
MAX_TOKENS = 512  # config/experiment.yaml max_new_tokens of open_book (the larger): DownloadPart.limits' input
DOWNLOAD_STEPS = ("read requests", "http fetch", "unpack + merge", "write", "check")


# ---------------------------------------------------------------- data

def generate(work: Path, lines: int, seed: int) -> dict[str, Any]:
    """Writes prepared/, requests/part_NNNN.jsonl and provider/part_NNNN.jsonl under `work`, streamed (one part in
    memory at a time); returns what was written."""
    from pipeline.naming import make_custom_id

    rnd = random.Random(seed)
    words = gen._Words(rnd)
    open_rows, closed_rows = gen._make_items(rnd, words, lines, K)
    prepared = work / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    for name, rows in (("open_book", open_rows), ("closed_book", closed_rows)):
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (work / "requests").mkdir(exist_ok=True)
    (work / "provider").mkdir(exist_ok=True)
    shards: dict[tuple[float, str], list[tuple[str, str]]] = {(t, c): [] for t in gen.TEMPS for c in gen.CONDITIONS}
    parts = 0
    total = 0

    def flush(shard: list[tuple[str, str]]) -> None:
        nonlocal parts, total
        name = f"part_{parts:04d}.jsonl"
        (work / "requests" / name).write_text("".join(json.dumps({"custom_id": cid}) + "\n" for cid, _ in shard),
                                              encoding="utf-8")
        out = [line for _, line in shard]
        rnd.shuffle(out)  # providers do not preserve row order
        (work / "provider" / name).write_text("\n".join(out) + "\n", encoding="utf-8")
        parts += 1
        total += len(shard)
        shard.clear()

    for item in [*closed_rows, *open_rows]:
        type_ = "open" if "context" in item else "closed"
        skill = rnd.betavariate(1.2, 1.0)
        distractors = [gen._distractor(rnd, words, item) for _ in range(3)]
        base_prompt = 220 + len(item.get("context", "")) // 5 if type_ == "open" else 60
        for temp in gen.TEMPS:
            for condition in gen.CONDITIONS:
                shard = shards[(temp, condition)]
                greedy = gen._response(rnd, words, item, condition, skill, distractors)
                for sample in range(K):
                    cid = make_custom_id(item["dataset"], item["id"], condition, temp, sample, type_)
                    roll = rnd.random()
                    if roll < 0.001:
                        line = json.dumps({"custom_id": cid, "error": {"code": 500, "message": "internal error"}})
                    else:
                        if roll < 0.006:
                            text, finish = words.sentence(60, 120), "length"
                        elif temp == 0.0 and rnd.random() < 0.9:
                            text, finish = greedy, "stop"
                        else:
                            text, finish = gen._response(rnd, words, item, condition, skill, distractors), "stop"
                        line = gen._line(rnd, cid, text, finish, base_prompt + rnd.randint(0, 20))
                    shard.append((cid, line))
                if len(shard) >= PART_REQUESTS:
                    flush(shard)
    for shard in shards.values():
        if shard:
            flush(shard)
    return {"lines": total, "parts": parts, "items": len(open_rows) + len(closed_rows),
            "provider_mb": round(sum(p.stat().st_size for p in (work / "provider").iterdir()) / 1e6, 1)}


def data_in(work: Path, lines: int, seed: int) -> dict[str, Any]:
    """The data for `lines` in `work`: generated, or reused when `work` already holds it for the same size and seed."""
    marker = work / "data.json"
    wanted = {"lines": lines, "seed": seed, "part_requests": PART_REQUESTS, "k": K}
    if marker.exists():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if recorded.get("params") == wanted:
            print(f"Reusing {lines:,} result lines in {work}", flush=True)
            return recorded["data"]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"Generating {lines:,} result lines in parts of {PART_REQUESTS:,} in {work} …", flush=True)
    start = time.perf_counter()
    data = generate(work, lines, seed)
    marker.write_text(json.dumps({"params": wanted, "data": data}), encoding="utf-8")
    print(f"  done in {time.perf_counter() - start:.0f} s: {data}", flush=True)
    return data


# ---------------------------------------------------------------- phases (one subprocess each)

def _parts(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "requests").iterdir())


def output_dataset_id(part: str) -> str:
    """The emulator output dataset serving `part` (`part_0003.jsonl` -> `bench-part-0003`)."""
    return "bench-" + Path(part).stem.replace("_", "-")


@contextmanager
def serving_outputs(work: Path) -> Iterator[str]:
    """The base URL of an emulator process serving each part's provider file as the output of a finished job: an
    output dataset (the record `Emulator._write_output` stores) whose `BIJOutputSet.jsonl` is that file, hard-linked
    (the 10M data is 5 GB), and an empty `error-data` (a job's output always has it). Stopped on exit."""
    from pipeline.emulator.api import ERROR_FILE, OUTPUT_FILE, output_dataset_record
    from pipeline.emulator.process import ensure_emulator, stop_emulator
    from pipeline.emulator.store import Store

    state = work / "emulator_state"
    stop_emulator(state)  # one left by an interrupted run would keep serving the old state
    shutil.rmtree(state, ignore_errors=True)
    store = Store(state)
    now = time.time_ns()
    for name in _parts(work):
        dataset = output_dataset_id(name)
        files_dir = store.files_dir(ACCOUNT, dataset)
        files_dir.mkdir(parents=True)
        provider = work / "provider" / name
        try:
            os.link(provider, files_dir / OUTPUT_FILE)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(provider, files_dir / OUTPUT_FILE)
        (files_dir / ERROR_FILE).write_bytes(b"")
        with open(work / "requests" / name, "rb") as fh:  # one provider line per request, as generate() writes
            lines = sum(1 for _ in fh)
        store.put(ACCOUNT, "datasets", output_dataset_record(
            f"accounts/{ACCOUNT}/datasets/{dataset}", f"accounts/{ACCOUNT}/batchInferenceJobs/{dataset}",
            {OUTPUT_FILE: provider.stat().st_size, ERROR_FILE: 0}, example_count=lines, end_ns=now))
    # No job is created, so the emulator's job latency plays no part; idle exit only if this process dies.
    url = ensure_emulator(state, answer_key=None)
    try:
        yield url
    finally:
        stop_emulator(state)


def phase_download(work: Path, base_url: str) -> dict[str, Any]:
    from pipeline.parsing import (
        check_part_results,
        input_custom_ids,
        merge_results,
        result_lines,
        with_missing,
    )
    from pipeline.provider import EMULATOR_BACKOFF_S, EMULATOR_KEY
    from pipeline.providers.fireworks import FireworksClient
    from pipeline.providers.limits import Deadline, DownloadLimits, ensure_free_space
    from pipeline.tasks.download import unpack
    from targets.atomic import write_bytes

    # As make_backend builds the client of an emulator run: its URL (loopback http allowed), a placeholder key.
    client = FireworksClient.from_env({"FIREWORKS_API_KEY": EMULATOR_KEY, "FIREWORKS_ACCOUNT_ID": ACCOUNT,
                                       "FIREWORKS_BASE_URL": base_url})
    client.backoff_s = EMULATOR_BACKOFF_S
    out_dir = work / "results"
    out_dir.mkdir(exist_ok=True)
    scratch = work / ".download"  # what a part downloads and unpacks; removed after each part, as DownloadPart.fetch
    steps = dict.fromkeys(DOWNLOAD_STEPS, 0.0)
    rows = bad = 0
    for name in _parts(work):  # as DownloadPart.run, fetch and download, one attempt (the data is complete)
        dataset = output_dataset_id(name)
        what = f"download of {name} (output dataset {dataset})"
        started = time.perf_counter()
        expected = input_custom_ids(work / "requests" / name)
        limits = DownloadLimits.for_part(len(expected), max_tokens=MAX_TOKENS)
        read = time.perf_counter()
        try:
            ensure_free_space(scratch, limits.max_bytes, what)
            files = client.download_dataset(dataset, scratch / "rest", max_bytes=limits.max_bytes,
                                            deadline=Deadline(limits.deadline_s, what))
            fetched = time.perf_counter()
            ensure_free_space(scratch, limits.max_bytes, f"unpacking the {what}")
            found, _problems = merge_results(unpack(files, scratch / "unpacked", limits.max_bytes), expected)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        found, _missing = with_missing(found, expected, "no result")
        merged = time.perf_counter()
        write_bytes(out_dir / name, result_lines(found))
        written = time.perf_counter()
        check = check_part_results(out_dir / name, expected)  # DownloadPart's done predicate
        rows += check.rows
        bad += not check.valid
        for step, seconds in zip(DOWNLOAD_STEPS, (read - started, fetched - read, merged - fetched, written - merged,
                                                  time.perf_counter() - written), strict=True):
            steps[step] += seconds
    return {"rows": rows, "invalid_parts": bad, "steps": steps}


def phase_parse(work: Path) -> dict[str, Any]:
    from pipeline.parsing import PredictionColumns, combine_results, write_predictions

    sources = [work / "results" / name for name in _parts(work)]
    steps = {}
    start = time.perf_counter()
    with open(work / "results_combined.jsonl", "wb") as combined:
        combine_results(sources, combined)
    steps["combine_results"] = time.perf_counter() - start
    columns = PredictionColumns()
    with open(work / "predictions.csv", "w", encoding="utf-8", newline="") as out:
        parsed = write_predictions(sources, out, columns=columns)
    steps["write_predictions"] = time.perf_counter() - start - steps["combine_results"]
    with open(work / "predictions.npz", "wb") as fh:
        columns.save(fh)
    steps["save predictions.npz"] = time.perf_counter() - start - sum(steps.values())
    (work / "results_combined.jsonl").unlink()  # a byte copy of the parts: disk, not memory
    return {"rows": parsed.rows, "steps": steps}


def phase_score(work: Path) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from pipeline.data.prepared import read_prepared
    from pipeline.parsing import load_prediction_columns
    from pipeline.scoring.score import ScoredColumns, per_item_csv_blocks

    columns = load_prediction_columns(work / "predictions.npz")
    rows = []
    for kind, type_ in (("open_book", "open"), ("closed_book", "closed")):  # as tasks.analyze.prepared_items
        for row in read_prepared(work / "prepared" / f"{kind}.jsonl", kind):
            rows.append({"dataset": row["dataset"], "id": row["id"], "type": type_, "question": row["question"],
                         "answers": list(row["answers"]), "context": row.get("context"),
                         "is_unanswerable": bool(row.get("is_unanswerable", False))})
    items = pd.DataFrame(rows, columns=["dataset", "id", "type", "question", "answers", "context", "is_unanswerable"])
    del rows
    scored = ScoredColumns(columns, items)
    del columns
    table = scored.per_item_scores()
    with open(work / "per_item_scores.csv", "w", encoding="utf-8", newline="") as fh:
        fh.writelines(per_item_csv_blocks(table))
    with open(work / "scored_rows.npz", "wb") as fh:
        np.savez(fh, **scored.row_arrays())
    scored.summary()
    return {"rows": scored.n_rows, "per_item_rows": len(table)}


def phase_stats(work: Path) -> dict[str, Any]:
    import pandas as pd

    from pipeline.stats.significance import compute_significance
    from targets.atomic import dumps_json

    per_item = pd.read_csv(work / "per_item_scores.csv", dtype={"item_key": str, "condition": str, "type": str})
    result = compute_significance(per_item, temps=list(gen.TEMPS), stats_cfg={})
    (work / "significance.json").write_text(dumps_json(result), encoding="utf-8")
    return {"per_item_rows": len(per_item)}


PHASE_FUNCS = {"parse": phase_parse, "score": phase_score, "stats": phase_stats}  # download needs its emulator


def run_phase(name: str, work: Path) -> dict[str, Any]:
    """`name` in a fresh interpreter: its wall time (after the imports, which do not grow with the lines) and
    peak RSS. The download phase's emulator runs around it, in a process of its own."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--workdir", str(work)]
    with serving_outputs(work) if name == "download" else nullcontext(None) as url:
        if url is not None:
            argv += ["--emulator-url", url]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 and 1,000,000 lines")
    ap.add_argument("--lines", help="comma-separated sizes, smallest first (default 1000000,10000000)")
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--workdir", type=Path, help="where the data goes (default /tmp/scale_bench); kept and reused "
                    "when given, deleted at the end otherwise")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--emulator-url", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase == "download" and not args.emulator_url:
        ap.error("--phase download needs --emulator-url (run_phase starts the emulator)")
    default = "100000,1000000" if args.quick else "1000000,10000000"
    args.sizes = [int(s) for s in (args.lines or default).split(",")]
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.phase:
        import numpy  # noqa: F401 - imported before the clock starts, as every phase needs them
        import pandas  # noqa: F401

        import pipeline.parsing
        import pipeline.providers.fireworks
        import pipeline.scoring.score
        import pipeline.stats.significance
        import pipeline.tasks.download  # noqa: F401

        start = time.perf_counter()
        if args.phase == "download":
            result = phase_download(args.workdir, args.emulator_url)
        else:
            result = PHASE_FUNCS[args.phase](args.workdir)
        seconds = time.perf_counter() - start
        # parse's worker processes (pipeline.parsing.parse_workers) count too: the largest one's peak, their CPU
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(json.dumps({**result, "seconds": seconds, "peak_rss": max(gen.peak_rss_bytes(), children.ru_maxrss * 1024),
                          "children_cpu": children.ru_utime + children.ru_stime}))
        return 0
    root = args.workdir or Path("/tmp/scale_bench")
    results: dict[int, dict[str, dict[str, Any]]] = {}
    data: dict[int, dict[str, Any]] = {}
    for size in args.sizes:
        work = root / f"lines_{size}"
        data[size] = data_in(work, size, args.seed)
        results[size] = {}
        for name in PHASES:
            results[size][name] = run_phase(name, work)
            r = results[size][name]
            print(f"  {size:>11,} lines  {name:<9}{r['seconds']:8.1f} s  peak {r['peak_rss'] / 1024**3:5.2f} GiB", flush=True)
        if args.workdir is None:  # 10M lines take about 15 GB
            shutil.rmtree(work, ignore_errors=True)
    return report(args.sizes, data, results)


def report(sizes: list[int], data: dict[int, dict[str, Any]], results: dict[int, dict[str, dict[str, Any]]]) -> int:
    small, large = sizes[0], sizes[-1]

    def per_million(size: int, phase: str | None) -> float:
        phases = PHASES if phase is None else (phase,)
        return sum(results[size][p]["seconds"] for p in phases) / (data[size]["lines"] / 1e6)

    checks = []
    for phase in (*PHASES, None):
        ratio = per_million(large, phase) / per_million(small, phase)
        checks.append((f"{phase or 'total'}: s per million lines at {large:,} / at {small:,} = {ratio:.2f}x "
                       f"(target <= {TARGET_RATIO}x)", ratio <= TARGET_RATIO))
    for phase in PHASES:
        peak = max(results[size][phase]["peak_rss"] for size in sizes)
        checks.append((f"{phase}: peak RSS {peak / 1024**3:.2f} GiB (target < 2 GiB)", peak < TARGET_PEAK))
    passed = all(ok for _, ok in checks)
    print(f"\n{'PASS' if passed else 'NOT REACHED'}: {sum(ok for _, ok in checks)}/{len(checks)} targets met")
    for label, ok in checks:
        print(f"  [{'PASS' if ok else 'NOT REACHED'}] {label}")
    print(f"\n{'phase':<10}" + "".join(f"{f'{s:,} lines':>26}" for s in sizes) + f"{'ratio':>8}")
    print(f"{'':<10}" + "".join(f"{'s/M lines   peak GiB':>26}" for _ in sizes))
    for phase in (*PHASES, None):
        cells = []
        for size in sizes:
            peak = max(results[size][p]["peak_rss"] for p in ((phase,) if phase else PHASES))
            cells.append(f"{per_million(size, phase):10.2f}   {peak / 1024**3:8.2f}")
        ratio = per_million(large, phase) / per_million(small, phase)
        print(f"{phase or 'total':<10}" + "".join(f"{c:>26}" for c in cells) + f"{ratio:7.2f}x")
    for phase in ("download", "parse"):
        for size in sizes:
            steps = results[size][phase]["steps"]
            print(f"  {phase} at {size:,}: "
                  + ", ".join(f"{k} {v / (data[size]['lines'] / 1e6):.2f} s/M" for k, v in steps.items()))
    for size in sizes:
        cpu = results[size]["parse"].get("children_cpu", 0.0)
        if cpu:
            print(f"  parse at {size:,}: worker processes' CPU {cpu / (data[size]['lines'] / 1e6):.2f} s/M "
                  "(pipeline.parsing.parse_workers; the peak above includes the largest worker's)")
    for size in sizes:
        print(f"  {size:,}: {data[size]}; rows parsed {results[size]['parse']['rows']:,}, per-item rows "
              f"{results[size]['score']['per_item_rows']:,}; download over loopback HTTP from the emulator "
              "(FireworksClient.download_dataset)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
