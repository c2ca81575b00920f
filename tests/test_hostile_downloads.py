"""The hostile download matrix: every way a results download can be too big, too slow or lying is refused.

For each case the faulted part fails with a clear error naming it, the run writes no file larger than twice the
part's derived limit (the run executes under RLIMIT_FSIZE = 2 × limit, so a larger write would kill it with
SIGXFSZ instead of failing the part), nothing of the refused download stays on disk, the parts already downloaded
are untouched, and a later good download repairs the part without a new job.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from pipeline.providers.limits import DownloadLimits
from tests.conftest import PIPELINE_RUN, run_emulator, small_experiment

pytestmark = pytest.mark.slow
RID = "hostile"
PART = "t0_treatment_p01"
MATCH = "ex-t0-trea-p01-"
DEADLINE_S = 3.0
# Every part of the small experiment: 6 requests of at most 512 tokens.
LIMIT = DownloadLimits.for_part(6, max_tokens=512).max_bytes
BIG = 64 * LIMIT

FLOOD = "import sys\nwith open(sys.argv[1] + '/BIJOutputSet.jsonl', 'wb') as f:\n    while True: f.write(b'x' * 65536)\n"
HANG = "import time\ntime.sleep(120)\n"

CASES = {
    "zip bomb": ([{"fault": "zip_bomb", "bytes": BIG}], None, "above the limit"),
    "gzip bomb": ([{"fault": "gzip_bomb", "inflated_bytes": BIG}], None, "exceeds"),
    "endless body": ([{"fault": "endless"}], None, "body exceeds the limit"),
    # A body shorter than announced is a cut connection: retried until the retries or the deadline run out.
    "Content-Length too large": ([{"fault": "lying_length", "direction": "over"}], None, "body cut"),
    "Content-Length too small": ([{"fault": "lying_length", "direction": "under"}], None, "corrupt"),
    "tar of many members": ([{"fault": "tar_bomb", "members": 100_000}], None, "members"),
    "deep tar": ([{"fault": "tar_bomb", "members": 3, "depth": 40}], None, "folders deep"),
    "oversized file": ([{"fault": "oversized", "bytes": 3 * LIMIT}], None, "exceeds the limit"),
    "slow drip": ([{"fault": "slow_drip", "interval_s": 0.5}], None, "deadline"),
    "CLI fallback flood": ([{"fault": "file_url"}], FLOOD, "above the limit"),
    "CLI fallback hangs": ([{"fault": "file_url"}], HANG, "deadline"),
}


def limited_run(root: Path, config: Path) -> subprocess.CompletedProcess:
    """The pipeline, unable to write any file past 2 × the derived limit."""
    cap = 2 * LIMIT

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run([*PIPELINE_RUN, "TrialReport", "--rid", RID, "--root", str(root), "--config", str(config),
                           "--local-scheduler"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=root.parent, preexec_fn=limit)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    with run_emulator(tmp_path / "exp", RID) as base_url:
        yield base_url


def config_with(tmp_path: Path, script: str | None) -> Path:
    config = small_experiment(tmp_path, download_deadline_s=DEADLINE_S)
    if script is not None:
        (tmp_path / "fallback.py").write_text(script)
        raw = yaml.safe_load(config.read_text())
        raw["provider"]["download_command"] = [sys.executable, str(tmp_path / "fallback.py"), "{output_dir}"]
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


@pytest.mark.parametrize("case", CASES)
def test_hostile_download_fails_the_part_bounded_and_a_good_one_repairs_it(tmp_path: Path, emulator: str,
                                                                          case: str) -> None:
    rules, script, needle = CASES[case]
    answer = requests.post(emulator + "/emulator/faults", json={"rules": [
        {**rule, "match": MATCH, "times": 0} for rule in rules]}, timeout=5)
    assert answer.status_code == 200, answer.text
    config = config_with(tmp_path, script)
    root = tmp_path / "exp"
    run_dir = root / f"run_{RID}"

    first = limited_run(root, config)
    assert first.returncode == 30, f"exit {first.returncode}\n{first.stderr[-3000:]}"
    refusal = next((line for line in first.stderr.splitlines() if line.startswith(f"RuntimeError: part {PART}:")), "")
    assert "Nothing was written" in refusal and "re-run" in refusal, first.stderr[-3000:]
    assert needle.lower() in refusal.lower(), refusal
    assert not list(run_dir.glob(f"*/results/{PART}/results.jsonl"))
    assert not [p for p in run_dir.rglob(f"*/{PART}/*") if ".download." in str(p)], "a refused download leaves nothing"
    done = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/results/*/results.jsonl")}
    assert done, "the other parts were downloaded"
    created = requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"]

    requests.delete(emulator + "/emulator/faults", timeout=5)
    second = limited_run(root, config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()), "parts already downloaded are kept as they are"
    repaired = [json.loads(line) for p in run_dir.glob(f"*/results/{PART}/results.jsonl")
                for line in p.read_text().splitlines()]
    assert repaired and all("response" in r for r in repaired)
    assert requests.get(emulator + "/emulator/calls", timeout=5).json()["job_creates"] == created
