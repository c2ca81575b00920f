"""The experiment config: a YAML file validated by pydantic, and its expansion into trials.

The schema follows the original system's `EvalConfigModel` (model ids and aliases, prompt sets, temps,
samples per item, top_p/top_k/max_new_tokens, sweep or explicit trials, sizes, pricing, provider) so its
`effective_config.yaml` files stay readable. Relative paths in a config file resolve against the directory
of that file; `load_config` returns them absolute, which is what gets frozen into a run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.naming import fmt_param, is_safe_component, short_hash, temp_label, temp_str

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the repository: pipeline/control/config.py
DEFAULT_CONFIG = PACKAGE_ROOT / "config" / "experiment.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaxNewTokens(_Model):
    closed_book: Annotated[int, Field(gt=0, le=131072)] = 1024
    """Most tokens a closed-book answer may generate (the job's max_tokens for closed-book parts)."""
    open_book: Annotated[int, Field(gt=0, le=131072)] = 1024
    """Most tokens an open-book answer may generate (the job's max_tokens for open-book parts)."""


class PromptSet(_Model):
    control: str
    """File with the control system prompt."""
    treatment: str
    """File with the treatment system prompt."""


class Sizes(_Model):
    open_book_max_items: Annotated[int, Field(gt=0)] | None = None
    """Cap on open-book items, applied after the per-dataset caps; null = all."""
    closed_book_max_items: Annotated[int, Field(gt=0)] | None = None
    """Cap on closed-book items, applied after the per-dataset caps; null = all."""
    squad_v2_max_items: Annotated[int, Field(gt=0)] | None = None
    """Cap on SQuAD v2 items (open-book); null = all."""
    triviaqa_max_items: Annotated[int, Field(gt=0)] | None = None
    """Cap on TriviaQA items (closed-book); null = all."""
    nq_open_max_items: Annotated[int, Field(gt=0)] | None = None
    """Cap on NQ-Open items (closed-book); null = all."""


class Paths(_Model):
    prepared_dir: str = "../data/sample"
    """Directory with the prepared `open_book.jsonl` and `closed_book.jsonl`."""
    task_instructions_dir: str = "task_instructions"
    """Directory with `open_book.txt` and `closed_book.txt`, the per-type task instructions."""
    experiments_dir: str | None = None
    """Accepted for configs of the original system and not used: runs go under `--root`, else
    `$PIPELINE_EXPERIMENTS_DIR`, else `./experiments`."""


class Provider(_Model):
    """Where batches go. `emulator` (default) starts a local server per run that speaks every provider's API."""

    name: Literal["emulator", "fireworks", "openai", "anthropic", "local"] = "emulator"
    """Who answers the batches: `emulator` (offline, simulated answers; reports are labelled SIMULATED), `fireworks`
    (FIREWORKS_API_KEY, FIREWORKS_ACCOUNT_ID), `openai` (OPENAI_API_KEY), `anthropic` (ANTHROPIC_API_KEY) or `local`
    (an OpenAI-compatible server at `base_url`: Ollama, llama.cpp server, vLLM)."""
    api: Literal["fireworks", "openai", "anthropic", "local"] = "fireworks"
    """The wire format: for the emulator, which provider's API it speaks (the run then drives that provider's client
    code, offline); for a real provider it is its own API (set from `name`; another value is an error)."""
    base_url: str | None = None
    """`local` only: the server's OpenAI-compatible base URL; null = LOCAL_BASE_URL from the environment, else
    http://127.0.0.1:11434/v1 (Ollama)."""
    max_concurrent_requests: Annotated[int, Field(ge=1, le=256)] = 4
    """`local` only: requests in flight at once."""
    prompt_caching: bool = False
    """`anthropic` only: mark the system prompt for prompt caching (`cache_control`); cache reads and writes are
    priced at their own rates."""

    @property
    def served_by(self) -> str:
        """Who answers, as reports and costs.json name it: the provider, or `emulator/<api>` for the emulator
        speaking another API than Fireworks'."""
        if self.name == "emulator" and self.api != "fireworks":
            return f"emulator/{self.api}"
        return self.name

    @model_validator(mode="before")
    @classmethod
    def _api_of_the_provider(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name", "emulator") != "emulator":
            if data.get("api") not in (None, data["name"]):
                raise ValueError(f"provider.api {data['api']!r} is for the emulator only; provider {data['name']!r} "
                                 "speaks its own API (remove provider.api)")
            data = {**data, "api": data["name"]}
        return data
    latency_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    """Emulator only: seconds a batch job takes to complete."""
    poll_interval_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    """Seconds between job status polls; null = 0.1 for the emulator, 30 for Fireworks."""
    poll_timeout_s: Annotated[float, Field(gt=0)] = 48 * 3600
    """Seconds to wait for a job before the part fails."""
    pricing_key: str | None = None
    """Model key looked up in `pricing.providers` instead of the trial's model id."""
    max_download_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Absolute cap on one part's download; the limit is otherwise derived from the part's requests "
                    "(see pipeline.providers.limits)")
    download_deadline_s: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Wall-clock bound of one part's download; default derived from its byte limit")
    download_command: list[str] | None = Field(
        default=None,
        description="CLI fallback when the REST download fails, held to the same byte and time bounds: one that "
                    "writes files, e.g. [firectl, download, dataset, '{dataset_id}', --output-dir, '{output_dir}'], "
                    "or one without '{output_dir}' whose stdout is the results file")


API_MAX_LINES = {"openai": 50_000, "anthropic": 100_000}
"""Most requests one batch may hold, per provider API."""
API_MAX_BYTES = {"openai": 200 * 10**6, "anthropic": 256 * 10**6}
"""Most bytes one batch may hold, per provider API (decimal megabytes: the stricter reading)."""


class Budget(_Model):
    """`max_usd`: no submission may take the run's committed cost estimate past it (see `pipeline.budget`)."""

    max_usd: Annotated[float, Field(gt=0)] | None = None
    """USD cap on the run's committed cost estimate; null = no cap."""


class Batching(_Model):
    lines_per_part: Annotated[int, Field(gt=0, le=1_000_000)] = 500
    """Most request lines in one batch part (one remote job and dataset)."""
    max_part_bytes: Annotated[int, Field(ge=4096)] | None = None
    """Most bytes in one batch part (each line counted with a 512-byte allowance for the provider's wire format);
    null = no limit beyond the provider API's own (OpenAI 200 MB, Anthropic 256 MB)."""


class Pricing(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_million: Annotated[float, Field(ge=0)] = 0.15
    """Fallback USD per 1M input tokens, for models without an entry in `pricing.providers`."""
    output_per_million: Annotated[float, Field(ge=0)] = 0.60
    """Fallback USD per 1M output tokens, for models without an entry in `pricing.providers`."""
    batch_discount: Annotated[float, Field(ge=0, le=1)] | None = 0.5
    """Multiplier on standard rates under the batch API; null, 0 or 1 mean no discount."""
    allow_unlisted_models: bool = False
    """Run models that have no entry in `pricing.providers` (priced at the fallback rates); otherwise the runner
    refuses them before anything is sent, and `plan` warns."""
    providers: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    """Rates per provider and model: `{provider: {model: {input_per_mtok, output_per_mtok, input_per_mtok_batch,
    output_per_mtok_batch, batch_discount}}}`; explicit batch rates are never discounted again (see
    `pipeline.pricing`). Cached prompt tokens: optional `cache_read_per_mtok`, `cache_write_per_mtok` (and their
    `*_batch` variants, same rules), else the input rate times `cache_read_multiplier` / `cache_write_multiplier`,
    whose defaults are anthropic 0.1 / 1.25, openai 0.5 / 1, others 1 / 1."""

    @field_validator("providers")
    @classmethod
    def _entries_complete(cls, value: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
        allowed = {"input_per_mtok", "output_per_mtok", "input_per_mtok_batch", "output_per_mtok_batch", "batch_discount",
                   "cache_read_per_mtok", "cache_write_per_mtok", "cache_read_per_mtok_batch",
                   "cache_write_per_mtok_batch", "cache_read_multiplier", "cache_write_multiplier"}
        for provider, table in value.items():
            for model, entry in table.items():
                where = f"pricing.providers.{provider}[{model!r}]"
                unknown = set(entry) - allowed
                if unknown:
                    raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
                standard = {"input_per_mtok", "output_per_mtok"} <= set(entry)
                batch = {"input_per_mtok_batch", "output_per_mtok_batch"} <= set(entry)
                if not (standard or batch):
                    raise ValueError(f"{where}: give input_per_mtok+output_per_mtok or the *_batch pair")
                if any(v < 0 for v in entry.values()):
                    raise ValueError(f"{where}: rates and multipliers must be >= 0")
                for side in ("cache_read", "cache_write"):
                    if f"{side}_multiplier" in entry and {f"{side}_per_mtok", f"{side}_per_mtok_batch"} & set(entry):
                        raise ValueError(f"{where}: give {side}_per_mtok (or its _batch rate) or {side}_multiplier, "
                                         "not both")
        return value


class Unsupported(_Model):
    strategy: Literal["baseline", "overlap"] = "baseline"
    """How an open-book answer is judged unsupported by its passage: `baseline` (not a whole-token substring of it) or
    `overlap` (too few of its tokens in it)."""
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Abstention gate: a sample whose abstain score is at least this is not counted as unsupported."""
    min_token_overlap: Annotated[float, Field(ge=0, le=1)] = 0.6
    """`overlap` strategy: the share of the answer's tokens that must occur in the passage."""


class Scoring(_Model):
    abstain_markers: list[str] | None = None
    """Phrases that mark an answer as an abstention; null = the built-in list."""


class Stats(_Model):
    bootstrap_samples: Annotated[int, Field(ge=100, le=1_000_000)] = 5000
    """Bootstrap resamples for the delta CIs."""
    permutation_samples: Annotated[int, Field(ge=100, le=1_000_000)] = 5000
    """Sign-flip permutations for the permutation p-value."""
    random_seed: int = 1337
    """Seed of every resampling, so statistics are reproducible."""
    enable_permutation: bool = True
    """Compute the sign-flip permutation test."""
    enable_fdr: bool = True
    """Add Benjamini–Hochberg q-values over each trial's hypothesis family (one test per hypothesis, listed in
    significance.json's `fdr.family`)."""
    risk_thresholds: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Abstention thresholds at which selective risk (risk over coverage) is evaluated."""
    tost_alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Significance level of the one-sided non-inferiority t test (the lower test of a TOST; the name is kept)."""
    tost_margins: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=lambda: {"em": 0.01, "f1": 0.01})
    """Non-inferiority margin per metric, as a rate (0.01 = 1 percentage point)."""

    @field_validator("risk_thresholds")
    @classmethod
    def _sorted(cls, value: list[float]) -> list[float]:
        return sorted(set(value))


class Optional(_Model):
    """The optional analyses (files next to significance.json). The mixed model is slow, so it is off by default."""

    enable_power_analysis: bool = True
    """Write power_analysis.json (minimum detectable effect and required sample sizes)."""
    enable_cost_effectiveness: bool = True
    """Write cost_effectiveness.json (extra USD per percentage point the treatment gains)."""
    enable_unsupported_sensitivity: bool = True
    """Write unsupported_sensitivity.json (the unsupported-rate delta over the overlap threshold)."""
    enable_mixed_effects: bool = False
    """Fit the mixed-effects model (slow, so off by default)."""
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05
    """Significance level of the power analysis."""
    power: Annotated[float, Field(gt=0, lt=1)] = 0.8
    """Target power of the power analysis."""


class Sweep(_Model):
    models: list[str] | None = None
    """Models (ids or aliases) to sweep; null = the top-level `models` / `model_id`."""
    prompt_sets: list[str] | None = None
    """Prompt sets to sweep; null = the default prompt set."""
    top_p: list[Annotated[float, Field(ge=0, le=1)]] | None = None
    """top_p values to sweep; null = the top-level `top_p`."""
    top_k: list[Annotated[int, Field(ge=0)]] | None = None
    """top_k values to sweep; null = the top-level `top_k`."""
    max_new_tokens: dict[Literal["open_book", "closed_book"], list[Annotated[int, Field(gt=0)]]] | None = None
    """Token limits to sweep per task type; a missing type keeps the top-level value."""


class TrialSpec(_Model):
    id: str | None = None
    """Trial slug (its directory name); null = derived from model, prompt set and parameters."""
    model: str | None = None
    """Model id or alias; null = `model_id` (or the first of `models`)."""
    model_id: str | None = None
    """Model id, used when `model` is not given."""
    prompt_set: str | None = None
    """Prompt set name; null = the default prompt set."""
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    """top_p of this trial; null = the top-level `top_p`."""
    top_k: Annotated[int, Field(ge=0)] | None = None
    """top_k of this trial; null = the top-level `top_k`."""
    max_new_tokens: MaxNewTokens | None = None
    """Token limits of this trial; null = the top-level `max_new_tokens`."""


Temp = Annotated[float, Field(ge=0, le=2)]


class ExperimentConfig(_Model):
    """The whole experiment. Unknown keys are refused so that typos do not silently fall back to defaults."""

    model_id: str = "accounts/fireworks/models/gpt-oss-120b"
    """The model evaluated when neither `models`, `sweep.models` nor `trials` name one."""
    model_aliases: dict[str, str] = Field(default_factory=dict)
    """Short names for model ids (`alias: full id`); an alias also names its trials."""
    models: list[str] | None = None
    """Models (ids or aliases) to evaluate, one trial each; null = `model_id`."""
    temps: list[Temp] = Field(default_factory=lambda: [0.0, 0.7])
    """Sampling temperatures; every trial runs at each of them."""
    samples_per_item: dict[str, Annotated[int, Field(gt=0, le=1000)]]
    """Samples per item at each temperature (`temperature: K`); one entry per temperature of `temps`."""
    top_p: Annotated[float, Field(ge=0, le=1)] | None = 1.0
    """Nucleus sampling top_p; null = not sent."""
    top_k: Annotated[int, Field(ge=0)] | None = 50
    """top_k sampling; null = not sent."""
    max_new_tokens: MaxNewTokens = Field(default_factory=MaxNewTokens)
    """Most tokens an answer may generate, per task type."""
    stop: list[str] = Field(default_factory=list)
    """Stop sequences, sent with every job's inference parameters (and in each request line when `use_batch_api` is
    false, as the original did)."""
    prompt_sets: dict[str, PromptSet] = Field(default_factory=dict)
    """Named pairs of control and treatment system prompt files; at least one."""
    default_prompt_set: str | None = None
    """Prompt set of trials that name none; null = the first name in sorted order."""
    sweep: Sweep | None = None
    """Cartesian product of trial parameters, used when `trials` is not given."""
    trials: list[TrialSpec] | None = None
    """Explicit trials; when given, `sweep` is ignored."""
    sizes: Sizes = Field(default_factory=Sizes)
    """Caps on the number of prepared items."""
    paths: Paths = Field(default_factory=Paths)
    """Input locations (relative to the config file)."""
    provider: Provider = Field(default_factory=Provider)
    """Where batches go, and how downloads are bounded."""
    batching: Batching = Field(default_factory=Batching)
    """How request lines are split into parts."""
    budget: Budget = Field(default_factory=Budget)
    """Spending limit on submissions."""
    use_batch_api: bool = True
    """Price with batch rates; when false, standard rates, and `stop` is also written into each request line."""
    pricing: Pricing = Field(default_factory=Pricing)
    """Token rates for costs.json and the budget (see `pipeline.pricing`)."""
    unsupported: Unsupported = Field(default_factory=Unsupported)
    """How open-book answers are judged unsupported by their passage."""
    scoring: Scoring = Field(default_factory=Scoring)
    """Abstention detection."""
    stats: Stats = Field(default_factory=Stats)
    """Settings of the paired statistics in significance.json."""
    optional: Optional = Field(default_factory=Optional)
    """Optional analyses written next to significance.json."""

    @field_validator("samples_per_item", mode="before")
    @classmethod
    def _normalize_sample_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, k in value.items():
            try:
                label = temp_str(float(key))
            except (TypeError, ValueError):
                raise ValueError(f"samples_per_item key {key!r} is not a temperature") from None
            if label in out:
                raise ValueError(f"samples_per_item has two keys for temperature {label}")
            out[label] = k
        return out

    @field_validator("temps")
    @classmethod
    def _unique_temps(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("temps must list at least one temperature")
        labels: dict[str, float] = {}
        for t in value:
            label = temp_label(t)
            if label in labels:
                raise ValueError(f"temperatures {labels[label]} and {t} share the label t{label}; remove one")
            labels[label] = t
        return value

    @field_validator("prompt_sets")
    @classmethod
    def _safe_prompt_set_names(cls, value: dict[str, PromptSet]) -> dict[str, PromptSet]:
        for name in value:
            if not is_safe_component(name) or "." in name:
                raise ValueError(f"prompt set name {name!r} must match [A-Za-z0-9][A-Za-z0-9_-]* (it becomes part of file names)")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if not self.prompt_sets:
            raise ValueError("prompt_sets is empty: define at least one {name: {control: FILE, treatment: FILE}}")
        if self.default_prompt_set is not None and self.default_prompt_set not in self.prompt_sets:
            raise ValueError(f"default_prompt_set {self.default_prompt_set!r} is not in prompt_sets {sorted(self.prompt_sets)}")
        for t in self.temps:
            if temp_str(t) not in self.samples_per_item:
                raise ValueError(f"samples_per_item has no entry for temperature {temp_str(t)}; add '{temp_str(t)}: K'")
        names = set(self.prompt_sets)
        used = list(self.sweep.prompt_sets or []) if self.sweep else []
        used += [t.prompt_set for t in self.trials or [] if t.prompt_set]
        for name in used:
            if name not in names:
                raise ValueError(f"prompt set {name!r} is used but not defined in prompt_sets {sorted(names)}")
        self._provider_limits()
        return self

    def _provider_limits(self) -> None:
        """What the chosen provider API cannot take, refused before anything is built (batch_apis.md §2-§3)."""
        api = self.provider.api
        most = API_MAX_LINES.get(api)
        if most is not None and self.batching.lines_per_part > most:
            raise ValueError(f"batching.lines_per_part {self.batching.lines_per_part} is over the {api} batch limit of "
                             f"{most:,} requests; set it to at most {most}")
        top_ks = [self.top_k, *(t.top_k for t in self.trials or []), *((self.sweep.top_k or []) if self.sweep else [])]
        if api == "openai" and any(k is not None for k in top_ks):
            raise ValueError("top_k is set but the OpenAI API has no top_k parameter; set top_k: null (and in trials)")

    def part_byte_limit(self) -> int | None:
        """The byte limit of a batch part: `batching.max_part_bytes` and the provider API's own, the smaller."""
        limits = [x for x in (self.batching.max_part_bytes, API_MAX_BYTES.get(self.provider.api)) if x is not None]
        return min(limits) if limits else None

    def resolve_model(self, name: str) -> str:
        return self.model_aliases.get(name, name)

    def short_model_name(self, model_id: str) -> str:
        for alias, full in self.model_aliases.items():
            if full == model_id:
                return alias
        return re.sub(r"[^a-zA-Z0-9_-]+", "-", model_id.rstrip("/").split("/")[-1])

    @property
    def default_set(self) -> str:
        return self.default_prompt_set or sorted(self.prompt_sets)[0]


class Trial(BaseModel):
    """One expanded trial: a model, a prompt set and sampling parameters, over every temperature of the run."""

    model_config = ConfigDict(frozen=True)

    slug: str
    model_id: str
    prompt_set: str
    top_p: float | None
    top_k: int | None
    max_new_tokens: MaxNewTokens
    temps: list[float]

    def max_tokens_for(self, type_: str) -> int:
        """Job-level max tokens for a part of this type; a `mixed` part (adopted from the original) gets the larger."""
        if type_ == "mixed":
            return max(self.max_new_tokens.open_book, self.max_new_tokens.closed_book)
        return self.max_new_tokens.open_book if type_ == "open" else self.max_new_tokens.closed_book

    def as_manifest(self) -> dict[str, Any]:
        return {
            "id": self.slug,
            "model_id": self.model_id,
            "prompt_set": self.prompt_set,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens.model_dump(),
        }


def _base_slug(cfg: ExperimentConfig, model_id: str, prompt_set: str, top_p: float | None, top_k: int | None,
               mx: MaxNewTokens) -> str:
    parts = [cfg.short_model_name(model_id), prompt_set]
    if top_p is not None:
        parts.append(f"tp{fmt_param(top_p)}")
    if top_k is not None:
        parts.append(f"tk{int(top_k)}")
    parts.append(f"mx{mx.closed_book}-{mx.open_book}")
    return "-".join(parts)


def expand_trials(cfg: ExperimentConfig) -> list[Trial]:
    """Explicit `trials:` entries, else the sweep's cartesian product, else the base lists; slugs are unique."""
    models = [cfg.resolve_model(m) for m in (cfg.models or [cfg.model_id])]
    prompt_sets = [cfg.default_set]
    rows: list[tuple[str | None, str, str, float | None, int | None, MaxNewTokens]] = []
    if cfg.trials:
        for spec in cfg.trials:
            model = cfg.resolve_model(spec.model or spec.model_id or models[0])
            rows.append((spec.id, model, spec.prompt_set or prompt_sets[0],
                         spec.top_p if spec.top_p is not None else cfg.top_p,
                         spec.top_k if spec.top_k is not None else cfg.top_k,
                         spec.max_new_tokens or cfg.max_new_tokens))
    else:
        sweep = cfg.sweep or Sweep()
        sweep_models = [cfg.resolve_model(m) for m in sweep.models] if sweep.models else models
        top_ps: list[float | None] = list(sweep.top_p) if sweep.top_p else [cfg.top_p]
        top_ks: list[int | None] = list(sweep.top_k) if sweep.top_k else [cfg.top_k]
        mx = sweep.max_new_tokens or {}
        mxs = [MaxNewTokens(closed_book=cb, open_book=ob)
               for cb in mx.get("closed_book", [cfg.max_new_tokens.closed_book])
               for ob in mx.get("open_book", [cfg.max_new_tokens.open_book])]
        for model, ps, tp, tk, m in itertools.product(sweep_models, sweep.prompt_sets or prompt_sets, top_ps, top_ks, mxs):
            rows.append((None, model, ps, tp, tk, m))
    return _assign_slugs(cfg, rows)


def _assign_slugs(cfg: ExperimentConfig, rows: list[tuple[str | None, str, str, float | None, int | None, MaxNewTokens]]
                  ) -> list[Trial]:
    seen_params: set[tuple[Any, ...]] = set()
    base: list[str] = []
    for explicit, model, ps, tp, tk, mx in rows:
        key = (model, ps, tp, tk, mx.closed_book, mx.open_book)
        if key in seen_params:
            raise ConfigError(f"trial {model} / {ps} / top_p={tp} / top_k={tk} / {mx} is listed twice; remove the duplicate")
        seen_params.add(key)
        slug = explicit or _base_slug(cfg, model, ps, tp, tk, mx)
        if not is_safe_component(slug):
            raise ConfigError(f"trial id {slug!r} is not a safe directory name; use letters, digits, '-', '_' and '.'")
        base.append(slug)
    counts = {s: base.count(s) for s in base}
    trials: list[Trial] = []
    for slug, (explicit, model, ps, tp, tk, mx) in zip(base, rows, strict=True):
        if counts[slug] > 1:
            if explicit:
                raise ConfigError(f"trial id {slug!r} is used by more than one trial; give each a distinct id")
            # Two models can share a short name (the last path segment); a hash of the full id keeps slugs apart.
            slug = f"{slug}-{short_hash(model, ps, tp, tk, mx.closed_book, mx.open_book, length=6)}"
        trials.append(Trial(slug=slug, model_id=model, prompt_set=ps, top_p=tp, top_k=tk, max_new_tokens=mx,
                            temps=list(cfg.temps)))
    return trials


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid experiment config ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  - {loc}: {err['msg']}")
    lines.append("Fix these keys (see config/experiment.yaml for a complete example) and run again.")
    return "\n".join(lines)


def _resolve(base: Path, value: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(value))
    p = Path(expanded)
    return str(p if p.is_absolute() else (base / p).resolve())


def _absolutize(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make every path in the raw config absolute, relative to `base` (the config file's directory)."""
    out = dict(raw)
    if isinstance(out.get("prompt_sets"), dict):
        out["prompt_sets"] = {
            name: {k: _resolve(base, v) if isinstance(v, str) else v for k, v in spec.items()}
            if isinstance(spec, dict) else spec
            for name, spec in out["prompt_sets"].items()
        }
    if isinstance(out.get("paths"), dict):
        out["paths"] = {k: _resolve(base, v) if isinstance(v, str) else v for k, v in out["paths"].items()}
    else:
        out["paths"] = {k: _resolve(base, v) for k, v in Paths().model_dump().items() if isinstance(v, str)}
    for key in ("prepared_dir", "task_instructions_dir"):
        out["paths"].setdefault(key, _resolve(base, getattr(Paths(), key)))
    return out


def parse_config(raw: Any, source: Path, *, base: Path | None = None) -> ExperimentConfig:
    """Validate a raw mapping; `source` names the file in error messages, `base` anchors relative paths."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(_absolutize(raw, base or source.parent))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None
    for name, ps in cfg.prompt_sets.items():
        for cond in ("control", "treatment"):
            path = Path(getattr(ps, cond))
            if not path.is_file():
                raise ConfigError(f"{source}: prompt_sets.{name}.{cond}: file {path} does not exist")
    expand_trials(cfg)
    return cfg


def load_config(path: Path) -> ExperimentConfig:
    """Read and validate a config file; errors name the file and each bad key."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}; pass an existing file with --config") from None
    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, path)


def config_dump(cfg: ExperimentConfig) -> dict[str, Any]:
    """The canonical plain form of a config: what is frozen and what drift is measured on."""
    return cfg.model_dump(mode="json")


def diff_configs(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two plain config dumps, one `key: old -> new` line each."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: (absent) -> {json.dumps(new[key])}")
            elif key not in new:
                out.append(f"{where}: {json.dumps(old[key])} -> (absent)")
            else:
                out.extend(diff_configs(old[key], new[key], where))
        return out
    return [] if old == new else [f"{prefix}: {json.dumps(old)} -> {json.dumps(new)}"]
