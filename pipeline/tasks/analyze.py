"""ScorePredictions, ComputeStats and SummarizeCosts: thin shells around the pure scoring, stats and cost code."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pipeline.pricing import pricing_args
from pipeline.progress import Progress
from pipeline.tasks.base import artifact_current, artifact_record, inputs_changed, unchanged_after_upstream
from pipeline.tasks.parse import ParsePredictions, TrialTask
from pipeline.tasks.prepare import PrepareData, prepared_checksums
from targets.atomic import atomic_open, dumps_json, write_text

log = logging.getLogger("pipeline")
# Per-prediction scores, aligned with predictions.csv rows: written by ScorePredictions, read by OptionalAnalyses


def settings_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_predictions(path):  # noqa: ANN001, ANN201 - pandas is imported lazily to keep no-op resumes fast
    """predictions.csv typed (token counts and sample_index as ints, blank → 0); a file written before the cache
    counts were kept gets `cache_read_tokens` / `cache_write_tokens` of 0, so it prices as it did."""
    import pandas as pd

    text_cols = ["custom_id", "dataset", "item_id", "condition", "type", "request_id", "finish_reason",
                 "response_text", "error"]
    frame = pd.read_csv(path, dtype={c: str for c in text_cols}, keep_default_na=False)
    frame["temp"] = frame["temp"].astype(float)
    for col in ("cache_read_tokens", "cache_write_tokens"):
        if col not in frame.columns:  # written before the cache counts were kept: no cache reported
            frame[col] = 0
    for col in ("prompt_tokens", "completion_tokens", "total_tokens", "sample_index", "cache_read_tokens",
                "cache_write_tokens"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").fillna(0).astype(int)
    return frame


def read_predictions_for_scoring(path):  # noqa: ANN001, ANN201 - pandas is imported lazily
    """The predictions.csv columns scoring reads (`SCORING_INPUT_COLUMNS` present in the file), typed as
    `read_predictions` types them; each distinct temp / sample_index text is converted once."""
    import pandas as pd

    from pipeline.scoring.score import SCORING_INPUT_COLUMNS

    frame = pd.read_csv(path, usecols=lambda c: c in SCORING_INPUT_COLUMNS, dtype=str, na_filter=False)
    for col, convert in (("temp", lambda u: u.astype(float)),
                         ("sample_index", lambda u: pd.to_numeric(u, errors="coerce").fillna(0).astype(int))):
        if col in frame.columns:
            codes, uniques = pd.factorize(frame[col].to_numpy())
            frame[col] = convert(pd.Series(uniques, dtype=object)).to_numpy()[codes]
    return frame


def prepared_items(task: TrialTask):  # noqa: ANN201
    import pandas as pd

    from pipeline.tasks.prepare import load_prepared_rows

    rows = []
    for kind, type_ in (("open_book", "open"), ("closed_book", "closed")):
        for row in load_prepared_rows(task, kind):
            rows.append({"dataset": row["dataset"], "id": row["id"], "type": type_, "question": row["question"],
                         "answers": list(row["answers"]), "context": row.get("context"),
                         "is_unanswerable": bool(row.get("is_unanswerable", False))})
    return pd.DataFrame(rows, columns=["dataset", "id", "type", "question", "answers", "context", "is_unanswerable"])


class ScorePredictions(TrialTask):
    """Done when per_item_scores.csv was built from the current predictions and scoring settings."""

    stage = "scored"

    def requires(self) -> list:
        return [ParsePredictions(trial=self.trial, **self.common()), PrepareData(**self.common())]

    def settings(self) -> dict[str, Any]:
        cfg = self.run_ctx.cfg
        return {"unsupported": cfg.unsupported.model_dump(), "markers": cfg.scoring.abstain_markers}

    def current_inputs(self) -> dict[str, Any]:
        return {"predictions": self.input_sha("parsed"), "prepared": prepared_checksums(self),
                "settings": settings_hash(self.settings())}

    def done(self) -> tuple[bool, str]:
        return self.stage_done("scored", self.current_inputs())

    def run(self) -> None:
        if unchanged_after_upstream(self):  # predictions parsed again, byte for byte the same
            return
        import numpy as np

        from pipeline.scoring.abstention import DEFAULT_MARKERS
        from pipeline.scoring.score import (
            ScoredColumns,
            per_item_csv_blocks,
            per_item_scores,
            score_predictions,
            score_summary,
            scored_row_arrays,
        )

        cfg = self.run_ctx.cfg
        inputs = self.current_inputs()
        settings = {"markers": tuple(cfg.scoring.abstain_markers or DEFAULT_MARKERS),
                    "unsupported_strategy": cfg.unsupported.strategy,
                    "unsupported_threshold": cfg.unsupported.threshold,
                    "min_token_overlap": cfg.unsupported.min_token_overlap}
        progress = Progress(self, f"score {self.trial}", 4, unit="steps")
        progress.update(0, "reading predictions")
        columns = self._prediction_columns(inputs["predictions"])
        if columns is not None:
            progress.update(1, f"scoring {len(columns):,} predictions")
            scored = ScoredColumns(columns, prepared_items(self), **settings)
            del columns
            progress.update(2, "aggregating per item")
            table = scored.per_item_scores()
            row_arrays, n_scored, summary = scored.row_arrays(), scored.n_rows, scored.summary()
        else:
            predictions = read_predictions_for_scoring(self.layout.predictions(self.trial))
            progress.update(1, f"scoring {len(predictions):,} predictions")
            scored = score_predictions(predictions, prepared_items(self), **settings)
            del predictions
            progress.update(2, "aggregating per item")
            table = per_item_scores(scored)
            row_arrays, n_scored, summary = scored_row_arrays(scored), len(scored), score_summary(scored)
        progress.update(3, f"writing {len(table):,} per-item rows")
        path = self.layout.per_item_scores(self.trial)
        with atomic_open(path, "w", newline="") as fh:
            fh.writelines(per_item_csv_blocks(table))
        rows_path = self.layout.scored_rows(self.trial)
        with atomic_open(rows_path, "wb") as fh:
            np.savez(fh, **row_arrays)
        del row_arrays
        self.record_stage("scored", {"per_item_scores_csv": self.layout.rel(path), "row_count": len(table),
                                     "file": artifact_record(self.layout, path, rows=len(table)),
                                     "scored_rows": artifact_record(self.layout, rows_path, rows=n_scored),
                                     "inputs": inputs, "summary": json.loads(json.dumps(summary, default=str))})
        progress.update(4, "done")
        log.info("done scored trial=%s (%d per-item rows from %d predictions)", self.trial, len(table), n_scored)

    def _prediction_columns(self, predictions_sha: str | None):  # noqa: ANN202 - LoadedColumns, imported lazily
        """The columnar predictions ParsePredictions recorded with the current predictions.csv, when that file is
        unchanged and holds as many rows; else None (then the CSV is read)."""
        from pipeline.parsing import load_prediction_columns

        manifest = self.manifest(self.trial)
        parsed = manifest.stage("parsed").artifacts if manifest else {}
        record = parsed.get("columns")
        ok, why = artifact_current(self.layout, record)
        if ok and predictions_sha is not None and parsed.get("file", {}).get("sha256") == predictions_sha:
            try:
                columns = load_prediction_columns(self.layout.run_dir / record["path"])
            except (OSError, ValueError) as exc:
                why = str(exc)
            else:
                if len(columns) == parsed.get("row_count"):
                    return columns
                why = f"{len(columns)} columnar rows for {parsed.get('row_count')} predictions"
        log.info("score trial=%s: reading predictions.csv (%s)", self.trial, why)
        return None


class ComputeStats(TrialTask):
    """Done when significance.json (schema 2) was computed from the current scores and stats settings."""

    stage = "stats"

    def requires(self) -> ScorePredictions:
        return ScorePredictions(trial=self.trial, **self.common())

    def current_inputs(self) -> dict[str, Any]:
        return {"per_item": self.input_sha("scored"), "settings": settings_hash(self.run_ctx.cfg.stats.model_dump())}

    def done(self) -> tuple[bool, str]:
        ok, why = self.stage_done("stats", self.current_inputs())
        manifest = self.manifest(self.trial)
        if ok and manifest and manifest.stage("stats").artifacts.get("schema_version", 0) < 2:
            return False, "significance.json lacks schema_version >= 2"
        return ok, why

    def run(self) -> None:
        if unchanged_after_upstream(self):
            return
        import pandas as pd

        from pipeline.stats.significance import compute_significance

        run = self.run_ctx
        inputs = self.current_inputs()
        per_item = pd.read_csv(self.layout.per_item_scores(self.trial), dtype={"item_key": str, "condition": str,
                                                                               "type": str})
        result = compute_significance(per_item, temps=list(run.trial(self.trial).temps),
                                      stats_cfg=run.cfg.stats.model_dump())
        path = self.layout.significance(self.trial)
        write_text(path, dumps_json(result))
        self.record_stage("stats", {"significance_json": self.layout.rel(path), "schema_version": result["schema_version"],
                                    "file": artifact_record(self.layout, path), "inputs": inputs})
        log.info("done stats trial=%s", self.trial)


class SummarizeCosts(TrialTask):
    """Done when costs.json was priced from the current predictions with the current pricing table and part ownership.

    costs.json prices what the trial's predictions consumed, and part by part who pays (`pipeline.costs.trial_costs`):
    a part shared with another trial is paid by its owner, so the run's spend sums `owned_usd` over the trials.
    """

    stage = "costs"

    def requires(self) -> ParsePredictions:
        return ParsePredictions(trial=self.trial, **self.common())

    def pricing_args(self) -> dict[str, Any]:
        cfg = self.run_ctx.cfg
        return {**pricing_args(cfg, self.run_ctx.trial(self.trial).model_id), "served_by": cfg.provider.served_by}

    def ownership(self) -> str | None:
        """Fingerprint of which parts the trial reads (their request bytes) and who owns each; None before the batch
        inputs are built (then nothing was priced either). Ownership decides owned_usd, so a change re-prices."""
        try:
            refs = self.refs()
        except (FileNotFoundError, KeyError):  # no build manifest yet / some builds missing
            return None
        return settings_hash({f"{ref.owner}/{ref.jkey}": ref.request_sha256 for ref in refs})

    def current_inputs(self) -> dict[str, Any]:
        return {"predictions": self.input_sha("parsed"), "pricing": settings_hash(self.pricing_args()),
                "parts": self.ownership()}

    def done(self) -> tuple[bool, str]:
        return self.stage_done("costs", self.current_inputs())

    def run(self) -> None:
        if unchanged_after_upstream(self):
            return
        from pipeline.costs import trial_costs
        from pipeline.parsing import input_custom_ids

        inputs = self.current_inputs()
        args = self.pricing_args()
        usage = read_predictions(self.layout.predictions(self.trial))[
            ["custom_id", "condition", "temp", "prompt_tokens", "completion_tokens", "total_tokens",
             "cache_read_tokens", "cache_write_tokens"]]
        # Rows are matched to parts by the custom_ids of each part's request file: predictions.csv does not say
        # which part a row came from.
        parts = {f"{ref.owner}/{ref.jkey}": {"owner": ref.owner, "custom_ids": input_custom_ids(ref.path)}
                 for ref in self.refs()}
        result = trial_costs(usage, trial=self.trial, parts=parts, **args)
        path = self.layout.costs(self.trial)
        write_text(path, dumps_json(result))
        self.record_stage("costs", {"costs_json": self.layout.rel(path), "provider": args["served_by"],
                                    "pricing_key": args["model"], "usd": result["usd"],
                                    "owned_usd": result["owned_usd"], "shared_usd": result["shared_usd"],
                                    "file": artifact_record(self.layout, path), "inputs": inputs})
        log.info("done costs trial=%s ($%.4f consumed, $%.4f owned)", self.trial, result["usd"], result["owned_usd"])


class OptionalAnalyses(TrialTask):
    """Done when the enabled optional analyses (power, cost-effectiveness, unsupported sensitivity, mixed model) were
    computed from the current scores and costs; each is a JSON file next to significance.json."""

    stage = "optional"

    def requires(self) -> list:
        return [ScorePredictions(trial=self.trial, **self.common()), SummarizeCosts(trial=self.trial, **self.common())]

    def settings(self) -> dict[str, Any]:
        cfg = self.run_ctx.cfg
        return {**cfg.optional.model_dump(), "seed": cfg.stats.random_seed, "bootstrap_samples": cfg.stats.bootstrap_samples,
                "unsupported_threshold": cfg.unsupported.threshold}

    def current_inputs(self) -> dict[str, Any]:
        return {"per_item": self.input_sha("scored"), "scored_rows": self.input_sha("scored", "scored_rows"),
                "costs": self.input_sha("costs"),
                "predictions": self.input_sha("parsed"), "prepared": prepared_checksums(self),
                "settings": settings_hash(self.settings())}

    def done(self) -> tuple[bool, str]:
        manifest = self.manifest(self.trial)
        if manifest is None:
            return False, "no trial manifest yet"
        record = manifest.stage("optional")
        if record.status != "completed":
            return False, f"optional analyses are {record.status}"
        for entry in record.artifacts.get("files", []):
            ok, why = artifact_current(self.layout, entry)
            if not ok:
                return False, why
        changed = inputs_changed(record.artifacts.get("inputs"), self.current_inputs())
        return (False, changed) if changed else (True, f"{len(record.artifacts.get('files', []))} files, inputs unchanged")

    def run(self) -> None:
        if unchanged_after_upstream(self):
            return
        import pandas as pd

        from pipeline.stats.optional.analyses import OUTPUT_FILES, optional_analyses

        run = self.run_ctx
        inputs = self.current_inputs()
        settings = self.settings()
        per_item = pd.read_csv(self.layout.per_item_scores(self.trial), dtype={"item_key": str, "condition": str, "type": str})
        predictions = read_predictions_for_scoring(self.layout.predictions(self.trial))
        items = prepared_items(self)
        scored = self._scored_rows(predictions, items)
        scored = scored.assign(response_text=predictions["response_text"].to_numpy())
        costs = json.loads(self.layout.costs(self.trial).read_text(encoding="utf-8"))
        documents = optional_analyses(per_item, scored, items, costs, temps=list(run.trial(self.trial).temps),
                                      cfg=settings)
        files = []
        for name, document in sorted(documents.items()):
            path = self.layout.results_dir(self.trial) / OUTPUT_FILES[name]
            write_text(path, dumps_json(document))
            files.append(artifact_record(self.layout, path))
        self.record_stage("optional", {"files": files, "inputs": inputs})
        log.info("done optional trial=%s (%s)", self.trial, ", ".join(sorted(documents)) or "none enabled")

    def _scored_rows(self, predictions, items):  # noqa: ANN001, ANN202 - pandas frames, imported lazily
        """ScorePredictions' per-prediction scores when its scored_rows file is the one it recorded; else score again."""
        import numpy as np

        from pipeline.scoring.abstention import DEFAULT_MARKERS
        from pipeline.scoring.score import score_predictions, scored_from_arrays

        manifest = self.manifest(self.trial)
        record = manifest.stage("scored").artifacts.get("scored_rows") if manifest else None
        ok, why = artifact_current(self.layout, record)
        if ok:
            with np.load(self.layout.run_dir / record["path"], allow_pickle=False) as arrays:
                try:
                    return scored_from_arrays(predictions, {name: arrays[name] for name in arrays.files})
                except (KeyError, ValueError) as exc:
                    why = str(exc)
        log.info("optional trial=%s: scoring the predictions again (%s)", self.trial, why)
        cfg = self.run_ctx.cfg
        return score_predictions(predictions, items, markers=tuple(cfg.scoring.abstain_markers or DEFAULT_MARKERS),
                                 unsupported_strategy=cfg.unsupported.strategy,
                                 unsupported_threshold=cfg.unsupported.threshold,
                                 min_token_overlap=cfg.unsupported.min_token_overlap)
