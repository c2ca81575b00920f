"""No-op resume of a large finished run vs bare Luigi resolving the same number of complete tasks.

Builds (once, cached under --workdir) a finished run of 20 trials × 4 temperatures × 2 conditions × 10 parts
= 1,600 part tasks against the embedded emulator, then times, in the same session and alternating:
  A. `python -m pipeline run --rid big` (the runner) on the finished run (nothing to do);
  B. bare Luigi: `luigi.build` over a WrapperTask requiring 1,600 complete `LocalTarget` tasks (+ their upper stages),
     in a fresh interpreter, so both sides pay interpreter start-up and Luigi import.
Prints the median of each and the ratio A / B (target: ≤ 1.35). Ratios, not absolute times: the machine is shared.

Both sides load byte-compiled modules, as a user's installation does: pip compiles Luigi's (and every installed
package's) bytecode at install time, so the script compiles this package's too before timing (an editable install
writes it on first import unless PYTHONDONTWRITEBYTECODE is set). An extra line times both sides with no bytecode
at all (an empty PYTHONPYCACHEPREFIX), for readers whose environment never writes it.

    python bench/bench_noop_resume.py [--workdir DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TRIALS, TEMPS, PARTS = 20, 4, 10

BARE = '''
import sys, luigi
from pathlib import Path
root = Path(sys.argv[1])
class Leaf(luigi.Task):
    i = luigi.IntParameter()
    def output(self):
        return luigi.LocalTarget(str(root / f"leaf{self.i}.txt"))
class Trial(luigi.Task):
    t = luigi.IntParameter()
    def requires(self):
        return [Leaf(i=self.t * 80 + k) for k in range(80)]
    def output(self):
        return luigi.LocalTarget(str(root / f"trial{self.t}.txt"))
class All(luigi.WrapperTask):
    # The leaves are listed too, so that resolving All checks all 1,600 of them (not only the 20 complete Trials).
    def requires(self):
        return [Trial(t=t) for t in range(20)] + [Leaf(i=i) for i in range(1600)]
for i in range(1600):
    p = root / f"leaf{i}.txt"
    p.exists() or p.write_text("x")
for t in range(20):
    p = root / f"trial{t}.txt"
    p.exists() or p.write_text("x")
ok = luigi.build([All()], local_scheduler=True, log_level="WARNING")
sys.exit(0 if ok else 1)
'''


def write_config(work: Path) -> Path:
    """20 trials (distinct top_k, so no shared parts), 4 temps, parts of 6 lines over 30 + 30 items (10 per condition)."""
    config = work / "config"
    if not config.exists():
        import shutil

        shutil.copytree(REPO / "config", config)
    raw = yaml.safe_load((config / "experiment.yaml").read_text())
    raw["paths"]["prepared_dir"] = str(REPO / "data" / "sample")
    raw["provider"]["latency_s"] = 0.0
    raw["temps"] = [0.0, 0.3, 0.7, 1.0]
    raw["samples_per_item"] = {"0.0": 1, "0.3": 1, "0.7": 1, "1.0": 1}
    raw["sweep"] = {"prompt_sets": ["excellence"], "top_k": list(range(1, TRIALS + 1))}
    raw["batching"]["lines_per_part"] = 6
    raw["stats"].update(bootstrap_samples=200, permutation_samples=200)
    raw["optional"] = {"enable_power_analysis": False, "enable_cost_effectiveness": False,
                       "enable_unsupported_sensitivity": False, "enable_mixed_effects": False}
    (config / "experiment.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return config / "experiment.yaml"


def luigi_cmd(work: Path, config: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "run", "TrialReport", "--rid", "big", "--root", str(work / "experiments")]
    return cmd + (["--config", str(config)] if config else [])


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def compile_package() -> None:
    """Write this package's bytecode (what `pip install` does for installed packages) so both sides start equal."""
    for package in ("pipeline", "targets"):
        compileall.compile_dir(str(REPO / package), quiet=1)


def medians(cmds: list[list[str]], env: dict[str, str], repeats: int) -> list[float]:
    """Median wall time of each command, alternating between them `repeats` times (the machine is noisy)."""
    times: list[list[float]] = [[] for _ in cmds]
    for _ in range(repeats):
        for cmd, series in zip(cmds, times, strict=True):
            series.append(timed(cmd, env))
    return [statistics.median(series) for series in times]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_noop_resume")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    config = write_config(work)
    run_dir = work / "experiments" / "run_big"
    if not (run_dir / "aggregate_report.md").exists():
        print(f"building the finished run in {run_dir} (once; minutes) …", flush=True)
        build_s = timed(luigi_cmd(work, config), env)
        print(f"  built in {build_s:.0f} s", flush=True)
    parts = sum(len(json.loads(p.read_text())["parts"]) for p in run_dir.glob("*/results/trial_manifest.json"))
    bare_root = work / "bare"
    bare_root.mkdir(exist_ok=True)
    bare = [sys.executable, "-c", BARE, str(bare_root)]
    compile_package()
    a, b = medians([luigi_cmd(work, None), bare], env, args.repeats)
    with tempfile.TemporaryDirectory() as empty:
        cold_env = {**env, "PYTHONPYCACHEPREFIX": empty, "PYTHONDONTWRITEBYTECODE": "1"}
        cold_a, cold_b = medians([luigi_cmd(work, None), bare], cold_env, args.repeats)
    print(f"part tasks in the run: {parts} (target {TRIALS * TEMPS * 2 * PARTS})")
    print(f"{'':<44}{'median s':>10}")
    print(f"{'ours: no-op TrialReport --rid big':<44}{a:>10.2f}")
    print(f"{'bare Luigi: 1,600 complete LocalTargets':<44}{b:>10.2f}")
    ratio = a / b
    print(f"ratio ours / bare: {ratio:.2f}x  (target <= 1.35x)  {'PASS' if ratio <= 1.35 else 'NOT REACHED'}")
    print(f"extra, both sides without bytecode: ours {cold_a:.2f} s / bare {cold_b:.2f} s = {cold_a / cold_b:.2f}x")
    return 0 if ratio <= 1.35 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
