"""Scale: the columnar hand-off scores exactly as predictions.csv does, and per-part / per-trial paths are linear."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.naming import make_custom_id
from pipeline.parsing import (
    PredictionColumns,
    check_part_results,
    load_prediction_columns,
    merge_results,
    write_predictions,
)
from pipeline.scoring.score import (
    ScoredColumns,
    per_item_csv,
    per_item_scores,
    score_predictions,
    score_summary,
    scored_row_arrays,
)
from pipeline.tasks.analyze import read_predictions_for_scoring

ANSWERS = ("Paris", "the Paris", "paris.", "London", "unknown", "I don't know.", "", "  ", "a, \"quoted\" answer",
           "two\nlines", "Lyon is big", "Nice")


def _items() -> pd.DataFrame:
    rows = []
    for i in range(6):
        rows.append({"dataset": "squad_v2", "id": f"o{i}", "type": "open", "question": "q?",
                     "answers": [] if i % 3 == 0 else ["Paris", "Lyon"], "context": "Paris and Lyon, in France.",
                     "is_unanswerable": i % 3 == 0})
        rows.append({"dataset": "triviaqa", "id": f"c{i}", "type": "closed", "question": "q?",
                     "answers": ["Paris", "City of Light"], "context": None, "is_unanswerable": False})
    return pd.DataFrame(rows)


def _lines(seed: int, items: pd.DataFrame, k: int = 3) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for item in items.itertuples():
        for temp in (0.0, 0.7):
            for condition in ("control", "treatment"):
                for sample in range(k):
                    cid = make_custom_id(item.dataset, item.id, condition, temp, sample, item.type)
                    roll = rnd.random()
                    if roll < 0.08:
                        out.append(json.dumps({"custom_id": cid, "error": {"code": 500, "message": "boom"}}))
                        continue
                    if roll < 0.12:
                        out.append(json.dumps({"custom_id": cid, "error": {"message": "  "}}))  # blank: not an error
                        continue
                    finish = " length" if roll < 0.2 else "stop"
                    out.append(json.dumps({"custom_id": cid, "response": {"id": "r", "choices": [
                        {"message": {"content": rnd.choice(ANSWERS)}, "finish_reason": finish}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1}}}))
    rnd.shuffle(out)
    return out


def test_columnar_scores_equal_csv_scores(tmp_path: Path) -> None:
    items = _items()
    source = tmp_path / "results.jsonl"
    source.write_text("\n".join(_lines(3, items)) + "\n", encoding="utf-8")
    plain = io.StringIO()
    write_predictions([source], plain)
    columns = PredictionColumns()
    with open(tmp_path / "predictions.csv", "w", encoding="utf-8", newline="") as out:
        write_predictions([source], out, columns=columns)
    assert (tmp_path / "predictions.csv").read_text(encoding="utf-8") == plain.getvalue()  # the CSV is unchanged
    with open(tmp_path / "predictions.npz", "wb") as fh:
        columns.save(fh)

    scored = score_predictions(read_predictions_for_scoring(tmp_path / "predictions.csv"), items)
    fast = ScoredColumns(load_prediction_columns(tmp_path / "predictions.npz"), items)
    assert per_item_csv(fast.per_item_scores()) == per_item_csv(per_item_scores(scored))
    assert json.dumps(fast.summary()) == json.dumps(score_summary(scored))
    expected = scored_row_arrays(scored)
    for name, values in fast.row_arrays().items():
        np.testing.assert_array_equal(values, expected[name])
    assert set(fast.row_arrays()["status"].tolist()) == {0, 1, 2}


def test_load_prediction_columns_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, cell=np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="not a predictions columns file"):
        load_prediction_columns(bad)
    columns = PredictionColumns()
    arrays = columns.arrays()
    arrays["cell"] = np.array([5], dtype=np.int32)  # a code with no cell
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match="inconsistent"):
        load_prediction_columns(bad)


def _part(tmp_path: Path, n: int) -> tuple[list[Path], list[str]]:
    expected = [make_custom_id("ds", f"i{i}", "control", 0.0, 0, "closed") for i in range(n)]
    lines = [json.dumps({"custom_id": c, "response": {"choices": [{"message": {"content": "x"}}]}}) for c in expected]
    random.Random(n).shuffle(lines)
    path = tmp_path / f"part_{n}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [path], expected


def _best_of(runs: int, fn) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _decode_all(path: Path, keep: bool) -> list:
    """The reference cost: decode every line. With the cyclic GC paused, as the paths under test run: with it on,
    keeping the lines costs superlinear time (24x from 16,000 to 128,000 lines, measured), which made a linear path
    look worse than its reference from one run to the next."""
    import orjson

    from pipeline.gcpause import gc_paused

    kept = []
    with open(path, "rb") as fh, gc_paused():
        for raw in fh:
            obj = orjson.loads(raw)
            if keep:
                kept.append(obj)
    return kept


@pytest.mark.slow
def test_part_and_trial_paths_scale_linearly(tmp_path: Path) -> None:
    """merge_results, check_part_results and write_predictions at n and 8n lines, each timed relative to decoding
    the same lines (kept, when the function keeps them): a linear path keeps that ratio (memory and cache effects
    are in both), a quadratic one multiplies it by 8. Best of three CPU times, as the machine is shared."""
    small, large = 16_000, 128_000
    ratios = {}
    for n in (small, large):
        sources, expected = _part(tmp_path, n)
        decode_kept = _best_of(3, lambda s=sources: _decode_all(s[0], keep=True))
        decode = _best_of(3, lambda s=sources: _decode_all(s[0], keep=False))
        ratios[n] = (
            _best_of(3, lambda s=sources, e=expected: merge_results(s, e)) / decode_kept,
            _best_of(3, lambda s=sources, e=expected: check_part_results(s[0], e)) / decode,
            _best_of(3, lambda s=sources: write_predictions(s, io.StringIO(), columns=PredictionColumns())) / decode,
        )
    for name, a, b in zip(("merge_results", "check_part_results", "write_predictions"), ratios[small], ratios[large],
                          strict=True):
        assert b <= 2.5 * a, f"{name}: {b:.2f}x the decode time at {large} lines, {a:.2f}x at {small}"


@pytest.mark.slow
def test_score_task_reads_the_recorded_columns_else_the_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import luigi

    from pipeline import ScorePredictions, TrialReport
    from pipeline.scoring import score as score_module
    from tests.conftest import small_experiment

    common = {"rid": "cols", "root": str(tmp_path / "exp"), "config": str(small_experiment(tmp_path))}
    assert luigi.build([TrialReport(**common)], local_scheduler=True, log_level="WARNING")
    results = next((tmp_path / "exp" / "run_cols").glob("*/results/trial_manifest.json")).parent
    trial = results.parent.name
    parsed = json.loads((results / "trial_manifest.json").read_text())["stage_status"]["parsed"]["artifacts"]
    assert parsed["columns"]["path"].endswith("predictions.npz") and parsed["columns"]["rows"] == parsed["row_count"]
    per_item = (results / "per_item_scores.csv").read_bytes()

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("this path must not run")

    monkeypatch.setattr(score_module, "score_predictions", refuse)  # the recorded columns are read, not the CSV
    (results / "per_item_scores.csv").unlink()
    ScorePredictions(trial=trial, **common).run()
    assert (results / "per_item_scores.csv").read_bytes() == per_item
    monkeypatch.undo()

    monkeypatch.setattr(score_module, "ScoredColumns", refuse)  # columns changed since parsing: the CSV is read
    (results / "predictions.npz").write_bytes(b"not the recorded file")
    (results / "per_item_scores.csv").unlink()
    ScorePredictions(trial=trial, **common).run()
    assert (results / "per_item_scores.csv").read_bytes() == per_item
