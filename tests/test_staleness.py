"""The staleness matrix: for each input of a run, accept a change on a finished run and check exactly what re-runs.

One finished run is built per module (`small_experiment`, two temperatures, 3 lines per part: two closed-book and two
open-book parts per condition and temperature, 24 jobs, the control parts shared by the two prompt sets). Each case
copies the whole experiments root (the emulator's state included) with the config and the data, changes one input,
re-runs with `--config … --accept-config-drift`, and checks:

(a) the exact set of stages that ran (the `done <stage> <scope>` log lines) against the set derived here: a stage
    runs iff something it reads changed (ARCHITECTURE §2);
(b) the exact set of requests sent (new job creates at the emulator, each job's model, parameters and uploaded bytes)
    against a model of the batch inputs kept by this test: the request lines of the finished run, transformed by the
    change, split into parts again; only request contents never sent before may go out, each once;
(c) predictions.csv byte-identical for every trial none of whose requests changed; exit 0; and a second re-run
    does nothing (no `done` line, no create).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.control.run import open_run
from pipeline.emulator.process import stop_emulator
from pipeline.naming import CONDITIONS, temp_str
from pipeline.plan import all_parts
from targets import store
from targets.manifest import BuildManifest
from tests.conftest import run_luigi, small_experiment

pytestmark = [pytest.mark.staleness, pytest.mark.slow]
RID = "stale"
LINES_PER_PART = 3
TRIAL_STAGES = ("parsed", "scored", "stats", "costs", "optional", "report")
TRIAL_FILES = {"predictions": "predictions.csv", "scored": "per_item_scores.csv", "scored_rows": "scored_rows.npz",
               "stats": "significance.json", "costs": "costs.json"}
DONE = re.compile(r" pipeline: done (?P<stage>aggregate report|[a-z]+) (?P<scope>.*?)(?: \(.*)?$")


# --- what a finished run is, read from its files -------------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request_key(part_bytes: bytes, model: str, params: dict[str, Any]) -> tuple[str, str, str]:
    """What a job sends: the uploaded request bytes, the model and every inference parameter."""
    return sha(part_bytes), model, json.dumps(params, sort_keys=True)


@dataclass
class Snapshot:
    root: Path
    run_dir: Path
    config: dict[str, Any]
    trials: dict[str, str]                            # slug -> prompt set
    temps: list[float]
    refs: dict[str, list]                             # slug -> [PartRef], as the pipeline plans them
    jobs: dict[str, tuple[str, str, str]]             # job id -> request key, every job the emulator holds
    creates: dict[str, int]
    views: dict[str, dict[str, tuple[str, str, str]]]  # slug -> {owner/jkey: request key of the job its record names}
    owned: dict[str, dict[str, tuple[str, str, str]]]  # slug -> {jkey: request key} of the parts it owns
    files: dict[str, dict[str, bytes | None]]         # slug -> {predictions|scored|stats|costs|report: bytes}
    shards: dict[tuple[str, float, str], list[dict]]  # (prompt set, T, condition) -> request lines, in order
    config_hash: str                                  # the run's semantic config hash (prompt texts included)


def emulator_jobs(run_dir: Path) -> dict[str, tuple[str, str, str]]:
    account = run_dir / ".emulator" / "accounts" / "emulator"
    out = {}
    for path in sorted((account / "jobs").glob("*.json")):
        job = json.loads(path.read_text())
        dataset = job["inputDatasetId"].rsplit("/", 1)[-1]
        (uploaded,) = [p for p in (account / "files" / dataset).iterdir() if p.is_file()]
        out[job["id"]] = request_key(uploaded.read_bytes(), job["model"], job["inferenceParameters"])
    return out


def snapshot(root: Path) -> Snapshot:
    run_dir = root / f"run_{RID}"
    run = open_run(RID, root)
    build = store.read(run.layout.build_manifest, BuildManifest)
    refs = all_parts(run, build)
    jobs = emulator_jobs(run_dir)
    manifests = {t.slug: json.loads(run.layout.trial_manifest(t.slug).read_text()) for t in run.trials}
    views: dict[str, dict[str, tuple[str, str, str]]] = {}
    owned: dict[str, dict[str, tuple[str, str, str]]] = {}
    for slug, trial_refs in refs.items():
        views[slug] = {f"{r.owner}/{r.jkey}": jobs[manifests[r.owner]["parts"][r.jkey]["job_id"]] for r in trial_refs}
        owned[slug] = {r.jkey: views[slug][f"{r.owner}/{r.jkey}"] for r in trial_refs if r.owner == slug}
    files = {}
    for t in run.trials:
        results = run.layout.results_dir(t.slug)
        files[t.slug] = {k: (results / name).read_bytes() if (results / name).exists() else None
                         for k, name in TRIAL_FILES.items()}
        files[t.slug]["report"] = run.layout.report_md(t.slug).read_bytes()
    shards = {}
    for prompt_set in dict.fromkeys(t.prompt_set for t in run.trials):
        for temp in run.cfg.temps:
            entry = build.builds[f"{prompt_set}|{temp_str(temp)}"]
            for cond in CONDITIONS:
                shards[(prompt_set, temp, cond)] = [
                    json.loads(line) for part in sorted(entry["parts"][cond], key=lambda p: p["index"])
                    for line in (run_dir / part["path"]).read_text(encoding="utf-8").splitlines()]
    calls = json.loads((run_dir / ".emulator" / "calls.json").read_text())
    return Snapshot(root=root, run_dir=run_dir, config=yaml.safe_load(run.layout.effective_config.read_text()),
                    trials={t.slug: t.prompt_set for t in run.trials}, temps=list(run.cfg.temps), refs=refs,
                    jobs=jobs, creates=dict(calls["job_creates"]), views=views, owned=owned, files=files,
                    shards=shards,
                    config_hash=json.loads(run.layout.run_state.read_text())["config_hash"])


# --- this test's own model of the batch inputs ---------------------------------------------------------------------

@dataclass
class Requests:
    """Request lines per (prompt set, T, condition), model per prompt set, job parameters per (prompt set, T, type)."""

    shards: dict[tuple[str, float, str], list[dict]]
    model: dict[str, str]
    params: dict[tuple[str, float, str], dict[str, Any]]
    lines_per_part: int

    @classmethod
    def of(cls, snap: Snapshot) -> Requests:
        model, params = {}, {}
        for slug, prompt_set in snap.trials.items():
            for ref in snap.refs[slug]:
                key = snap.views[slug][f"{ref.owner}/{ref.jkey}"]
                model[prompt_set] = key[1]
                params[(prompt_set, ref.temp, ref.type)] = json.loads(key[2])
        return cls(copy.deepcopy(snap.shards), model, params, snap.config["batching"]["lines_per_part"])

    def parts(self) -> dict[tuple[str, float, str, int], tuple[str, str, str]]:
        """(prompt set, T, condition, index) -> request key, split as the pipeline splits: a new part when the type
        changes or the part is full; each line rendered as `json.dumps(line, ensure_ascii=False)`."""
        out = {}
        for (prompt_set, temp, cond), lines in self.shards.items():
            chunks: list[list[dict]] = []
            for line in lines:
                if not chunks or len(chunks[-1]) >= self.lines_per_part or kind(chunks[-1][-1]) != kind(line):
                    chunks.append([])
                chunks[-1].append(line)
            for index, chunk in enumerate(chunks, 1):
                data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in chunk).encode()
                out[(prompt_set, temp, cond, index)] = request_key(
                    data, self.model[prompt_set], self.params[(prompt_set, temp, kind(chunk[0]))])
        return out

    # transformations -------------------------------------------------------------------------------------------

    def lines(self, prompt_set: str | None = None, temp: float | None = None, cond: str | None = None,
              type_: str | None = None):  # noqa: ANN201
        for (ps, t, c), lines in self.shards.items():
            if prompt_set in (None, ps) and temp in (None, t) and cond in (None, c):
                yield from (line for line in lines if type_ in (None, kind(line)))

    def set_params(self, type_: str | None = None, **values: Any) -> None:
        for (_, _, ty), params in self.params.items():
            if type_ in (None, ty):
                params.update(values)


def kind(line: dict) -> str:
    return line["custom_id"].rsplit("|", 1)[-1]


def with_id_field(line: dict, index: int, value: str) -> dict:
    fields = line["custom_id"].split("|")
    fields[index] = value
    return {**copy.deepcopy(line), "custom_id": "|".join(fields)}


# --- the cases -----------------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    config: dict[str, Any]  # the experiment config to write (paths absolute)
    config_dir: Path
    data_dir: Path
    requests: Requests      # the expected batch inputs, changed along with the config


def edit_text(path: Path, new: str) -> tuple[str, str]:
    old = path.read_text(encoding="utf-8")
    path.write_text(new, encoding="utf-8")
    return old.strip(), new.strip()


def prompt_edit(prompt_set: str | None, cond: str, name: str) -> Callable[[Ctx], None]:
    def change(ctx: Ctx) -> None:
        _, new = edit_text(ctx.config_dir / "prompts" / name, "You answer questions. Be brief and never guess.\n")
        for line in ctx.requests.lines(prompt_set=prompt_set, cond=cond):
            line["body"]["messages"][0]["content"] = new
    return change


def instructions_edit(kind_: str) -> Callable[[Ctx], None]:
    def change(ctx: Ctx) -> None:
        old, new = edit_text(ctx.config_dir / "task_instructions" / f"{kind_}_book.txt",
                             f"Answer the {kind_}-book question in a few words.\n")
        for line in ctx.requests.lines(type_=kind_):
            user = line["body"]["messages"][1]
            assert user["content"].startswith(old)
            user["content"] = new + user["content"][len(old):]
    return change


def set_model(ctx: Ctx) -> None:
    ctx.config["model_id"] = "accounts/fireworks/models/gpt-oss-20b"
    ctx.requests.model = {ps: ctx.config["model_id"] for ps in ctx.requests.model}


def add_temp(ctx: Ctx) -> None:
    ctx.config["temps"] = [0.0, 0.3, 0.7]
    ctx.config["samples_per_item"]["0.3"] = 1
    reqs = ctx.requests
    for (ps, t, cond), lines in list(reqs.shards.items()):
        if t == 0.0:
            reqs.shards[(ps, 0.3, cond)] = [with_id_field(line, 3, "0.3") for line in lines]
    for (ps, t, ty), params in list(reqs.params.items()):
        if t == 0.0:
            reqs.params[(ps, 0.3, ty)] = {**params, "temperature": 0.3}


def remove_temp(ctx: Ctx) -> None:
    ctx.config["temps"] = [0.0]
    ctx.config["samples_per_item"] = {"0.0": 1}
    ctx.requests.shards = {k: v for k, v in ctx.requests.shards.items() if k[1] == 0.0}


def set_top(name: str, wire: str, value: float | int) -> Callable[[Ctx], None]:
    def change(ctx: Ctx) -> None:
        ctx.config[name] = value
        ctx.requests.set_params(**{wire: value})
    return change


def set_max_tokens(kind_: str, value: int) -> Callable[[Ctx], None]:
    def change(ctx: Ctx) -> None:
        ctx.config["max_new_tokens"][f"{kind_}_book"] = value
        ctx.requests.set_params(type_=kind_, maxTokens=value)
    return change


def set_stop(ctx: Ctx) -> None:
    ctx.config["stop"] = ["\n\n"]
    ctx.requests.set_params(extraBody=json.dumps({"stop": ["\n\n"]}))


def more_samples(ctx: Ctx) -> None:
    ctx.config["samples_per_item"]["0.7"] = 2
    for key, lines in ctx.requests.shards.items():
        if key[1] == 0.7:
            ctx.requests.shards[key] = [with_id_field(line, 4, str(k)) for line in lines for k in range(2)]


def fewer_open_items(ctx: Ctx) -> None:
    ctx.config["sizes"] = {**(ctx.config.get("sizes") or {}), "open_book_max_items": 4}
    kept = [json.loads(line)["id"] for line in (ctx.data_dir / "open_book.jsonl").read_text().splitlines()][:4]
    for key, lines in ctx.requests.shards.items():
        ctx.requests.shards[key] = [line for line in lines if kind(line) != "open" or line["custom_id"].split("|")[1] in kept]


def edit_source_item(ctx: Ctx) -> None:
    path = ctx.data_dir / "closed_book.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    old, rows[4]["question"] = rows[4]["question"], "Which city is capital number 4?"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for line in ctx.requests.lines(type_="closed"):
        if line["custom_id"].split("|")[1] == rows[4]["id"]:
            user = line["body"]["messages"][1]
            user["content"] = user["content"].replace(f"QUESTION:\n{old}", f"QUESTION:\n{rows[4]['question']}")


def set_lines_per_part(ctx: Ctx) -> None:
    ctx.config["batching"]["lines_per_part"] = ctx.requests.lines_per_part = 4


def set_in(*path: str, value: Any) -> Callable[[Ctx], None]:
    def change(ctx: Ctx) -> None:
        node = ctx.config
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return change


@dataclass(frozen=True)
class Case:
    id: str
    change: Callable[[Ctx], None] | None = None
    force: bool = False


CASES = [
    Case("prompt-control", prompt_edit(None, "control", "control_system.txt")),
    Case("prompt-treatment-excellence", prompt_edit("excellence", "treatment", "treatment_excellence.txt")),
    Case("instructions-open-book", instructions_edit("open")),
    Case("instructions-closed-book", instructions_edit("closed")),
    Case("model", set_model),
    Case("temperature-added", add_temp),
    Case("temperature-removed", remove_temp),
    Case("top_p", set_top("top_p", "topP", 0.9)),
    Case("top_k", set_top("top_k", "topK", 40)),
    Case("max_new_tokens-closed", set_max_tokens("closed", 128)),
    Case("max_new_tokens-open", set_max_tokens("open", 256)),
    Case("stop", set_stop),
    Case("samples_per_item", more_samples),
    Case("sizes", fewer_open_items),
    Case("source-file", edit_source_item),
    Case("lines_per_part", set_lines_per_part),
    Case("scoring-threshold", set_in("unsupported", "threshold", value=0.6)),
    Case("scoring-abstain-markers", set_in("scoring", "abstain_markers", value=["no idea"])),  # abstentions now wrong
    Case("stats-bootstrap", set_in("stats", "bootstrap_samples", value=300)),
    Case("pricing", set_in("pricing", "providers", "fireworks", "accounts/fireworks/models/gpt-oss-120b",
                           value={"input_per_mtok": 0.2, "output_per_mtok": 0.6})),
    Case("force", force=True),
]


# --- the expectation: a stage runs iff something it reads changed --------------------------------------------------

def tree_state(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of the run (the emulator's own state aside)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and ".emulator" not in p.parts}


def stage_lines(stderr: str) -> set[tuple[str, str]]:
    return {(m["stage"], m["scope"]) for m in map(DONE.search, stderr.splitlines()) if m}


def changed(old: dict[str, Any], new: dict[str, Any], *path: str) -> bool:
    for key in path:
        old, new = (old or {}).get(key), (new or {}).get(key)
    return old != new


def modeled_views(after: Snapshot, model: Requests) -> dict[str, dict[str, tuple[str, str, str]]]:
    """Each trial's parts as the pipeline plans them now (owner/jkey), with the requests this test expects them to send."""
    parts = model.parts()
    return {slug: {f"{r.owner}/{r.jkey}": parts[(after.trials[slug], r.temp, r.condition, r.index)] for r in refs}
            for slug, refs in after.refs.items()}


def expected_stages(before: Snapshot, after: Snapshot, model_before: Requests, model_after: Requests,
                    prepared: bool, force: bool) -> set[tuple[str, str]]:
    old, new = before.config, after.config
    out: set[tuple[str, str]] = set()
    if prepared:
        out.add(("prepared", f"run={RID}"))
    for prompt_set in dict.fromkeys(after.trials.values()):
        for temp in after.temps:
            keys = [(prompt_set, temp, c) for c in CONDITIONS]
            if (prepared or model_before.lines_per_part != model_after.lines_per_part
                    or any(model_before.shards.get(k) != model_after.shards[k] for k in keys)):
                out.add(("built", f"run={RID} prompt_set={prompt_set} T={temp_str(temp)}"))
    view = modeled_views(after, model_after)
    for slug, refs in after.refs.items():
        for r in refs:
            if r.owner == slug and before.owned.get(slug, {}).get(r.jkey) != view[slug][f"{r.owner}/{r.jkey}"]:
                out.add(("downloaded", f"trial={slug} part={r.jkey}"))
    scoring = changed(old, new, "unsupported") or changed(old, new, "scoring")
    stats = changed(old, new, "stats")
    pricing = changed(old, new, "pricing") or changed(old, new, "provider", "pricing_key")
    optional = (changed(old, new, "optional") or changed(old, new, "stats", "random_seed")
                or changed(old, new, "stats", "bootstrap_samples") or changed(old, new, "unsupported", "threshold"))
    config = before.config_hash != after.config_hash
    for slug in after.trials:
        was, now = before.files.get(slug), after.files[slug]
        new_trial = was is None
        differs = {k: new_trial or was[k] != now[k] for k in (*TRIAL_FILES, "report")}
        requests = before.views.get(slug) != view[slug]  # which requests the trial's rows answer, and who owns them
        runs = {
            "parsed": requests,
            "scored": differs["predictions"] or prepared or scoring,
            "stats": differs["scored"] or stats,
            "costs": differs["predictions"] or pricing or requests,
            "optional": (differs["scored"] or differs["scored_rows"] or differs["costs"] or differs["predictions"]
                         or prepared or optional),
            "report": differs["scored"] or differs["stats"] or differs["costs"] or requests or config or force,
        }
        out |= {(stage, f"trial={slug}") for stage in TRIAL_STAGES if runs[stage]}
    if force or set(before.trials) != set(after.trials) or any(
            before.files.get(s, {}).get("report") != after.files[s]["report"] for s in after.trials):
        out.add(("aggregate report", f"run={RID}"))
    return out


# --- the test ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("stale")
    config = small_experiment(base, lines_per_part=LINES_PER_PART)
    done = run_luigi(base / "exp", config, RID)
    assert done.returncode == 0, done.stderr[-3000:]
    stop_emulator(base / "exp" / f"run_{RID}" / ".emulator")
    before = snapshot(base / "exp")
    requests = Requests.of(before)
    assert set(requests.parts().values()) == set(before.jobs.values()), "the test's model reproduces the batch inputs"
    assert all(n == 1 for n in before.creates.values())
    return {"base": base, "before": before, "requests": requests}


def copy_case(base: Path, target: Path) -> None:
    shutil.copytree(base, target, symlinks=True)
    emulator = target / "exp" / f"run_{RID}" / ".emulator"
    (emulator / "server.json").unlink(missing_ok=True)  # the copy starts its own emulator on its own state


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_change_reruns_exactly_what_depends_on_it(finished: dict[str, Any], case: Case, tmp_path: Path) -> None:
    before: Snapshot = finished["before"]
    copy_case(finished["base"], tmp_path / "case")
    root, config_dir, data_dir = tmp_path / "case" / "exp", tmp_path / "case" / "config", tmp_path / "case" / "data"
    raw = yaml.safe_load((config_dir / "experiment.yaml").read_text())
    raw["paths"]["prepared_dir"] = str(data_dir)
    ctx = Ctx(config=raw, config_dir=config_dir, data_dir=data_dir, requests=copy.deepcopy(finished["requests"]))
    sources = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    if case.change:
        case.change(ctx)
    (config_dir / "experiment.yaml").write_text(yaml.safe_dump(ctx.config, sort_keys=False))
    sources_changed = {p.name: p.read_bytes() for p in data_dir.iterdir()} != sources
    extra = ("--force",) if case.force else ()
    run_dir = root / f"run_{RID}"
    try:
        tree = tree_state(run_dir)
        preview = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--rid", RID, "--root", str(root), "--config",
                                  str(config_dir / "experiment.yaml"), "--json"], capture_output=True, text=True,
                                 timeout=120)
        assert preview.returncode == 0, preview.stdout + preview.stderr
        assert tree_state(run_dir) == tree, "plan --config previews without writing"
        previewed = json.loads(preview.stdout)
        assert bool(previewed["drift"]) == (case.change is not None) or case.force
        again = run_luigi(root, config_dir / "experiment.yaml", RID, "--accept-config-drift", *extra)
        (tmp_path / "case" / "rerun.log").write_text(again.stderr)
        assert again.returncode == 0, again.stderr[-4000:]
        after = snapshot(root)
        prepared = sources_changed or changed(before.config, after.config, "sizes")
        expected_parts = ctx.requests.parts()

        # (b) the batch inputs are what the change makes of them, and exactly the requests never sent before went out
        assert after.views == modeled_views(after, ctx.requests), "some parts point at jobs for other requests"
        new_jobs = {job for job, n in after.creates.items() if n > before.creates.get(job, 0)}
        assert all(after.creates[job] == 1 for job in new_jobs), "a job was created twice"
        sent = [after.jobs[job] for job in new_jobs]
        assert len(sent) == len(set(sent)), "the same requests went out twice"
        assert set(sent) == set(expected_parts.values()) - set(before.jobs.values())

        # (a) exactly the stages that read something that changed ran
        ran = stage_lines(again.stderr)
        want = expected_stages(before, after, finished["requests"], ctx.requests, prepared, case.force)
        assert ran == want, (f"ran but not expected: {sorted(ran - want)}\nexpected but did not run: "
                             f"{sorted(want - ran)}\n{again.stderr[-3000:]}")
        if not case.force:
            # The preview of the accepted config names every trial stage that then ran. It is an upper bound: a stage
            # whose upstream re-ran into byte-identical files is skipped at run time, which no preview can know.
            shown = {(t["stage"], t["task"]) for t in previewed["tasks"]
                     if t["state"] == "to run" and t["stage"] in TRIAL_STAGES and t["task"].startswith("trial=")}
            happened = {(stage, scope) for stage, scope in ran if stage in TRIAL_STAGES}
            assert happened <= shown, f"ran, not previewed: {sorted(happened - shown)}"

        # (c) predictions byte-identical where no request changed
        for slug in after.trials:
            if slug in before.trials and before.views[slug] == after.views[slug]:
                assert after.files[slug]["predictions"] == before.files[slug]["predictions"], slug

        # and once current, a re-run does nothing
        twice = run_luigi(root, None, RID)
        assert twice.returncode == 0, twice.stderr[-3000:]
        assert stage_lines(twice.stderr) == set(), twice.stderr[-3000:]
        assert json.loads((run_dir / ".emulator" / "calls.json").read_text())["job_creates"] == after.creates
    finally:
        stop_emulator(run_dir / ".emulator")


def test_a_later_change_sends_only_its_own_parts(finished: dict[str, Any], tmp_path: Path) -> None:
    """Two accepted changes in a row: the second sends only the requests it changes. Nothing the first change made
    stale is left for it to send (the old fallback skipped the treatment parts of a prompt edit, and the next change
    sent them)."""
    cases = {c.id: c for c in CASES}
    copy_case(finished["base"], tmp_path / "case")
    root, config_dir, data_dir = tmp_path / "case" / "exp", tmp_path / "case" / "config", tmp_path / "case" / "data"
    raw = yaml.safe_load((config_dir / "experiment.yaml").read_text())
    raw["paths"]["prepared_dir"] = str(data_dir)
    ctx = Ctx(config=raw, config_dir=config_dir, data_dir=data_dir, requests=copy.deepcopy(finished["requests"]))
    run_dir = root / f"run_{RID}"
    try:
        sent_by_step = []
        for case_id in ("prompt-treatment-excellence", "max_new_tokens-closed"):
            known = snapshot(root).jobs
            cases[case_id].change(ctx)
            (config_dir / "experiment.yaml").write_text(yaml.safe_dump(ctx.config, sort_keys=False))
            again = run_luigi(root, config_dir / "experiment.yaml", RID, "--accept-config-drift")
            assert again.returncode == 0, again.stderr[-4000:]
            after = snapshot(root)
            assert after.views == modeled_views(after, ctx.requests)
            sent = {after.jobs[job] for job, n in after.creates.items() if job not in known}
            assert sent == set(ctx.requests.parts().values()) - set(known.values()), case_id
            sent_by_step.append(sent)
        closed = {key for key in sent_by_step[1] if json.loads(key[2])["maxTokens"] == 128}
        assert sent_by_step[1] == closed, "the second change sent requests it did not change"
    finally:
        stop_emulator(run_dir / ".emulator")
