"""Paired LLM evaluations through batch inference APIs, as a crash-safe Luigi task graph.

`luigi --module pipeline TrialReport --rid X --local-scheduler` runs or resumes a run. Importing this
package registers the tasks and, unless `LUIGI_CONFIG_PATH` is set, makes Luigi read `config/luigi.cfg`
so that its retcodes and worker settings apply without exporting anything.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import luigi.configuration

_LUIGI_CFG = Path(__file__).resolve().parent.parent / "config" / "luigi.cfg"
if not os.environ.get("LUIGI_CONFIG_PATH") and _LUIGI_CFG.is_file():
    luigi.configuration.add_config_path(str(_LUIGI_CFG))


def _setup_logging() -> None:
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s pipeline: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_setup_logging()

from pipeline.tasks.analyze import ComputeStats, OptionalAnalyses, ScorePredictions, SummarizeCosts  # noqa: E402
from pipeline.tasks.archive import ArchiveRun  # noqa: E402
from pipeline.tasks.build import BuildBatches  # noqa: E402
from pipeline.tasks.download import DownloadPart  # noqa: E402
from pipeline.tasks.parse import ParsePredictions  # noqa: E402
from pipeline.tasks.prepare import PrepareData  # noqa: E402
from pipeline.tasks.remote import PollJob, SubmitPart, UploadPart  # noqa: E402
from pipeline.tasks.report import TrialReport  # noqa: E402

__all__ = [
    "ArchiveRun", "BuildBatches", "ComputeStats", "DownloadPart", "OptionalAnalyses", "ParsePredictions", "PollJob",
    "PrepareData", "ScorePredictions", "SubmitPart", "SummarizeCosts", "TrialReport", "UploadPart",
]
