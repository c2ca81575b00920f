"""Machinery for the crash-torture tests (`tests/test_torture.py`).

- `EmulatorProcess`: the Fireworks emulator in its own process (`python -m pipeline emulator --port 0 ...`), with
  its inspection routes (`/emulator/calls`, `/emulator/faults`).
- `Runner`: one run (rid, root, config) of `luigi --module pipeline TrialReport ...` against that emulator, as the real
  provider would be used (`provider: fireworks` + `FIREWORKS_*` environment). Each invocation may die by its own
  SIGKILL at its N-th crash point (`PIPELINE_CRASH_AT=N`) or be SIGKILLed by us after a delay; every invocation
  records the crash points it passed (`PIPELINE_CRASH_LOG`), which is how kills are aimed and labelled.
- `label_points`: the pipeline phase of each crash point of a sequence (see `PHASES`).
- `torture`: one complete run, killed again and again until an invocation finishes (the scheme is described in
  `tests/test_torture.py`).
- Checks after a run: `exactly_once_problems`, `output_differences`, `manifest_problems`, `leftovers`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from targets.atomic import TMP_MARK
from targets.manifest import BuildManifest, PreparedManifest, RunState, TrialManifest
from tests.conftest import PIPELINE_RUN

REPO = Path(__file__).resolve().parent.parent
ANSWER_KEY = REPO / "data" / "sample"
COMPARED_FILES = ("predictions.csv", "per_item_scores.csv", "significance.json", "costs.json")
PHASES = ("prepare", "build", "dataset create", "upload", "job create", "polling", "download", "parse", "score", "stats",
          "costs", "report")
TAIL = frozenset({"parse", "score", "stats", "costs", "report"})
INVOCATION_TIMEOUT_S = 300.0
STARTUP_TIMEOUT_S = 20.0

_BUILD_FILE = re.compile(r"^t[0-9]+_.+_(control|treatment)(\.p[0-9]+)?\.jsonl$")
# Files whose successful replace means "the task that wrote it finished": a re-run starts after them.
_BOUNDARIES = ("after replace trial_manifest.json", "after replace build_manifest.json",
               "after replace prepared_manifest.json", "after replace run_state.json")
_PHASE_OF_POINT = {"before dataset create": "dataset create", "after dataset create": "dataset create",
                   "after upload": "upload", "before job create": "job create", "after job create": "job create",
                   "after download": "download"}
_PHASE_OF_FILE = {"results.jsonl": "download", "results_combined.jsonl": "parse", "predictions.csv": "parse",
                  "per_item_scores.csv": "score", "significance.json": "stats", "costs.json": "costs",
                  "report.md": "report", "report.html": "report", "aggregate_report.md": "report",
                  "prepared_manifest.json": "prepare", "effective_config.yaml": "prepare", "open_book.jsonl": "prepare",
                  "closed_book.jsonl": "prepare", "build_manifest.json": "build"}


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: proxies from the environment must not see these requests
    return session


class EmulatorProcess:
    """The emulator serving `state_dir` in a process of its own, started and stopped by us (a context manager)."""

    def __init__(self, state_dir: Path, *, latency_s: float = 0.05) -> None:
        self.state_dir = state_dir
        self.latency_s = latency_s
        self.base_url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = _session()

    def __enter__(self) -> EmulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_CRASH")}
        # The documented command; it must survive clients SIGKILLed while their answer is being written.
        cmd = [sys.executable, "-m", "pipeline", "emulator", "--port", "0", "--state-dir", str(self.state_dir),
               "--answer-key", str(ANSWER_KEY), "--latency", str(self.latency_s)]
        with open(self.state_dir.with_name(self.state_dir.name + ".log"), "ab") as log:
            self._proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                info = json.loads((self.state_dir / "server.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            if info.get("pid") == self._proc.pid and info.get("base_url"):
                self.base_url = str(info["base_url"])
                return self.base_url
            try:
                code = self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"emulator exited with code {code} during startup; see {self.state_dir}.log")
        self.stop()
        raise RuntimeError(f"emulator wrote no server.json within {STARTUP_TIMEOUT_S:g} s; see {self.state_dir}.log")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def calls(self) -> dict[str, dict[str, int]]:
        resp = self._http.get(f"{self.base_url}/emulator/calls", timeout=10)
        resp.raise_for_status()
        return resp.json()

    def set_faults(self, rules: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Install a fault plan; None when this emulator has no fault API (404). Raises on any other refusal."""
        resp = self._http.post(f"{self.base_url}/emulator/faults", json={"rules": rules}, timeout=10)
        if resp.status_code == 404:
            return None
        if resp.status_code >= 300:
            raise RuntimeError(f"POST /emulator/faults answered {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def faults(self) -> dict[str, Any]:
        resp = self._http.get(f"{self.base_url}/emulator/faults", timeout=10)
        resp.raise_for_status()
        return resp.json()


def write_config(base: Path, *, resamples: int = 100, poll_interval_s: float = 0.05, api: str = "fireworks") -> Path:
    """The default experiment, changed only in operational knobs: provider, poll interval, resample counts; for
    another API than Fireworks', without the sampling parameters not every API has, and with the model allowed
    unpriced."""
    target = base / "config"
    shutil.copytree(REPO / "config", target)
    path = target / "experiment.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["paths"]["prepared_dir"] = str(ANSWER_KEY)  # the shipped relative path does not survive the copy
    raw["provider"] = {"name": api, "poll_interval_s": poll_interval_s}
    if api != "fireworks":
        raw.update(top_k=None, top_p=None)
        raw["pricing"]["allow_unlisted_models"] = True
    raw["stats"]["bootstrap_samples"] = resamples
    raw["stats"]["permutation_samples"] = resamples
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Invocation:
    """One `luigi ... TrialReport` process and what it did."""

    index: int
    kind: str  # "self-kill" (PIPELINE_CRASH_AT), "parent-kill" (SIGKILL from us after delay_s) or "run"
    crash_at: int | None
    delay_s: float | None
    returncode: int
    points: list[str]
    seconds: float
    log: Path

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


def read_points(path: Path) -> list[str]:
    """Crash point names from a PIPELINE_CRASH_LOG file (`<n> <pid> <name>` lines; a torn last line is dropped)."""
    if not path.exists():
        return []
    names = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split(" ", 2)
        if len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit():
            names.append(fields[2])
    return names


class Runner:
    """Invocations of one run of the pipeline, each with its own output log and crash-point log in `logs`."""

    def __init__(self, *, rid: str, root: Path, config: Path, base_url: str, logs: Path) -> None:
        self.rid, self.root, self.config, self.base_url, self.logs = rid, root, config, base_url, logs
        self.count = 0
        logs.mkdir(parents=True, exist_ok=True)

    @property
    def run_dir(self) -> Path:
        return self.root / f"run_{self.rid}"

    def run(self, *, crash_at: int | None = None, kill_after_s: float | None = None,
            extra: tuple[str, ...] = ()) -> Invocation:
        self.count += 1
        kind = "self-kill" if crash_at else "parent-kill" if kill_after_s is not None else "run"
        log, points = self.logs / f"{self.count:03d}-{kind}.log", self.logs / f"{self.count:03d}.points"
        env = {k: v for k, v in os.environ.items() if k not in ("LUIGI_CONFIG_PATH", "PIPELINE_CRASH_AT")}
        env.update(FIREWORKS_BASE_URL=self.base_url, FIREWORKS_API_KEY="test", FIREWORKS_ACCOUNT_ID="acct",
                   OPENAI_BASE_URL=f"{self.base_url}/v1", OPENAI_API_KEY="test", ANTHROPIC_BASE_URL=self.base_url,
                   ANTHROPIC_API_KEY="test", LOCAL_BASE_URL=f"{self.base_url}/v1", PIPELINE_CRASH_LOG=str(points))
        if crash_at:
            env["PIPELINE_CRASH_AT"] = str(crash_at)
        cmd = [*PIPELINE_RUN, "TrialReport", "--rid", self.rid,
               "--root", str(self.root), "--config", str(self.config), "--local-scheduler", *extra]
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=self.root.parent, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=kill_after_s if kill_after_s is not None else INVOCATION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait(timeout=30)
            if kill_after_s is None:
                raise AssertionError(f"invocation {self.count} hung for {INVOCATION_TIMEOUT_S:g} s; see {log}") from None
        return Invocation(self.count, kind, crash_at, kill_after_s, code, read_points(points),
                          time.monotonic() - started, log)

    def plan(self) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("LUIGI_CONFIG_PATH", "PIPELINE_CRASH_AT",
                                                                "PIPELINE_CRASH_LOG")}
        done = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--rid", self.rid, "--root", str(self.root)],
                              capture_output=True, text=True, env=env, timeout=120, check=False)
        return done.stdout + done.stderr


def _file_of(point: str) -> str | None:
    for prefix in ("before replace ", "after replace "):
        if point.startswith(prefix):
            return point[len(prefix):]
    return None


def _named_phase(point: str) -> str | None:
    """The phase a point belongs to by its own name, or None for points shared by phases (manifests, breadcrumbs)."""
    if point in _PHASE_OF_POINT:
        return _PHASE_OF_POINT[point]
    name = _file_of(point)
    if name is None:
        return None
    if name in _PHASE_OF_FILE:
        return _PHASE_OF_FILE[name]
    if name.endswith("_OUTPUT_DATASET_ID.txt"):
        return "polling"
    if _BUILD_FILE.match(name):
        return "build"
    if name.endswith(".txt"):
        return "prepare"  # prompt and instruction snapshots, frozen with the config
    return None


def label_points(points: list[str], start: str = "prepare") -> list[str]:
    """The phase of each point, following the order of a run.

    A point without a phase of its own takes the current one, except the manifest write just before a dataset or
    job create (the write-ahead intent belongs to that create) and the first job breadcrumb after a job create
    (SubmitPart's; later ones are PollJob's).
    """
    labels: list[str] = []
    current, crumbs = start, 2
    for i, point in enumerate(points):
        phase = _named_phase(point)
        name = _file_of(point) or ""
        if phase is None and name == "trial_manifest.json":
            following = next((p for p in points[i + 1:i + 3] if _file_of(p) != "trial_manifest.json"), None)
            if following in ("before dataset create", "before job create"):
                phase = _PHASE_OF_POINT[following]
        elif phase is None and name.endswith("_job.json"):
            phase = "job create" if current == "job create" and crumbs < 2 else "polling"
            crumbs += 1
        if point == "after job create":
            crumbs = 0
        current = phase or current
        labels.append(current)
    return labels


def points_since_boundary(points: list[str]) -> int:
    """How many points the last, unfinished task of an invocation had passed: what a re-run does again."""
    for back, point in enumerate(reversed(points)):
        if point in _BOUNDARIES:
            return back
    return len(points)


@dataclass
class Kill:
    invocation: int
    kind: str
    crash_at: int | None
    delay_s: float | None
    point: str  # the point it died at (self-kill) or the last one it passed (parent kill)
    phase: str


@dataclass
class TortureResult:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> Invocation:
        return self.invocations[-1]

    def phase_counts(self) -> dict[str, int]:
        counts = {p: 0 for p in PHASES}
        for kill in self.kills:
            counts[kill.phase] = counts.get(kill.phase, 0) + 1
        return counts

    def summary(self) -> str:
        by_kind = {k: sum(1 for x in self.kills if x.kind == k) for k in ("self-kill", "parent-kill")}
        lines = [f"seed {self.seed}: {len(self.kills)} kills ({by_kind['self-kill']} at crash points, "
                 f"{by_kind['parent-kill']} by the parent), {len(self.invocations)} invocations, {self.seconds:.1f} s",
                 "kills per phase: " + ", ".join(f"{p} {n}" for p, n in self.phase_counts().items())]
        for kill in self.kills:
            how = f"CRASH_AT={kill.crash_at}" if kill.crash_at else f"SIGKILL after {kill.delay_s:.2f}s"
            lines.append(f"  #{kill.invocation:03d} {how:<20} {kill.phase:<14} {kill.point}")
        return "\n".join(lines)


@dataclass(frozen=True)
class KillPlan:
    """How hard to hit one run: about `body_kills` kills (crash points and parent kills) until one part is left to
    download, then kills every 1..`tail_max_step` points to the end (at most 4 hits every task of the tail: each
    writes at least two files, two points each), plus `parent_kills` SIGKILLs from the test after a random delay."""

    seed: int
    body_kills: int
    tail_max_step: int
    parent_kills: int
    parent_delay_s: tuple[float, float] = (0.3, 1.2)
    max_failures: int = 3


def torture(runner: Runner, reference_points: list[str], plan: KillPlan,
            calls: Callable[[], dict[str, dict[str, int]]]) -> TortureResult:
    """Kill one run over and over until an invocation finishes by itself; see `tests/test_torture.py`."""
    rng = random.Random(plan.seed)
    labels = label_points(reference_points)
    parts = reference_points.count("before replace results.jsonl")
    prepare = next((i for i, lab in enumerate(labels) if lab != "prepare"), len(labels))
    body = sum(1 for lab in labels if lab not in TAIL)
    # The fewest points a part still to download can need (a resumed run uploads and submits every part first).
    finish = sum(1 for lab in labels if lab in ("polling", "download")) / max(parts, 1) / 2
    # Parent kills land anywhere in up to ~1.2 s of work, so they are kept in the first half of the run.
    parent_at = set(rng.sample(range(2, max(plan.body_kills // 2, plan.parent_kills + 2)), plan.parent_kills))
    result = TortureResult(plan.seed)
    started = time.monotonic()
    phase, redo, progress, failures = "prepare", 0, 0, 0
    blamed: set[tuple[str, str]] = set()
    while True:
        number = len(result.invocations) + 1
        left = parts - sum(1 for _ in runner.run_dir.glob("*/results/*/results.jsonl"))
        if number in parent_at and left > parts // 2:
            # Only while half the parts are still to come: a resumed run is fast, and a kill that lands late would
            # carry it past the phases the crash points are aimed at.
            inv = runner.run(kill_after_s=round(rng.uniform(*plan.parent_delay_s), 2))
        elif number == 1:
            inv = runner.run(crash_at=rng.randint(1, max(1, prepare - 1)))
        elif left == 0 and not any(k.phase == "parse" for k in result.kills):
            inv = runner.run(crash_at=redo + 1)  # every part is on disk: the next new point is a trial's parse
        elif left <= 1:  # the last part's download is followed at once by its trial's parse
            # Short steps while a tail phase has no kill yet: a phase of a few points (costs) is easily jumped over.
            uncovered = TAIL - {k.phase for k in result.kills}
            inv = runner.run(crash_at=redo + rng.randint(1, 2 if uncovered else plan.tail_max_step))
        else:
            # Spread the kills still wanted over the points still to pass, and do not jump over the last parts
            # into the tail: the tail phases get their own, shorter steps.
            room = left * finish
            mean = max(body - progress, room) / max(1, plan.body_kills - len(result.kills))
            step = min(rng.randint(1, max(1, round(2 * mean) - 1)), max(1, round(room)))
            inv = runner.run(crash_at=redo + 2 + step)
        result.invocations.append(inv)
        progress += max(0, len(inv.points) - redo)
        if inv.points:
            phase = label_points(inv.points, start=phase)[-1]
        result.problems.extend(_invocation_problems(inv, calls(), blamed))
        if inv.returncode == 0:
            break
        redo = points_since_boundary(inv.points)
        if inv.killed:
            point = inv.points[-1] if inv.points else "(startup, before any crash point)"
            result.kills.append(Kill(inv.index, inv.kind, inv.crash_at, inv.delay_s, point,
                                     phase if inv.points else "startup"))
            failures = 0
            continue
        failures += 1
        if failures >= plan.max_failures:
            result.problems.append(f"gave up after {failures} failed invocations in a row")
            break
    result.seconds = time.monotonic() - started
    return result


def _invocation_problems(inv: Invocation, calls: dict[str, dict[str, int]], blamed: set[tuple[str, str]]) -> list[str]:
    """What went wrong in one invocation; a duplicate create stays in the counters, so `blamed` remembers which
    `(kind, id)` duplicates an earlier invocation was already blamed for."""
    problems = []
    where = f"invocation #{inv.index:03d} ({inv.kind}, last point {inv.points[-1] if inv.points else 'none'!r})"
    if inv.kind == "self-kill" and inv.killed and len(inv.points) != inv.crash_at:
        problems.append(f"{where}: SIGKILLed after {len(inv.points)} points, not at its crash point {inv.crash_at}")
    elif not inv.killed and inv.returncode != 0:
        problems.append(f"{where}: exited with {inv.returncode} instead of resuming; log {inv.log} ends with:\n"
                        f"{inv.tail()}")
    for kind in ("job_creates", "dataset_creates", "uploads"):
        twice = {rid: n for rid, n in calls.get(kind, {}).items() if n != 1 and (kind, rid) not in blamed}
        if twice:
            blamed.update((kind, rid) for rid in twice)
            problems.append(f"{where}: {kind} counts {twice} (each must be created exactly once)")
    return problems


def owned_parts(run_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """`{(trial, job key): part record}` over every trial manifest of the run."""
    parts = {}
    for path in sorted(run_dir.glob("*/results/trial_manifest.json")):
        for jkey, part in json.loads(path.read_text(encoding="utf-8"))["parts"].items():
            parts[(path.parent.parent.name, jkey)] = part
    return parts


def exactly_once_problems(calls: dict[str, dict[str, int]], run_dir: Path, api: str = "fireworks",
                          resent_at_most: int = 0) -> list[str]:
    """Every part's batch created exactly once remotely (and its input uploaded once), and nothing else created.

    Fireworks jobs and datasets are counted by their ids (the manifests' ids); an OpenAI batch by its client_key
    and its input file by name; an Anthropic batch by the id the provider gave it, so a duplicate is one batch too
    many. A local server has nothing to create: every request is answered, and at most `resent_at_most` (the
    requests in flight at the kills) are answered again."""
    parts = owned_parts(run_dir)
    problems = []
    if api == "local":
        lines = sum(p["lines"] for p in parts.values())
        answered = sum(calls.get("completions", {}).values())
        if not lines <= answered <= lines + resent_at_most:
            problems.append(f"{answered} completions for {lines} requests (at most {resent_at_most} may be resent)")
        return problems
    kinds = {"fireworks": (("job_creates", "job_id"), ("dataset_creates", "dataset_id")),
             "openai": (("job_creates", None), ("uploads", None)), "anthropic": (("job_creates", "job_id"),)}[api]
    # a part's follow-up batch (its failed requests sent again, once) is one more batch, recorded in the part
    batches = [*parts.values(), *(p["followup"] for p in parts.values() if p.get("followup"))]
    for kind, key in kinds:
        created = calls.get(kind, {})
        if len(created) != len(batches):
            problems.append(f"{len(created)} distinct {kind} for {len(batches)} batches in the trial manifests")
        if key is not None and set(created) != {p[key] for p in batches}:
            ids = {p[key] for p in batches}
            problems.append(f"{kind}: created but not in a manifest {sorted(set(created) - ids)}; "
                            f"in a manifest but never created {sorted(ids - set(created))}")
        twice = {rid: n for rid, n in created.items() if n != 1}
        if twice:
            problems.append(f"{kind} not exactly once: {twice}")
    return problems


def snapshot_outputs(run_dir: Path) -> dict[str, bytes]:
    """`{"<trial>/<file>": bytes}` of the compared result files of every trial."""
    out = {}
    for manifest in sorted(run_dir.glob("*/results/trial_manifest.json")):
        for name in COMPARED_FILES:
            path = manifest.parent / name
            if path.exists():
                out[f"{manifest.parent.parent.name}/{name}"] = path.read_bytes()
    return out


def output_differences(reference: dict[str, bytes], run_dir: Path) -> list[str]:
    """Files that are missing or differ from the reference run's, with the first differing line."""
    got = snapshot_outputs(run_dir)
    problems = []
    for key in sorted(set(reference) | set(got)):
        if key not in got or key not in reference:
            problems.append(f"{key}: {'missing' if key not in got else 'not in the reference run'}")
            continue
        if got[key] != reference[key]:
            want_lines, got_lines = reference[key].splitlines(), got[key].splitlines()
            first = next((i for i, (a, b) in enumerate(zip(want_lines, got_lines, strict=False)) if a != b),
                         min(len(want_lines), len(got_lines)))
            problems.append(f"{key}: differs from the reference at line {first + 1} "
                            f"({len(got_lines)} lines vs {len(want_lines)}): "
                            f"{got_lines[first][:160] if first < len(got_lines) else b'<end>'!r} vs "
                            f"{want_lines[first][:160] if first < len(want_lines) else b'<end>'!r}")
    return problems


def manifest_problems(run_dir: Path) -> list[str]:
    """Manifests that do not parse or validate with their pydantic models."""
    models = [(run_dir / "run_state.json", RunState), (run_dir / "prepared" / "prepared_manifest.json", PreparedManifest),
              (run_dir / "batch_inputs" / "build_manifest.json", BuildManifest)]
    trials = sorted(run_dir.glob("*/results/trial_manifest.json"))
    if not trials:
        return [f"no trial manifest under {run_dir}"]
    models += [(path, TrialManifest) for path in trials]
    problems = []
    for path, model in models:
        try:
            model.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            problems.append(f"{path.relative_to(run_dir)}: {model.__name__}: {str(exc)[:300]}")
    return problems


def leftovers(root: Path) -> list[str]:
    """Temp files of the atomic writer, and download scratch directories that still hold something."""
    temps = [p for p in root.rglob(f".*{TMP_MARK}*")]
    scratch = [p for p in root.rglob(".download*") if p.is_dir() and any(p.iterdir())]
    return [str(p.relative_to(root)) for p in sorted(temps + scratch)]


def end_state_checks(runner: Runner, result: TortureResult, reference: dict[str, bytes],
                     calls: dict[str, dict[str, int]], api: str = "fireworks", resent_at_most: int = 0
                     ) -> dict[str, list[str]]:
    """Every check of a tortured run once it ended, by check: the final invocation exits 0, each batch was created
    exactly once, the outputs equal the reference's, the manifests validate, nothing is left behind, and a plan
    finds nothing to run."""
    checks: dict[str, list[str]] = {"during the torture": list(result.problems)}
    if result.final.returncode != 0:
        checks["final invocation exits 0"] = [f"exit {result.final.returncode}:\n{result.final.tail(40)}"]
        return checks
    checks.update({
        "exactly once": exactly_once_problems(calls, runner.run_dir, api, resent_at_most=resent_at_most),
        "identical to the reference": output_differences(reference, runner.run_dir),
        "manifests validate": manifest_problems(runner.run_dir),
        "no leftovers": leftovers(runner.root),
        "plan finds nothing to run": [] if "0 to run" in (out := runner.plan()) else [out[-2000:]],
    })
    return checks


def failed_checks(checks: dict[str, list[str]], *, known: tuple[str, ...] = ()) -> str:
    """The checks with problems (except `known` ones), one block each; empty when all passed."""
    return "\n".join(f"{check}:\n  " + "\n  ".join(map(str, problems)) for check, problems in checks.items()
                     if problems and check not in known)


LOCAL_MAX_CONCURRENT = 4  # provider.max_concurrent_requests of the local runs (the default)


def tortured_provider_run(tmp_path: Path, api: str, plan: KillPlan, faults: list[dict[str, Any]] | None = None,
                          rid: str = "torture") -> TortureResult:
    """A reference run, then a tortured one, each against a fresh emulator speaking `api` with `faults`; asserts
    every end-state check (a local server may answer at most the requests in flight at each kill twice)."""
    (tmp_path / "shared").mkdir()
    config = write_config(tmp_path / "shared", api=api)
    with EmulatorProcess(tmp_path / "reference-emulator") as emulator:
        if faults:
            emulator.set_faults(faults)
        reference = Runner(rid=rid, root=tmp_path / "reference", config=config, base_url=emulator.base_url,
                           logs=tmp_path / "reference-logs")
        first = reference.run()
    assert first.returncode == 0, first.tail(40)
    outputs = snapshot_outputs(reference.run_dir)
    assert len(outputs) == 2 * len(COMPARED_FILES), sorted(outputs)

    with EmulatorProcess(tmp_path / "torture-emulator") as emulator:
        if faults:
            emulator.set_faults(faults)
        runner = Runner(rid=rid, root=tmp_path / "torture", config=config, base_url=emulator.base_url,
                        logs=tmp_path / "torture-logs")
        result = torture(runner, first.points, plan, emulator.calls)
        calls = emulator.calls()
    print(f"\n[{api}] {result.summary()}")
    checks = end_state_checks(runner, result, outputs, calls, api, resent_at_most=LOCAL_MAX_CONCURRENT * len(result.kills))
    assert not failed_checks(checks), f"{failed_checks(checks)}\n\n{result.summary()}"
    return result
