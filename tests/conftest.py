"""Shared fixtures: a small experiment config in a temp dir, and Luigi's task registry kept clean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from pipeline.emulator.process import ensure_emulator, stop_emulator
from pipeline.emulator.server import EmulatorServer, make_server

REPO = Path(__file__).resolve().parent.parent
PIPELINE_RUN = (sys.executable, "-m", "pipeline", "run")  # the runner; the task name and Luigi's options follow


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


def tiny_data(directory: Path, n: int = 6) -> Path:
    """A prepared-data directory with `n` open-book (every third unanswerable) and `n` closed-book items."""
    directory.mkdir(parents=True)
    open_rows = [{"dataset": "squad_v2", "id": f"o{i}", "context": f"Lake Miro{i} is fed by the river Tess{i}.",
                  "question": f"Which river feeds Lake Miro{i}?", "answers": [f"Tess{i}"] if i % 3 else [],
                  "is_unanswerable": not i % 3} for i in range(n)]
    closed_rows = [{"dataset": "triviaqa" if i % 2 else "nq_open", "id": f"c{i}", "question": f"Capital number {i}?",
                    "answers": [f"City{i}"]} for i in range(n)]
    (directory / "open_book.jsonl").write_text("".join(json.dumps(r) + "\n" for r in open_rows))
    (directory / "closed_book.jsonl").write_text("".join(json.dumps(r) + "\n" for r in closed_rows))
    return directory


def emulator_calls(run_dir: Path) -> dict:
    """What the run's emulator counted, from its state on disk (the emulator a run starts ends with the run)."""
    return json.loads((run_dir / ".emulator" / "calls.json").read_text())


def emulator_job(run_dir: Path, job_id: str) -> dict:
    """A job as the run's emulator stored it."""
    return json.loads((run_dir / ".emulator" / "accounts" / "emulator" / "jobs" / f"{job_id}.json").read_text())


def small_experiment(base: Path, *, lines_per_part: int = 6, **provider: object) -> Path:
    """A copy of the default config over `tiny_data` (one sample per item, fast statistics); returns its path.

    With the default 6 lines per part, each condition at each temperature is two parts (closed, open)."""
    config = base / "config"
    shutil.copytree(REPO / "config", config)
    raw = yaml.safe_load((config / "experiment.yaml").read_text())
    raw["paths"]["prepared_dir"] = str(tiny_data(base / "data"))
    raw["provider"].update({"latency_s": 0.0, **provider})
    raw["batching"]["lines_per_part"] = lines_per_part
    raw["samples_per_item"] = {"0.0": 1, "0.7": 1}
    raw["stats"].update(bootstrap_samples=200, permutation_samples=200)
    (config / "experiment.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return config / "experiment.yaml"


class Clock:
    """A settable wall clock in ns, so job progression is tested without waiting."""

    def __init__(self) -> None:
        self.ns = 1_800_000_000 * 10**9

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


def start_emulator(state_dir: Path, **kwargs: object) -> EmulatorServer:
    """An in-process emulator on a free loopback port; a short poll interval keeps shutdown() quick."""
    server = make_server("127.0.0.1", 0, state_dir, **kwargs)  # type: ignore[arg-type]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


def stop_emulator_server(server: EmulatorServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def emu(tmp_path: Path) -> Iterator[EmulatorServer]:
    """An in-process emulator without latency, for tests of the emulator and the client."""
    server = start_emulator(tmp_path / "state", latency_s=0.0)
    yield server
    stop_emulator_server(server)


@contextmanager
def run_emulator(root: Path, rid: str) -> Iterator[str]:
    """The emulator of run `rid` under `root`, started before the run (so a fault plan is in place before any job
    exists) and stopped after; its base URL."""
    state = root / f"run_{rid}" / ".emulator"
    state.mkdir(parents=True)
    base_url = ensure_emulator(state, answer_key=state.parent / "prepared", latency_s=0.0)
    try:
        yield base_url
    finally:
        stop_emulator(state)


@pytest.fixture
def emulator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The emulator of run `RID` (the test module's) under `tmp_path / "exp"`, started before the run; its URL. A
    module with an `emulator` fixture of its own uses that one."""
    with run_emulator(tmp_path / "exp", request.module.RID) as base_url:
        yield base_url


class Provider:
    """An in-process emulator for one run on a settable clock (jobs stay running until the test advances it),
    registered where the pipeline looks for it (`run_<rid>/.emulator/server.json`)."""

    def __init__(self, run_dir: Path) -> None:
        self.clock = Clock()
        state = run_dir / ".emulator"
        state.mkdir(parents=True)
        self.server = start_emulator(state, latency_s=60.0, clock=self.clock)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        (state / "server.json").write_text(json.dumps({"base_url": self.base_url, "pid": os.getpid()}))

    def job_creates(self) -> dict[str, int]:
        import requests

        return requests.get(self.base_url + "/emulator/calls", timeout=5).json()["job_creates"]


def run_luigi(root: Path, config: Path | None, rid: str, *extra: str, task: str = "TrialReport",
              timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m pipeline run <task> --rid RID --root ROOT [--config CONFIG] --local-scheduler ...` in a subprocess
    (with the project's luigi.cfg, whatever LUIGI_CONFIG_PATH the caller has)."""
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    cmd = [*PIPELINE_RUN, task, "--rid", rid, "--root", str(root),
           *(["--config", str(config)] if config else []), "--local-scheduler", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def finished_run(root: Path, config: Path, rid: str) -> Path:
    """Run the pipeline to the end; the run directory."""
    done = run_luigi(root, config, rid)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / f"run_{rid}"
