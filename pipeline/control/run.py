"""A run: its layout, its frozen config and its trials.

`open_run` is read-only: it uses the run's frozen `effective_config.yaml` when there is one, otherwise the
config file given (or the default). `freeze` writes the config, the prompt texts and `run_state.json` on the
first run of a rid; `config_drift` (read-only) tells how a config given later differs, `accept_drift` adopts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.control.adopt import looks_original, translate_original_config
from pipeline.control.config import (
    DEFAULT_CONFIG,
    ConfigError,
    ExperimentConfig,
    Trial,
    config_dump,
    diff_configs,
    expand_trials,
    load_config,
    parse_config,
)
from pipeline.control.layout import RunLayout, check_rid, default_root
from targets import store
from targets.atomic import write_text
from targets.fingerprint import current_sha
from targets.manifest import RunState, utcnow

log = logging.getLogger("pipeline")
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader when PyYAML has it: same result
TASK_INSTRUCTIONS = ("open_book.txt", "closed_book.txt")


class ConfigDriftError(ConfigError):
    """The config given differs from the run's frozen config."""


@dataclass(frozen=True)
class Run:
    layout: RunLayout
    cfg: ExperimentConfig
    trials: tuple[Trial, ...]
    frozen: bool
    source: Path
    adopted: bool = False
    _by_slug: dict[str, Trial] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rid(self) -> str:
        return self.layout.rid

    def trial(self, slug: str) -> Trial:
        if not self._by_slug:
            self._by_slug.update({t.slug: t for t in self.trials})
        try:
            return self._by_slug[slug]
        except KeyError:
            known = ", ".join(t.slug for t in self.trials)
            raise ConfigError(f"run {self.rid} has no trial {slug!r}; its trials are: {known}") from None

    def prompt_path(self, prompt_set: str, condition: str) -> Path:
        return Path(getattr(self.cfg.prompt_sets[prompt_set], condition))

    def instructions_path(self, kind: str) -> Path:
        return Path(self.cfg.paths.task_instructions_dir) / f"{kind}.txt"


_runs: dict[tuple[str, str, str], tuple[Any, Run]] = {}
_announced: set[tuple[Path, str]] = set()


def resolve_root(root: str | Path | None) -> Path:
    return Path(root).expanduser().resolve() if root else default_root()


def _stamp(path: Path) -> Any:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


_previews: dict[str, Run] = {}


@contextmanager
def previewing(run: Run, config: str | Path) -> Iterator[Run]:
    """Within the block, `open_run` answers for `run`'s directory as if `config` had been accepted (frozen), so a
    read-only view can evaluate the graph under a drifted config. Nothing is written."""
    given = Path(config).expanduser().resolve()
    cfg = load_config(given)
    preview = Run(run.layout, cfg, tuple(expand_trials(cfg)), True, given)
    _previews[str(run.layout.run_dir)] = preview
    try:
        yield preview
    finally:
        _previews.pop(str(run.layout.run_dir), None)


def open_run(rid: str, root: str | Path | None = None, config: str | Path | None = None) -> Run:
    """The run as it stands: frozen config if the rid has one, else `config` (default: config/experiment.yaml)."""
    layout = RunLayout(resolve_root(root), check_rid(rid))
    if str(layout.run_dir) in _previews:
        return _previews[str(layout.run_dir)]
    source = Path(config).expanduser().resolve() if config else DEFAULT_CONFIG
    key = (str(layout.run_dir), rid, str(source))
    stamp = (_stamp(layout.effective_config), _stamp(source))
    hit = _runs.get(key)
    if hit and hit[0] == stamp:
        return hit[1]
    if layout.effective_config.exists():
        cfg, adopted = _load_frozen(layout)
        run = Run(layout, cfg, tuple(expand_trials(cfg)), True, layout.effective_config, adopted)
    else:
        cfg = load_config(source)
        run = Run(layout, cfg, tuple(expand_trials(cfg)), False, source)
    _runs[key] = (stamp, run)
    return run


def _load_frozen(layout: RunLayout) -> tuple[ExperimentConfig, bool]:
    """The run's frozen config, and whether it was written by the original system (then translated)."""
    try:
        raw = yaml.load(layout.effective_config.read_text(encoding="utf-8"), Loader=SAFE_LOADER)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{layout.effective_config}: cannot read the run's frozen config ({exc})") from None
    if not looks_original(raw):
        return parse_config(raw, layout.effective_config, base=layout.run_dir), False
    base = layout.root.parent  # the original ran from its repository root, above experiments/
    try:
        translated, dropped = translate_original_config(raw, base)
    except ValueError as exc:
        raise ConfigError(f"{layout.effective_config}: {exc}") from None
    cfg = parse_config(translated, layout.effective_config, base=base)
    if (layout.effective_config, "adopt") not in _announced:
        _announced.add((layout.effective_config, "adopt"))
        log.info("adopt run=%s (effective_config.yaml written by the original system; paths resolved against %s; "
                 "ignored keys: %s)", layout.rid, base, ", ".join(dropped) or "none")
    return cfg, True


def semantic_dump(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config with file paths replaced by the checksums of their contents: what drift is judged on."""
    dump = config_dump(cfg)
    dump["prompt_sets"] = {
        name: {cond: current_sha(Path(p)) for cond, p in spec.items()} for name, spec in dump["prompt_sets"].items()
    }
    paths = dump.pop("paths")
    instructions = Path(paths["task_instructions_dir"])
    dump["task_instructions"] = {name: current_sha(instructions / name) for name in TASK_INSTRUCTIONS}
    prepared = Path(paths["prepared_dir"])
    dump["prepared_data"] = {name: current_sha(prepared / f"{name}.jsonl") or str(prepared)
                             for name in ("open_book", "closed_book")}
    return dump


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 of the config's meaning (file contents, not paths): equal on every machine for the same experiment."""
    return hashlib.sha256(json.dumps(semantic_dump(cfg), sort_keys=True).encode()).hexdigest()


def config_drift(run: Run, config: str | Path | None) -> list[str]:
    """Read-only: the keys in which an explicitly given config differs from the run's frozen one (empty when they
    agree or nothing is frozen yet)."""
    if not config or not run.frozen:
        return []
    return diff_configs(semantic_dump(run.cfg), semantic_dump(load_config(Path(config).expanduser().resolve())))


def refuse_drift(run: Run, config: str | Path, diff: list[str]) -> ConfigDriftError:
    """The error that refuses a drift, listing the differing keys and the ways on."""
    given_path = Path(config).expanduser().resolve()
    shown = "\n  ".join(diff[:20]) + (f"\n  … and {len(diff) - 20} more" if len(diff) > 20 else "")
    return ConfigDriftError(
        f"run {run.rid}: {given_path} differs from the run's frozen config {run.layout.effective_config}:\n  {shown}\n"
        "Re-run without --config to continue with the frozen config, use a new --rid for a new experiment, "
        "or pass --accept-config-drift to adopt the new config for this run (recorded in run_state.json).")


def accept_drift(run: Run, config: str | Path) -> list[str]:
    """Adopt the given config for the run (frozen again, the old one backed up, the drift recorded); the keys that
    differed. Writes: only the runner calls it, under Luigi's process lock."""
    diff = config_drift(run, config)
    if not diff:
        return []
    given_path = Path(config).expanduser().resolve()
    log.warning("accept config drift run=%s (%d key(s) differ: %s)", run.rid, len(diff), "; ".join(diff[:5]))
    _backup_effective(run.layout)
    freeze(run.layout, load_config(given_path), given_path, drift=diff)
    return diff


def _backup_effective(layout: RunLayout) -> None:
    stamp = utcnow().replace(":", "").replace("-", "")
    target = layout.run_dir / f"effective_config.{stamp}.yaml"
    n = 1
    while target.exists():
        target = layout.run_dir / f"effective_config.{stamp}.{n}.yaml"
        n += 1
    shutil.copy2(layout.effective_config, target)


def freeze(layout: RunLayout, cfg: ExperimentConfig, source: Path, *, drift: list[str] | None = None) -> None:
    """Write the run's frozen config: prompt texts copied under `prompts/`, paths made run-relative."""
    dump = config_dump(cfg)
    for name, spec in dump["prompt_sets"].items():
        for cond, src in spec.items():
            rel = f"prompts/{name}.{cond}.txt"
            write_text(layout.run_dir / rel, Path(src).read_text(encoding="utf-8"))
            spec[cond] = rel
    instructions_src = Path(dump["paths"]["task_instructions_dir"])
    for name in TASK_INSTRUCTIONS:
        write_text(layout.prompts_dir / "task_instructions" / name, (instructions_src / name).read_text(encoding="utf-8"))
    dump["paths"]["task_instructions_dir"] = "prompts/task_instructions"
    write_text(layout.effective_config, yaml.safe_dump(dump, sort_keys=False, allow_unicode=True))
    frozen, _ = _load_frozen(layout)
    digest = config_fingerprint(frozen)

    def change(state: RunState | None) -> RunState:
        if state is None:
            state = RunState(run_id=layout.rid, config_hash=digest)
        if drift:
            state.config_drift.append({"detected_at": utcnow(), "accepted": True, "source": str(source),
                                       "expected": state.config_hash, "actual": digest, "keys": drift})
        state.config_hash = digest
        return state

    store.update(layout.run_state, RunState, change)
    log.info("froze config run=%s (from %s, hash %s)", layout.rid, source, digest[:12])
