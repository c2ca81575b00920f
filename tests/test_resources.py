"""`[resources]`: every part task takes one unit of its provider's resource, and luigi.cfg caps each provider."""

from __future__ import annotations

import configparser
from pathlib import Path

import yaml

from pipeline.tasks.download import DownloadPart
from pipeline.tasks.remote import PollJob, SubmitPart, UploadPart
from tests.conftest import REPO, small_experiment


def test_part_tasks_take_one_unit_of_their_providers_resource(tmp_path: Path) -> None:
    config = small_experiment(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["provider"]["name"] = "fireworks"
    real = config.with_name("real.yaml")
    real.write_text(yaml.safe_dump(raw))
    for task_class in (UploadPart, SubmitPart, PollJob, DownloadPart):
        common = {"trial": "t", "jkey": "t0_control_p01", "root": str(tmp_path / "exp")}
        assert task_class(rid="emu", config=str(config), **common).process_resources() == {"emulator_api": 1}
        assert task_class(rid="real", config=str(real), **common).process_resources() == {"fireworks_api": 1}


def test_luigi_cfg_caps_every_provider() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "config" / "luigi.cfg")
    caps = {name: cfg.getint("resources", name) for name in cfg["resources"]}
    assert set(caps) >= {"emulator_api", "fireworks_api"} and all(n >= 1 for n in caps.values())
