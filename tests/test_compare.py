"""`python -m pipeline compare --rid A --rid B`: metrics and deltas of two runs side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.control import exit_codes
from tests.conftest import finished_run, small_experiment

pytestmark = pytest.mark.e2e


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("compare")
    config = small_experiment(base)
    root = base / "exp"
    finished_run(root, config, "a")
    raw = yaml.safe_load(config.read_text())
    raw["sweep"]["prompt_sets"] = raw["sweep"]["prompt_sets"][:1]  # B: one of A's two trials, at one of its temps
    raw["temps"], raw["samples_per_item"] = [0.0], {"0.0": 1}
    one = config.with_name("one.yaml")
    one.write_text(yaml.safe_dump(raw, sort_keys=False))
    finished_run(root, one, "b")
    return root


def test_common_trials_side_by_side_with_the_difference_of_deltas(runs: Path) -> None:
    out = cli("compare", "--rid", "a", "--rid", "b", "--root", str(runs), "--json")
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert len(view["only_in_a"]) == 1 and view["only_in_b"] == [] and view["unfinished"] == []
    rows = view["rows"]
    assert {(r["temp"], r["type"]) for r in rows} == {("0.0", "closed"), ("0.0", "open")}
    assert view["temps_only_in"] == [{"trial": rows[0]["trial"], "temp": "0.7", "run": "a"}]
    assert {r["metric"] for r in rows} >= {"em", "f1"}
    trial = rows[0]["trial"]
    significance = json.loads((runs / "run_a" / trial / "results" / "significance.json").read_text())
    for r in rows:
        expected = significance["results"][r["temp"]][r["type"]]["metrics"][r["metric"]]["delta_mean"]
        assert r["a"]["delta"] == expected
        assert r["delta_b_minus_a"] == pytest.approx(r["b"]["delta"] - r["a"]["delta"])
    text = cli("compare", "--rid", "a", "--rid", "b", "--root", str(runs)).stdout
    assert "B−A of Δ (pp)" in text and f"only in a: {view['only_in_a'][0]}" in text
    assert f"only in a: T=0.7 of {rows[0]['trial']}" in text


def test_unknown_run_and_wrong_arity_are_clear_errors(runs: Path) -> None:
    missing = cli("compare", "--rid", "a", "--rid", "zzz", "--root", str(runs))
    assert missing.returncode == exit_codes.CONFIG_INVALID and "run zzz has not started" in missing.stderr
    one = cli("compare", "--rid", "a", "--root", str(runs))
    assert one.returncode == exit_codes.CONFIG_INVALID and "exactly two runs" in one.stderr
