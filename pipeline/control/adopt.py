"""Adopting runs written by the original system: its config schema, its batch inputs, its job breadcrumbs.

- `translate_original_config(raw, base)` maps the original's `EvalConfigModel` (effective_config.yaml) onto ours:
  known keys are carried over, keys with no meaning here (local backends, optional analyses, raw paths …) are
  dropped and listed. Relative paths resolve against `base` (the original repository root: the experiments
  directory's parent, where the original ran from).
- `original_parts(...)` lists the request parts the original already wrote (`t{T}{_ps}_{cond}.p{NN}.jsonl`, or
  the unsplit shard as part 1), so a resumed run sends exactly what the original would have sent and finds the
  results it already downloaded under the same job keys.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")

CARRIED = {
    "model_id", "model_aliases", "models", "temps", "samples_per_item", "top_p", "top_k", "max_new_tokens", "stop",
    "prompt_sets", "default_prompt_set", "sweep", "trials", "sizes", "use_batch_api", "stats",
}
PRICING_KEYS = {"input_per_million", "output_per_million", "batch_discount", "providers"}
STATS_KEYS = {"bootstrap_samples", "permutation_samples", "random_seed", "enable_permutation", "enable_fdr",
              "risk_thresholds", "tost_alpha", "tost_margins"}


def looks_original(raw: object) -> bool:
    """An effective config written by the original: ours always carries a `batching` block, the original never did."""
    return isinstance(raw, dict) and "batching" not in raw


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def translate_original_config(raw: dict[str, Any], base: Path) -> tuple[dict[str, Any], list[str]]:
    """Our config dict for an original effective config, and the keys that were dropped."""
    out: dict[str, Any] = {k: v for k, v in raw.items() if k in CARRIED and v is not None}
    dropped = sorted(k for k in raw if k not in CARRIED and k not in {"pricing", "paths", "provider", "unsupported",
                                                                     "unsupported_threshold", "backend"})
    if isinstance(out.get("stats"), dict):
        out["stats"] = {k: v for k, v in out["stats"].items() if k in STATS_KEYS and v is not None}
        if "risk_thresholds" in out["stats"]:
            out["stats"]["risk_thresholds"] = [min(1.0, max(0.0, float(t))) for t in out["stats"]["risk_thresholds"]]
    if isinstance(raw.get("pricing"), dict):
        out["pricing"] = {k: v for k, v in raw["pricing"].items() if k in PRICING_KEYS}
    unsupported = dict(raw.get("unsupported") or {})
    if raw.get("unsupported_threshold") is not None and "threshold" not in unsupported:
        unsupported["threshold"] = raw["unsupported_threshold"]
    if unsupported.get("strategy") == "nli":
        unsupported["strategy"] = "overlap"  # the original's "nli" was a placeholder for baseline-or-overlap
        dropped.append("unsupported.strategy=nli (scored as overlap)")
    out["unsupported"] = {k: v for k, v in unsupported.items() if k in {"strategy", "threshold", "min_token_overlap"}}
    paths = raw.get("paths") or {}
    out["paths"] = {"prepared_dir": _resolve(base, str(paths.get("prepared_dir") or "data/prepared")),
                    "task_instructions_dir": _resolve(base, "config/task_instructions")}
    if isinstance(out.get("prompt_sets"), dict):
        out["prompt_sets"] = {name: {c: _resolve(base, str(p)) for c, p in spec.items() if c in ("control", "treatment")}
                              for name, spec in out["prompt_sets"].items()}
    else:
        out["prompt_sets"] = {"default": {"control": _resolve(base, "config/prompts/control_system.txt"),
                                          "treatment": _resolve(base, "config/prompts/treatment_system.txt")}}
    provider = raw.get("provider") or {}
    backend = raw.get("backend") or "fireworks"
    if backend != "fireworks":
        raise ValueError(f"the original run used backend {backend!r}; only Fireworks runs can be adopted")
    out["provider"] = {"name": "fireworks"}
    if isinstance(provider, dict):
        out["provider"].update({k: provider[k] for k in ("pricing_key", "poll_interval_s") if provider.get(k)})
    if isinstance(out.get("sweep"), dict):
        out["sweep"] = {k: v for k, v in out["sweep"].items()
                        if k in {"models", "prompt_sets", "top_p", "top_k", "max_new_tokens"} and v}
        if out["sweep"].get("max_new_tokens"):
            out["sweep"]["max_new_tokens"] = {k: v for k, v in out["sweep"]["max_new_tokens"].items() if v}
    if isinstance(out.get("trials"), list):
        keep = {"id", "model", "model_id", "prompt_set", "top_p", "top_k", "max_new_tokens"}
        out["trials"] = [{k: v for k, v in t.items() if k in keep and v is not None} for t in out["trials"]]
    return out, dropped


_PART = re.compile(r"^t(?P<label>[0-9]+)(?P<ps>_.+)?_(?P<cond>control|treatment)\.p(?P<index>[0-9]{2,})\.jsonl$")


def original_parts(batch_inputs: Path, label: str, suffix: str, condition: str) -> list[Path]:
    """The parts the original wrote for one shard, in part order; the unsplit shard itself when there are none."""
    stem = f"t{label}{suffix}_{condition}"
    parts = sorted(batch_inputs.glob(f"{stem}.p[0-9][0-9]*.jsonl"), key=lambda p: int(_PART.match(p.name)["index"])
                   if _PART.match(p.name) else 0)
    parts = [p for p in parts if _PART.match(p.name)]
    if parts:
        return parts
    shard = batch_inputs / f"{stem}.jsonl"
    return [shard] if shard.exists() else []
