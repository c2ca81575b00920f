"""ScorePredictions, ComputeStats and SummarizeCosts: thin shells around the pure scoring, stats and cost code."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pipeline.tasks.base import artifact_current, artifact_record, inputs_changed
from pipeline.tasks.parse import ParsePredictions, TrialTask
from pipeline.tasks.prepare import PrepareData
from targets.atomic import dumps_json, write_text

log = logging.getLogger("pipeline")


def settings_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_predictions(path):  # noqa: ANN001, ANN201 - pandas is imported lazily to keep no-op resumes fast
    import pandas as pd

    text_cols = ["custom_id", "dataset", "item_id", "condition", "type", "request_id", "finish_reason",
                 "response_text", "error"]
    frame = pd.read_csv(path, dtype={c: str for c in text_cols}, keep_default_na=False)
    frame["temp"] = frame["temp"].astype(float)
    for col in ("prompt_tokens", "completion_tokens", "total_tokens", "sample_index"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").fillna(0).astype(int)
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
        return {"predictions": self.input_sha("parsed"), "settings": settings_hash(self.settings())}

    def done(self) -> tuple[bool, str]:
        return self.stage_done("scored", self.current_inputs())

    def run(self) -> None:
        from pipeline.scoring.abstention import DEFAULT_MARKERS
        from pipeline.scoring.score import per_item_scores, score_predictions, score_summary

        cfg = self.run_ctx.cfg
        inputs = self.current_inputs()
        scored = score_predictions(
            read_predictions(self.layout.predictions(self.trial)), prepared_items(self),
            markers=tuple(cfg.scoring.abstain_markers or DEFAULT_MARKERS),
            unsupported_strategy=cfg.unsupported.strategy, unsupported_threshold=cfg.unsupported.threshold,
            min_token_overlap=cfg.unsupported.min_token_overlap)
        table = per_item_scores(scored)
        path = self.layout.per_item_scores(self.trial)
        write_text(path, table.to_csv(index=False, lineterminator="\n"))
        summary = score_summary(scored)
        self.record_stage("scored", {"per_item_scores_csv": self.layout.rel(path), "row_count": len(table),
                                     "file": artifact_record(self.layout, path, rows=len(table)),
                                     "inputs": inputs, "summary": json.loads(json.dumps(summary, default=str))})
        log.info("done scored trial=%s (%d per-item rows from %d predictions)", self.trial, len(table), len(scored))


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
    """Done when costs.json was priced from the current predictions with the current pricing table."""

    stage = "costs"

    def requires(self) -> ParsePredictions:
        return ParsePredictions(trial=self.trial, **self.common())

    def pricing_args(self) -> dict[str, Any]:
        cfg = self.run_ctx.cfg
        trial = self.run_ctx.trial(self.trial)
        provider = "fireworks" if cfg.provider.name == "emulator" else cfg.provider.name
        return {"pricing": cfg.pricing.model_dump(), "provider": provider,
                "model": cfg.provider.pricing_key or trial.model_id, "use_batch_api": cfg.use_batch_api}

    def current_inputs(self) -> dict[str, Any]:
        return {"predictions": self.input_sha("parsed"), "pricing": settings_hash(self.pricing_args())}

    def done(self) -> tuple[bool, str]:
        return self.stage_done("costs", self.current_inputs())

    def run(self) -> None:
        from pipeline.costs import summarize_costs

        inputs = self.current_inputs()
        args = self.pricing_args()
        usage = read_predictions(self.layout.predictions(self.trial))[
            ["condition", "temp", "prompt_tokens", "completion_tokens", "total_tokens"]]
        result = summarize_costs(usage, **args)
        path = self.layout.costs(self.trial)
        write_text(path, dumps_json(result))
        self.record_stage("costs", {"costs_json": self.layout.rel(path), "provider": args["provider"],
                                    "pricing_key": args["model"], "usd": result["usd"],
                                    "file": artifact_record(self.layout, path), "inputs": inputs})
        log.info("done costs trial=%s ($%.4f)", self.trial, result["usd"])


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
        return {"per_item": self.input_sha("scored"), "costs": self.input_sha("costs"),
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
        import pandas as pd

        from pipeline.scoring.abstention import DEFAULT_MARKERS
        from pipeline.scoring.score import score_predictions
        from pipeline.stats.optional.analyses import OUTPUT_FILES, optional_analyses

        run = self.run_ctx
        inputs = self.current_inputs()
        settings = self.settings()
        per_item = pd.read_csv(self.layout.per_item_scores(self.trial), dtype={"item_key": str, "condition": str, "type": str})
        predictions = read_predictions(self.layout.predictions(self.trial))
        items = prepared_items(self)
        scored = score_predictions(predictions, items, markers=tuple(run.cfg.scoring.abstain_markers or DEFAULT_MARKERS),
                                   unsupported_strategy=run.cfg.unsupported.strategy,
                                   unsupported_threshold=run.cfg.unsupported.threshold,
                                   min_token_overlap=run.cfg.unsupported.min_token_overlap)
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
