"""Shared fixtures: a small experiment config in a temp dir, and Luigi's task registry kept clean."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A copy of config/ (prompts, instructions, experiment.yaml) whose data path points at the shipped sample."""
    target = tmp_path / "config"
    shutil.copytree(REPO / "config", target)
    raw = yaml.safe_load((target / "experiment.yaml").read_text())
    raw["paths"]["prepared_dir"] = str(REPO / "data" / "sample")
    (target / "experiment.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return target


def write_config(config_dir: Path, name: str = "experiment.yaml", **changes: object) -> Path:
    """A variant of the fixture config with top-level keys replaced."""
    raw = yaml.safe_load((config_dir / "experiment.yaml").read_text())
    raw.update(changes)
    path = config_dir / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
