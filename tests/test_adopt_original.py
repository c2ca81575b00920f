"""A run written by the original system is adopted: `TrialReport --rid <that run>` continues where it stopped."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import luigi
import pytest
import yaml

from pipeline import TrialReport
from pipeline.batches import build_lines, render
from pipeline.emulator.model import answer
from pipeline.emulator.server import make_server
from pipeline.providers.fireworks import FireworksClient
from targets.manifest import TrialManifest
from tests.conftest import REPO, stop_emulator_server, tiny_data

pytestmark = pytest.mark.slow
SLUG = "gpt-oss-120b-default-tp1-tk50-mx1024-1024"


@pytest.fixture
def emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    server = make_server("127.0.0.1", 0, tmp_path / "emu", latency_s=0.0, answer_key=tmp_path / "repo" / "data" / "prepared")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("FIREWORKS_BASE_URL", base_url)
    monkeypatch.setenv("FIREWORKS_API_KEY", "k")
    monkeypatch.setenv("FIREWORKS_ACCOUNT_ID", "acct")
    yield FireworksClient(base_url, "k", "acct", allow_loopback_http=True)
    stop_emulator_server(server)


def original_run(repo: Path, client: FireworksClient) -> Path:
    """An original-layout run: p01 of both conditions downloaded, control p02 submitted, treatment p02 never sent."""
    for sub in ("prompts", "task_instructions"):
        (repo / "config" / sub).mkdir(parents=True)
    (repo / "config" / "prompts" / "control_system.txt").write_text("Answer briefly.")
    (repo / "config" / "prompts" / "treatment_system.txt").write_text("Strive for excellence. Answer briefly.")
    for name in ("open_book.txt", "closed_book.txt"):
        (repo / "config" / "task_instructions" / name).write_text((REPO / "config" / "task_instructions" / name).read_text())
    data = tiny_data(repo / "data" / "prepared", n=4)
    run_dir = repo / "experiments" / "run_orig"
    (run_dir / "batch_inputs").mkdir(parents=True)
    (run_dir / "effective_config.yaml").write_text(yaml.safe_dump({
        "model_id": "accounts/fireworks/models/gpt-oss-120b", "temps": [0.0], "samples_per_item": {"0.0": 1},
        "max_new_tokens": {"closed_book": 1024, "open_book": 1024}, "top_p": 1.0, "top_k": 50, "stop": [],
        "backend": "fireworks", "use_batch_api": True,
        "provider": {"name": "fireworks", "batch": {"max_tokens": 1024}, "poll_interval_s": 0.05},
        "paths": {"raw_dir": "data/raw", "prepared_dir": "data/prepared", "experiments_dir": "experiments"},
        "prompt_sets": {"default": {"control": "config/prompts/control_system.txt",
                                    "treatment": "config/prompts/treatment_system.txt"}},
        "optional": {"enable_mixed_effects": True}, "unsupported_threshold": 0.5,
        "stats": {"bootstrap_samples": 200, "permutation_samples": 200, "random_seed": 1337},
        "sizes": {"open_book_max_items": None}, "pricing": {"input_per_million": 0.15, "output_per_million": 0.6}}))
    rows = {k: [json.loads(x) for x in (data / f"{k}.jsonl").read_text().splitlines()] for k in ("open_book", "closed_book")}
    instructions = {t: (repo / "config" / "task_instructions" / f"{t}_book.txt").read_text() for t in ("open", "closed")}
    results = run_dir / SLUG / "results"
    manifest = {"created_utc": "2025-01-01T00:00:00Z", "run_id": "orig",
                "trial": {"model_id": "accounts/fireworks/models/gpt-oss-120b", "prompt_set": "default", "top_p": 1.0,
                          "top_k": 50, "max_new_tokens": {"closed_book": 1024, "open_book": 1024}},
                "temps": [0.0], "samples_per_item": {"0.0": 1}, "prompts": {}, "datasets": {}, "jobs": {},
                "job_status": {}, "control_registry": {"t0": {"mode": "producer"}}, "job_counts": {"x": 1},
                "legacy_note": "kept"}
    for cond in ("control", "treatment"):
        system = (repo / "config" / "prompts" / f"{cond}_system.txt").read_text()
        lines = build_lines(closed_rows=rows["closed_book"], open_rows=rows["open_book"], condition=cond, temp=0.0,
                            samples=1, system_prompt=system, instructions=instructions)
        (run_dir / "batch_inputs" / f"t0_{cond}.jsonl").write_bytes(render(lines))
        halves = [lines[:5], lines[5:]]  # the original split by line count: part 1 mixes closed and open rows
        for i, half in enumerate(halves, 1):
            (run_dir / "batch_inputs" / f"t0_{cond}.p{i:02d}.jsonl").write_bytes(render(half))
        jobs = []
        # p01: downloaded by the original
        p01 = results / f"t0_{cond}_p01"
        p01.mkdir(parents=True)
        out = []
        for line in halves[0]:
            obj = json.loads(line.text)
            content, finish, usage = answer(obj["custom_id"], obj["body"]["messages"], None)
            out.append({"custom_id": obj["custom_id"], "response": {"id": "orig", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
                "usage": usage}})
        (p01 / "results.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))
        (results / f"t0_{cond}_p01_job.json").write_text(json.dumps(
            {"name": f"accounts/acct/batchInferenceJobs/orig-{cond}-1", "state": "JOB_STATE_COMPLETED",
             "outputDatasetId": f"accounts/acct/datasets/orig-{cond}-1-out"}))
        jobs.append(f"accounts/acct/batchInferenceJobs/orig-{cond}-1")
        if cond == "control":  # p02 submitted by the original but never downloaded: the job exists remotely
            part = run_dir / "batch_inputs" / "t0_control.p02.jsonl"
            client.create_dataset("orig-control-2-in", display_name="x", example_count=len(halves[1]))
            client.upload_dataset_file("orig-control-2-in", part)
            job, _ = client.create_job("orig-control-2", model="accounts/fireworks/models/gpt-oss-120b",
                                       input_dataset_id="orig-control-2-in", output_dataset_id="orig-control-2-out",
                                       display_name="x", inference_parameters={"maxTokens": 1024, "temperature": 0.0})
            (results / "t0_control_p02_job.json").write_text(json.dumps(job))
            jobs.append(job["name"])
        manifest["jobs"][f"t0_{cond}"] = jobs
        manifest["job_status"].update({f"t0_{cond}_p01": "completed"})
    (results / "trial_manifest.json").write_text(json.dumps(manifest))
    return run_dir


def test_original_run_is_adopted_and_finished_without_paying_twice(tmp_path: Path, emulator: FireworksClient) -> None:
    repo = tmp_path / "repo"
    run_dir = original_run(repo, emulator)
    before = emulator._request("GET", "/emulator/calls")  # noqa: SLF001 - inspection endpoint of the emulator
    assert luigi.build([TrialReport(rid="orig", root=str(repo / "experiments"))], local_scheduler=True, log_level="WARNING")
    calls = emulator._request("GET", "/emulator/calls")  # noqa: SLF001
    new_jobs = set(calls["job_creates"]) - set(before["job_creates"])
    assert len(new_jobs) == 1, "only the part the original never sent is submitted"
    assert not any(j.startswith("orig-") for j in new_jobs)
    results = run_dir / SLUG / "results"
    assert (results / "t0_control_p02" / "results.jsonl").exists(), "the original's submitted job is re-attached"
    manifest = TrialManifest.model_validate_json((results / "trial_manifest.json").read_text())
    extra = manifest.model_extra or {}
    assert extra["legacy_note"] == "kept" and extra["job_counts"] == {"x": 1}
    assert manifest.parts["t0_control_p02"].job_id == "orig-control-2"
    assert list(results.glob("trial_manifest.json.backup.*.json")), "the v1 manifest was backed up before the upgrade"
    assert (run_dir / SLUG / "reports" / "report.md").exists()
    assert (run_dir / "run_state.json").exists()
    predictions = (results / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 2 * 8
