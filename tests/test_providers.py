"""Every provider API, offline: the same experiment through the emulator speaking the Fireworks, OpenAI, Anthropic and
local (OpenAI-compatible, synchronous) APIs. The emulator answers with the same simulated model whatever API it
speaks, so every API must give the same scores byte for byte; each part is created (or each request answered) once,
and a no-op re-run sends nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import emulator_calls, finished_run, run_luigi, small_experiment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
APIS = ("fireworks", "openai", "anthropic", "local")
RID = "apis"
SENDING = ("job_creates", "dataset_creates", "file_uploads", "completions")
"""Emulator counters of calls that send or create something (missing ones count as empty)."""


def provider_experiment(base: Path, api: str) -> Path:
    """The small experiment on the emulator speaking `api`, with parameters every API accepts."""
    config = small_experiment(base, api=api)
    raw = yaml.safe_load(config.read_text())
    raw.update(top_k=None, top_p=None)
    raw["pricing"]["allow_unlisted_models"] = True
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def sending_calls(run_dir: Path) -> dict[str, dict[str, int]]:
    calls = emulator_calls(run_dir)
    return {kind: dict(calls.get(kind) or {}) for kind in SENDING}


class Runs(dict):
    """The experiment run once per API, on first use: a run to the end, then a no-op re-run."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, api: str) -> dict[str, Any]:
        base = self.factory.mktemp(api)
        config = provider_experiment(base, api)
        root = base / "experiments"
        run_dir = finished_run(root, config, RID)
        first = sending_calls(run_dir)
        again = run_luigi(root, config, RID)
        self[api] = {"run_dir": run_dir, "first": first, "again": again, "after": sending_calls(run_dir)}
        return self[api]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory)


def trial_results(run_dir: Path) -> dict[str, Path]:
    return {p.parent.parent.name: p.parent for p in sorted(run_dir.glob("*/results/trial_manifest.json"))}


@pytest.mark.parametrize("api", APIS)
def test_every_api_finishes_with_its_reports_labelled(runs: Runs, api: str) -> None:
    run_dir = runs[api]["run_dir"]
    trials = trial_results(run_dir)
    assert len(trials) == 2
    for results in trials.values():
        report = (results.parent / "reports" / "report.md").read_text()
        assert "SIMULATED" in report and api in report.lower(), report[:600]
        costs = json.loads((results / "costs.json").read_text())
        assert costs["provider"].startswith("emulator") and costs["pricing"]["provider"] == api


def test_every_api_gives_the_same_scores(runs: Runs) -> None:
    reference = trial_results(runs["fireworks"]["run_dir"])
    for api in APIS[1:]:
        trials = trial_results(runs[api]["run_dir"])
        assert set(trials) == set(reference)
        for slug, results in trials.items():
            for name in ("per_item_scores.csv", "significance.json"):
                assert (results / name).read_bytes() == (reference[slug] / name).read_bytes(), (api, slug, name)


@pytest.mark.parametrize("api", APIS)
def test_each_part_is_sent_once_and_a_noop_rerun_sends_nothing(runs: Runs, api: str) -> None:
    run = runs[api]
    assert run["again"].returncode == 0, run["again"].stderr[-2000:]
    assert run["after"] == run["first"], "a no-op re-run sent something"
    parts = {part["job_id"]: part for results in trial_results(run["run_dir"]).values()
             for part in json.loads((results / "trial_manifest.json").read_text())["parts"].values()}
    if api == "local":
        # counted by custom_id, which two trials' treatment parts share (same item, other prompt): in total
        assert sum(run["first"]["completions"].values()) == sum(part["lines"] for part in parts.values())
    else:
        creates = run["first"]["job_creates"]
        assert set(creates.values()) == {1}
        assert len(creates) == len(parts)


def test_a_local_server_that_does_not_answer_ends_the_run_in_one_line(tmp_path: Path) -> None:
    """No per-request backoff, no traceback per part: one line naming the server and the fix, exit 7, and the next
    run (server still down) says the same."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = small_experiment(tmp_path, name="local", base_url=f"http://127.0.0.1:{port}/v1")
    raw = yaml.safe_load(config.read_text())
    raw.update(top_k=None, top_p=None)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    for _ in range(2):
        done = run_luigi(tmp_path / "experiments", config, "down", timeout=120)
        assert done.returncode == 7, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        assert f"127.0.0.1:{port}/v1 does not answer" in done.stderr and "provider.base_url" in done.stderr


def test_who_answers_is_part_of_every_requests_address(tmp_path: Path) -> None:
    """The same messages with the same model and parameters, sent to any two of the providers (the emulator included,
    whatever API it speaks), are different requests: simulated answers are never reused for a real provider."""
    from pipeline.control.run import open_run
    from pipeline.plan import inference_parameters
    from targets.fingerprint import request_checksum

    providers = [{"name": "emulator", "api": api} for api in APIS]
    providers += [{"name": name} for name in APIS]
    addresses = set()
    for index, provider in enumerate(providers):
        config = small_experiment(tmp_path / str(index), **provider)
        raw = yaml.safe_load(config.read_text())
        raw.update(top_k=None, top_p=None)
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        run = open_run("addr", tmp_path / str(index) / "experiments", config)
        trial = run.trials[0]
        addresses.add(request_checksum("same-lines", trial.model_id, inference_parameters(run, trial, 0.0, "open")))
    assert len(addresses) == len(providers)
