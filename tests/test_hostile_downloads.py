"""The hostile download matrix, on every batch API: every way a results download can be too big, too slow or lying
is refused.

Each case runs against the emulator speaking one API (Fireworks, OpenAI, Anthropic) through that API's real client;
the fault shapes the results download of one part (t0_treatment_p01) of a lean experiment (one trial at temperature
0: four parts): Fireworks's output dataset file, OpenAI's `GET /v1/files/{output}/content`, Anthropic's
`GET /v1/messages/batches/{id}/results`. For each case
the faulted part fails with a clear error naming it, the run writes no file larger than twice the part's derived
limit (the run executes under RLIMIT_FSIZE = 2 × limit, so a larger write would kill it with SIGXFSZ instead of
failing the part), nothing of the refused download stays on disk, the parts already downloaded are untouched, and a
later good download repairs the part without a new batch.

This file runs the Fireworks column; `test_hostile_downloads_openai.py` and `..._anthropic.py` run the same cases
(`hostile_case`) on the other APIs, in files of their own so that xdist (`--dist loadfile`) runs the columns in
parallel.

OpenAI and Anthropic serve results as plain JSONL, never as bundles: their clients parse what they receive as JSONL
and do not unpack archives, so a zip / gzip / tar body is refused as corrupt results there (checked, with that
message), while Fireworks unpacks bundles with limits (refused as too big / too many members / too deep).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.providers.limits import DownloadLimits
from tests.conftest import PIPELINE_RUN
from tests.test_providers import provider_experiment

pytestmark = pytest.mark.slow
RID = "hostile"
PART = "t0_treatment_p01"
MATCH = {
    # the output dataset id (remote_ids: "ex-t<temp>-<cond[:4]>-p<index>-<hash>-out")
    "fireworks": "ex-t0-trea-p01-",
    # the batch's metadata.client_key: the part's Fireworks-style job id, same readable prefix
    "openai": "ex-t0-trea-p01-",
    # "<batch id> <first custom id>": part p01 of the t0 treatment group starts with the first closed-book item
    "anthropic": r" nq_open\|c0\|treatment\|0\.0\|0\|closed$",
}
"""Per API, a fault `match` that hits the results download of PART (and nothing else)."""
DEADLINE_S = 3.0
# Every part of the small experiment: 6 requests of at most 512 tokens.
LIMIT = DownloadLimits.for_part(6, max_tokens=512).max_bytes
BIG = 64 * LIMIT
KEPT = {"openai_input.jsonl", "anthropic_requests.json", "batch.json"}
"""Files a backend keeps in the part's work dir (its converted input, its batch breadcrumb): not download leftovers."""

FLOOD = "import sys\nwith open(sys.argv[1] + '/BIJOutputSet.jsonl', 'wb') as f:\n    while True: f.write(b'x' * 65536)\n"
HANG = "import time\ntime.sleep(120)\n"
CORRUPT = "not valid JSON"
"""What the JSONL-only clients (OpenAI, Anthropic) say of a body that is an archive or cut mid-line."""

CASES = {
    # case: (rules, fallback script, what the refusal says on Fireworks, on OpenAI / Anthropic (None: not applicable))
    "zip bomb": ([{"fault": "zip_bomb", "bytes": BIG}], None, "above the limit", CORRUPT),
    "gzip bomb": ([{"fault": "gzip_bomb", "inflated_bytes": BIG}], None, "exceeds", CORRUPT),
    "endless body": ([{"fault": "endless"}], None, "body exceeds the limit", "body exceeds the limit"),
    # A body shorter than announced is a cut connection: retried until the retries or the deadline run out.
    "Content-Length too large": ([{"fault": "lying_length", "direction": "over"}], None, "body cut", "body cut"),
    # Announces about half the body, ending inside a line: the client believes it and gets a corrupt last line.
    "Content-Length too small": ([{"fault": "lying_length", "direction": "under"}], None, "corrupt", CORRUPT),
    "tar of many members": ([{"fault": "tar_bomb", "members": 100_000}], None, "members", CORRUPT),
    "deep tar": ([{"fault": "tar_bomb", "members": 3, "depth": 40}], None, "folders deep", CORRUPT),
    "oversized file": ([{"fault": "oversized", "bytes": 3 * LIMIT}], None, "exceeds the limit", "exceeds the limit"),
    "slow drip": ([{"fault": "slow_drip", "interval_s": 0.5}], None, "deadline", "deadline"),
    "CLI fallback flood": ([{"fault": "file_url"}], FLOOD, "above the limit", None),
    "CLI fallback hangs": ([{"fault": "file_url"}], HANG, "deadline", None),
}
FIREWORKS_ONLY = ("the CLI fallback (provider.download_command with {dataset_id}, firectl) and the file_url fault "
                  "(an output dataset's externalUrl) are Fireworks features; this API has neither")


def matrix(api: str) -> list[object]:
    """The (case, needle) parameters of `api`; a case that cannot apply to it is skipped, saying why."""
    params = []
    for case, (_, _, fireworks_needle, other_needle) in CASES.items():
        needle = fireworks_needle if api == "fireworks" else other_needle
        marks = [pytest.mark.skip(reason=FIREWORKS_ONLY)] if needle is None else []
        params.append(pytest.param(case, needle, id=case, marks=marks))
    return params


def limited_run(root: Path, config: Path) -> subprocess.CompletedProcess:
    """The pipeline, unable to write any file past 2 × the derived limit."""
    cap = 2 * LIMIT

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run([*PIPELINE_RUN, "TrialReport", "--rid", RID, "--root", str(root), "--config", str(config),
                           "--local-scheduler"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=root.parent, preexec_fn=limit)


def lean_experiment(base: Path, api: str) -> Path:
    """`provider_experiment` cut to one trial at temperature 0: four parts (PART among them), a third faster."""
    config = provider_experiment(base, api)
    raw = yaml.safe_load(config.read_text())
    raw["sweep"]["prompt_sets"] = [raw["default_prompt_set"]]
    raw.update(temps=[0.0], samples_per_item={"0.0": 1})
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def config_with(tmp_path: Path, api: str, script: str | None) -> Path:
    config = lean_experiment(tmp_path, api)
    raw = yaml.safe_load(config.read_text())
    raw["provider"]["download_deadline_s"] = DEADLINE_S
    if script is not None:
        (tmp_path / "fallback.py").write_text(script)
        raw["provider"]["download_command"] = [sys.executable, str(tmp_path / "fallback.py"), "{output_dir}"]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def leftovers(run_dir: Path) -> list[Path]:
    """Files of PART that are not its results, its backend's kept files, or its records: download leftovers."""
    return [p for p in run_dir.glob(f"*/results/{PART}/**/*")
            if p.is_file() and not (p.name == "results.jsonl" and p.parent.name == PART) and p.name not in KEPT]


@pytest.mark.parametrize(("case", "needle"), matrix("fireworks"))
def test_hostile_download_fails_the_part_bounded_and_a_good_one_repairs_it(tmp_path: Path, emulator: str, case: str,
                                                                          needle: str) -> None:
    hostile_case(tmp_path, emulator, "fireworks", case, needle)


def hostile_case(tmp_path: Path, emulator: str, api: str, case: str, needle: str) -> None:
    """One case of the matrix on `api` (see the module docstring), with the emulator at `emulator` and no plan yet."""
    rules, script, _, _ = CASES[case]
    answer = requests.post(emulator + "/emulator/faults", json={"rules": [
        {**rule, "match": MATCH[api], "times": 0} for rule in rules]}, timeout=5)
    assert answer.status_code == 200, answer.text
    config = config_with(tmp_path, api, script)
    root = tmp_path / "exp"
    run_dir = root / f"run_{RID}"

    first = limited_run(root, config)
    assert first.returncode == 30, f"exit {first.returncode}\n{first.stderr[-3000:]}"
    refusal = next((line for line in first.stderr.splitlines() if line.startswith(f"RuntimeError: part {PART}:")), "")
    assert "Nothing was written" in refusal and "re-run" in refusal, first.stderr[-3000:]
    assert needle.lower() in refusal.lower(), refusal
    assert not list(run_dir.glob(f"*/results/{PART}/results.jsonl"))
    assert not leftovers(run_dir), "a refused download leaves nothing"
    done = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/results/*/results.jsonl")}
    assert done, "the other parts were downloaded"
    created = requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"]
    fired = requests.get(emulator + "/emulator/faults", timeout=5).json()["rules"]
    assert all(rule["fired"] for rule in fired), fired

    requests.delete(emulator + "/emulator/faults", timeout=5)
    second = limited_run(root, config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()), "parts already downloaded are kept as they are"
    repaired = [json.loads(line) for p in run_dir.glob(f"*/results/{PART}/results.jsonl")
                for line in p.read_text().splitlines()]
    assert len(repaired) == 6 and all("response" in r for r in repaired), repaired[:2]
    assert requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"] == created
